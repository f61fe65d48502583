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


def test_every_subcommand_names_the_function_that_runs_it():
    import argparse

    def leaves(parser, path=()):  # every runnable command, nested ones (hw6 data shapes) included
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, parser
        for action in subs:
            for name, child in action.choices.items():
                yield from leaves(child, path + (name,))
    commands = dict(leaves(build_parser()))
    assert {"train", "evaluate", "grade", "package", "assign", "run-notebooks"} <= {p[0] for p in commands}
    assert ("data", "shapes") in commands and ("data", "check") in commands
    for path, parser in commands.items():
        assert callable(parser.get_default("func")), " ".join(path)


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


def test_export_reference_needs_its_out_and_keeps_the_folder_it_replaces(smoke_cfg, tmp_path, capsys):
    import json
    import shutil

    from hw6utils.config import REFERENCE_DIR, apply_overrides, load_config
    from hw6utils.training import train
    cfg = apply_overrides(smoke_cfg, max_steps=2, eval_freq=0)
    train(cfg, progress=False)
    train(apply_overrides(cfg, max_steps=3, ckpt_path="last"), progress=False)  # resumed, as make reference may be
    flags = ["--preset", "smoke", "--output_dir", cfg.train.output_dir]
    with pytest.raises(SystemExit):  # no default --out: data/reference is replaced only when said
        main(["export-reference", *flags])
    assert "the following arguments are required: --out" in capsys.readouterr().err
    out = tmp_path / "reference"
    (out / "vae").mkdir(parents=True)
    (out / "vae" / "kept.txt").write_text("an earlier model")
    shutil.copyfile(REFERENCE_DIR / "eval.json", f"{cfg.train.output_dir}/eval_3.json")  # as `hw6 evaluate` writes it
    assert main(["export-reference", *flags, "--out", str(out)]) == 0
    card = (out / "README.md").read_text()  # the model card gives the figures in hw6 evaluate's words
    measured = next(line for line in card.splitlines() if line.startswith("- **Measured:** "))
    assert measured.startswith("- **Measured:** hw6 evaluate, with the sampling above: colour+shape 99% of 168 prompts ")
    assert json.loads((out / "unet" / "config.json").read_text())["block_out_channels"] == [16, 32]
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "HW6Pipeline"
    assert (out / "vae" / "config.json").is_file() and not (out / "text_encoder").exists()
    # no local path of the machine that exported it (diffusers records where each part was loaded from)
    assert not [p for p in out.rglob("*.json") if "_name_or_path" in json.loads(p.read_text())]
    aside = list(tmp_path.glob("reference_prev_*"))
    assert len(aside) == 1 and (aside[0] / "vae" / "kept.txt").read_text() == "an earlier model"
    # the VAE the UNet was trained with (here a test VAE; named 'reference' only in data/reference)
    assert load_config(out / "hw6_config.json").encoders.vae == cfg.encoders.vae != "reference"
    # the model's settings, not the run's: training from the exported config starts afresh
    assert load_config(out / "hw6_config.json").train.ckpt_path == ""
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    broken = tmp_path / "broken"
    shutil.copytree(f"{cfg.train.output_dir}/ckpt_last/unet_sch_2", broken)
    shutil.rmtree(broken / "scheduler")
    assert main(["export-reference", "--from_checkpoint", str(broken), "--out", str(out)]) == 2
    assert "cannot read the noise schedule" in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert len(list(tmp_path.glob("reference_prev_*"))) == 1


@pytest.mark.parametrize("argv, message", [
    (["generate", "--num_inference_steps", "0"], "num_inference_steps must be a number at least 1; got 0"),
    (["generate", "--guidance_scale", "inf"], "guidance_scale must be a finite number; got inf"),
    (["generate", "--guidance_scale", "1e308"], "guidance_scale must be a number at most 100"),
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


@pytest.mark.parametrize("argv, message", [
    (["generate", "--image_size", "256"], "--image_size does not apply to generate: the checkpoint's saved config "
                                          "decides the model, its encoders and the image size"),
    (["generate", "--block_out_channels", "8,16", "--text_encoder", "x"], "--block_out_channels, --text_encoder do "
                                                                          "not apply to generate: the checkpoint's"),
    (["evaluate", "--lr", "0.1"], "--lr does not apply to evaluate"),
    (["sweep", "--preview_guidance_scale", "3"], "--preview_guidance_scale does not apply to sweep"),
    (["train", "--stage", "last"], "--stage does not apply to train"),
    (["train-vae", "--lr", "0.1", "--output_dir", "o"], "--lr, --output_dir do not apply to train-vae: "
                                                         "`hw6 train-vae --help` lists the fields it uses"),
    (["export-reference", "--max_steps", "5", "--out", "x"], "--max_steps does not apply to export-reference"),
])
def test_a_config_field_the_command_does_not_use_is_a_one_line_error(argv, message, tmp_path, capsys, monkeypatch):
    import hw6utils.training as training
    for name in ("train", "train_vae"):  # the error comes before any work
        monkeypatch.setattr(training, name, lambda *args, **kwargs: pytest.fail("started training"))
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"hw6 {argv[0]}: error: {message}"), err


def test_resume_from_the_command_line_keeps_the_saved_config(smoke_cfg, tmp_path, capsys):
    """`hw6 train --ckpt_path last` goes on with the checkpoint's own config: an --lr given at the start stays, and
    only the flags given now (here --max_steps) change it."""
    import torch
    common = ["--preset", "smoke", "--data_dir", smoke_cfg.data.data_dir, "--vae", smoke_cfg.encoders.vae,
              "--output_dir", smoke_cfg.train.output_dir, "--cache_dir", smoke_cfg.train.cache_dir, "--eval_freq", "0"]
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


HELP_LINES_BEFORE = 175  # each command's --help listed every config field (175-195 lines)


@pytest.mark.parametrize("command, shown, hidden", [
    ("train", ["--lr", "--max_steps", "--image_size", "--text_encoder", "--block_out_channels", "--guidance_scale",
               "--preview_guidance_scale", "--ckpt_path"], ["--stage", "--vae_steps", "--use_ema", "--eta"]),
    ("generate", ["--guidance_scale", "--num_inference_steps", "--sampler", "--stage", "--eta", "--output_dir",
                  "--test_json", "--data_dir", "--device"], ["--lr", "--max_steps", "--vae_steps", "--image_size"]),
    ("evaluate", ["--guidance_scale", "--stage", "--output_dir", "--device"], ["--lr", "--image_size", "--vae_lr"]),
    ("sweep", ["--stage", "--test_json", "--output_dir"], ["--preview_guidance_scale", "--lr", "--image_size"]),
    ("demo", ["--lr", "--max_steps", "--guidance_scale"], ["--stage", "--vae_steps"]),
    ("train-vae", ["--vae_steps", "--vae_lr", "--image_size", "--data_dir"], ["--lr", "--guidance_scale", "--stage"]),
    ("export-reference", ["--output_dir"], ["--lr", "--guidance_scale", "--image_size"]),
])
def test_each_command_help_shows_its_own_options_first_then_the_fields_it_uses(command, shown, hidden, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    flags = [line.split()[0].rstrip(",") for line in text.splitlines() if line.startswith("  --")]
    for flag in shown:
        assert flag in flags, flag
    for flag in hidden:
        assert flag not in flags, flag
    if command not in ("train", "demo"):  # these two use nearly every field
        assert len(text.splitlines()) < HELP_LINES_BEFORE // 2, len(text.splitlines())
    fields_at = text.index("config fields")
    own = {"generate": "--out", "sweep": "--guidance", "export-reference": "--from_checkpoint"}.get(command)
    if own:
        import re
        assert re.search(rf"^  {own}[ ,]", text, re.M).start() < fields_at


def test_generate_help_lists_out_before_the_config_fields(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert usage.index("[--out OUT]") < usage.index("[--guidance_scale")


@pytest.mark.parametrize("argv, name, value", [
    (["generate", "--test-json", "t.json"], "test_json", "t.json"),
    (["generate", "--test_json", "t.json"], "test_json", "t.json"),
    (["sweep", "--test-json", "t.json"], "test_json", "t.json"),
    (["score", "images", "--test_json", "t.json", "--stats", "s"], "test_json", "t.json"),
    (["package", "--student_id", "a1", "--images", "i", "--test_json", "t.json"], "student_id", "a1"),
    (["package", "--student-id", "a1", "--images", "i", "--test-json", "t.json", "--model_note", "m"],
     "model_note", "m"),
    (["train", "--max-steps", "7"], "max_steps", "7"),
    (["run-notebooks", "--out-dir", "o"], "out_dir", "o"),
    (["export-reference", "--from-checkpoint", "3", "--out", "o"], "from_checkpoint", "3"),
    (["data", "check", "d", "--max-text-len", "9"], "max_text_len", 9),
])
def test_every_option_takes_both_spellings(argv, name, value):
    assert getattr(build_parser().parse_args(argv), name) == value


def test_data_check_offline_with_a_hub_tokenizer_checks_the_data_and_skips_the_token_count(shapes_dir, capsys):
    import json
    assert main(["data", "check", str(shapes_dir), "--text_encoder", "openai/clip-vit-base-patch32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 200 and report["problems"] == []
    assert report["token_count"].startswith("skipped: openai/clip-vit-base-patch32: ") and "HF_HUB_OFFLINE=1" in \
        report["token_count"]
    assert "captions_truncated" not in report


def test_evaluate_checks_its_output_folder_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import hw6utils.sampling as sampling

    def too_soon(*args, **kwargs):
        raise RuntimeError("the model was loaded before the output folder was checked")
    monkeypatch.setattr(sampling, "load_model", too_soon)
    (tmp_path / "a_file").write_text("")
    assert main(["evaluate", "--stage", "reference", "--output_dir", str(tmp_path / "a_file" / "out")]) == 2
    assert "a_file/out: output folder is not writable" in capsys.readouterr().err


def test_data_shapes_with_no_frames_is_an_error_and_writes_nothing(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--frames", "0"]) == 2
    out, err = capsys.readouterr()
    assert "frames must be at least 1; got 0" in err and "wrote" not in out
    assert not (tmp_path / "s").exists()


def test_stats_on_a_missing_or_empty_folder_says_so(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "nowhere"), "--out", str(tmp_path / "st")]) == 2
    assert "nowhere: folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["stats", str(tmp_path / "empty"), "--out", str(tmp_path / "st")]) == 2
    assert "empty: holds no PNG files" in capsys.readouterr().err
    assert not (tmp_path / "st").exists()


def test_a_warning_during_a_progress_bar_gets_a_line_of_its_own(monkeypatch, capsys):
    import warnings

    from tqdm.auto import tqdm

    import hw6utils.cli as cli

    def run_with_a_bar(args):
        for i in tqdm(range(3)):
            if i == 1:
                warnings.warn("train/x.png: unreadable or corrupt image; skipped")
        return 0
    monkeypatch.setattr(cli, "run", run_with_a_bar)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["data", "shapes"]) == 0
    err = capsys.readouterr().err
    at = err.index("warning: train/x.png: unreadable or corrupt image; skipped\n")
    assert at == 0 or err[at - 1] in "\r\n", repr(err)


def test_demo_keeps_to_its_time_budget_scores_its_model_and_prints_the_references_stored_figures(smoke_cfg,
                                                                                                training_clock, capsys):
    """`hw6 demo --time_budget` trains the steps that fit and says how to train them all; it scores its own model and
    prints the reference's figures from data/reference/eval.json (what `make reference` scored; tests/test_reference.py
    checks them against a fresh score) instead of generating the 168 images again. At 1 s a step a 1-minute budget fits
    no more steps than the 20 after which it is first checked (the demo keeps 350 steps' worth for its scoring), and
    its probe of the pace finds so few steps fit that it trains resnets that scale and shift their features."""
    import json
    from pathlib import Path

    from hw6utils.config import REFERENCE_DIR, load_config
    training_clock(1.0)
    assert main(["demo", "--preset", "smoke", "--data_dir", smoke_cfg.data.data_dir, "--vae", smoke_cfg.encoders.vae,
                 "--output_dir", smoke_cfg.train.output_dir, "--cache_dir", smoke_cfg.train.cache_dir, "--eval_freq", "0",
                 "--num_inference_steps", "2", "--max_steps", "100", "--time_budget", "1"]) == 0
    out = capsys.readouterr().out
    assert "time_budget 1 min: 20 of the 100 steps asked for fitted on this machine" in out
    assert "`make demo MINUTES=0`, or `hw6 demo` without --time_budget, trains all 100" in out
    assert "time_budget 1 min: at 1.0 steps/s (a " in out  # the probe's seconds are the clock's, not the fake steps'
    assert " s probe) about 0 steps fit, 2,100 or fewer, where resnets that scale and shift " \
           "their features learn more: training with --resnet_time_scale_shift scale_shift" in out
    saved = load_config(Path(smoke_cfg.train.output_dir) / "ckpt_last" / "unet_sch_20" / "hw6_config.json")
    assert saved.model.resnet_time_scale_shift == "scale_shift"
    assert "20 (guidance" in out and (Path(smoke_cfg.train.output_dir) / "eval_20.json").is_file()  # its own model
    stored = json.loads((REFERENCE_DIR / "eval.json").read_text())
    assert f"reference (as scored by `make reference`; `hw6 evaluate --stage reference` scores it again): " \
           f"colour+shape {stored['colour_shape']:.0%} of 168 prompts" in out
    assert not (Path(smoke_cfg.train.output_dir) / "eval_reference.json").exists()  # not generated again


def test_the_demo_picks_scale_and_shift_resnets_where_its_budget_fits_2100_steps_or_fewer(monkeypatch, capsys):
    """The probe's pace decides: 10 minutes at 0.24 s a step fit 2,500 steps less the scoring's 350 (resnets that add,
    the preset's), at 0.25 s 2,050 (scale and shift). Resnets given on the command line are not the demo's to pick."""
    import time

    from hw6utils import cli, training
    from hw6utils.config import get_preset
    cfg = get_preset("tiny", time_budget=10.0)
    monkeypatch.setattr(training, "prepare_data", lambda cfg, device: "the prepared data")
    for pace, kind in [(0.24, "default"), (0.25, "scale_shift")]:
        monkeypatch.setattr(training, "seconds_per_step", lambda cfg, prepared: pace)
        picked, prepared = cli.resnets_for_budget(cfg, time.time())
        assert (picked.model.resnet_time_scale_shift, prepared) == (kind, "the prepared data")
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("time_budget 10 min: at 4.2 steps/s (a 0 s probe) about 2,14")  # less the test's time
    assert said[0].endswith("steps fit: resnets that add the time and sentence embedding (the preset's)")
    assert said[1].startswith("time_budget 10 min: at 4.0 steps/s (a 0 s probe) about 2,04")
    assert "steps fit, 2,100 or fewer, where resnets that scale and shift their features learn more" in said[1]
    asked = []
    monkeypatch.setattr(cli, "demo", lambda cfg, pick_resnets=True: asked.append(pick_resnets))
    assert main(["demo", "--time_budget", "10"]) == 0
    assert main(["demo", "--time_budget", "10", "--resnet_time_scale_shift", "default"]) == 0
    assert asked == [True, False]
