import pytest

from hw6utils.cli import build_parser, config_from_args, main


def test_help_explains_every_config_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ["--lr", "--max_steps", "--grad_accum", "--cond_drop_prob", "--eval_freq", "--save_freq", "--ckpt_path",
                 "--text_encoder", "--vae", "--block_out_channels", "--guidance_scale"]:
        assert flag in text, flag
    assert "AdamW peak learning rate" in text


def test_flags_override_the_preset():
    args = build_parser().parse_args(["train", "--preset", "smoke", "--lr", "0.01", "--block_out_channels", "8,16"])
    cfg = config_from_args(args)
    assert cfg.preset == "smoke" and cfg.train.lr == 0.01 and cfg.model.block_out_channels == (8, 16)
    assert cfg.train.batch_size == 8  # untouched fields keep the preset's value


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    code = main(["train", "--preset", "smoke", "--data_dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "nowhere: data folder not found" in err


def test_data_shapes_command(tmp_path):
    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--frames", "1"]) == 0
    assert len(list((tmp_path / "s" / "train").iterdir())) == 200


def test_score_checks_the_folder_first_then_fails_on_missing_weights_in_one_clear_line(tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    from hw6utils.scoring import save_stats
    (tmp_path / "test.json").write_text(json.dumps({"0": {"text_prompt": "a red circle", "image_name": "0.png"}}))
    images = tmp_path / "images"
    images.mkdir()
    argv = ["score", str(images), "--test-json", str(tmp_path / "test.json"), "--stats", str(tmp_path),
            "--inception", str(tmp_path / "inception.pth")]
    assert main(argv) == 2  # the missing image is reported before any network or statistics file is looked for
    err = capsys.readouterr().err.strip()
    assert "not scored, 1 problem(s)" in err and "0.png" in err and "Inception" not in err
    Image.new("RGB", (256, 256)).save(images / "0.png")
    save_stats(tmp_path, np.zeros(4), np.eye(4))
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "inception.pth: Inception weights not found" in err


def test_export_reference_replaces_the_model_whole_or_not_at_all(smoke_cfg, tmp_path, capsys):
    import json
    import shutil

    from hw6utils.config import apply_overrides, load_config
    from hw6utils.training import train
    cfg = apply_overrides(smoke_cfg, max_steps=2, eval_freq=0)
    train(cfg, progress=False)
    out = tmp_path / "reference"
    (out / "vae").mkdir(parents=True)
    (out / "vae" / "kept.txt").write_text("the autoencoder is not the export's business")
    (out / "hw6_config.json").write_text("{}")
    assert main(["export-reference", "--preset", "smoke", "--output_dir", cfg.train.output_dir, "--out", str(out)]) == 0
    assert json.loads((out / "unet" / "config.json").read_text())["block_out_channels"] == [16, 32]
    assert (out / "scheduler" / "scheduler_config.json").is_file() and (out / "vae" / "kept.txt").is_file()
    # the VAE the UNet was trained with (here a test VAE; the shipped one would be named 'reference')
    assert load_config(out / "hw6_config.json").encoders.vae == cfg.encoders.vae != "reference"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    broken = tmp_path / "broken"
    shutil.copytree(f"{cfg.train.output_dir}/ckpt_last/unet_sch_2", broken)
    shutil.rmtree(broken / "scheduler")
    assert main(["export-reference", "--from_checkpoint", str(broken), "--out", str(out)]) == 2
    assert "has no noise schedule" in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("argv, message", [
    (["generate", "--num_inference_steps", "0"], "num_inference_steps must be a number at least 1; got 0"),
    (["train", "--block_out_channels", "a,b"], "--block_out_channels expects comma-separated whole numbers"),
    (["train", "--device", "tpu"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'tpu'"),
    (["sweep", "--stage", "reference", "--steps", "0"], "--steps expects comma-separated whole numbers of at least 1"),
    (["run-notebooks", "-p", "X", "[1"], "-p X: value '[1' is not valid YAML"),
])
def test_bad_values_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main(argv + ["--output_dir", str(tmp_path)] if argv[0] != "run-notebooks" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_a_malformed_checkpoint_config_is_named(tmp_path, capsys):
    from hw6utils.config import load_config
    for text, message in [('{"train": 5}', "expected an object with the sections"),
                          ('{"train": {"nope": 1}}', "unknown config key(s) ['nope']"), ("[]", "expected an object")]:
        (tmp_path / "hw6_config.json").write_text(text)
        with pytest.raises(ValueError, match=r"hw6_config.json: ") as err:
            load_config(tmp_path / "hw6_config.json")
        assert message in str(err.value)


def test_model_flags_given_to_generate_are_named_as_ignored(tmp_path, capsys):
    main(["generate", "--stage", str(tmp_path / "none"), "--block_out_channels", "8,16", "--text_encoder", "x"])
    err = capsys.readouterr().err
    assert "note: --block_out_channels, --text_encoder ignored: the checkpoint's saved config decides" in err


def test_resume_from_the_command_line_keeps_the_saved_config(smoke_cfg, tmp_path, capsys):
    """`hw6 train --ckpt_path last` goes on with the checkpoint's own config: an --lr given at the start stays, and
    only the flags given now (here --max_steps) change it."""
    import torch
    common = ["--preset", "smoke", "--data_dir", smoke_cfg.data.data_dir, "--vae", smoke_cfg.encoders.vae,
              "--output_dir", smoke_cfg.train.output_dir, "--eval_freq", "0"]
    assert main(["train", *common, "--max_steps", "2", "--lr", "3e-3", "--weight_decay", "0.2"]) == 0
    assert main(["train", "--output_dir", smoke_cfg.train.output_dir, "--ckpt_path", "last", "--max_steps", "4"]) == 0
    assert "changed by --output_dir, --max_steps" in capsys.readouterr().out
    state = torch.load(f"{smoke_cfg.train.output_dir}/ckpt_last/unet_sch_4/training_state.pt", weights_only=False)
    group = state["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == 3e-3 and group["weight_decay"] == 0.2
    from hw6utils.config import load_config
    saved = load_config(f"{smoke_cfg.train.output_dir}/ckpt_last/unet_sch_4/hw6_config.json")
    assert (saved.preset, saved.train.lr, saved.train.max_steps) == ("smoke", 3e-3, 4)


def test_warnings_print_as_one_line_without_the_source_line():
    import subprocess
    import sys
    code = ("import warnings, hw6utils.cli as cli; "
            "cli.run = lambda args: warnings.warn('train/x.png: unreadable or corrupt image; skipped') or 0; "
            "raise SystemExit(cli.main(['data', 'shapes']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "warning: train/x.png: unreadable or corrupt image; skipped\n"
