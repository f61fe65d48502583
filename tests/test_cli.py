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


def test_score_without_torchvision_or_weights_is_one_clear_line(tmp_path, capsys):
    code = main(["score", str(tmp_path), "--test-json", str(tmp_path / "test.json"), "--stats", str(tmp_path),
                 "--inception", str(tmp_path / "inception.pth")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "inception.pth: Inception weights not found" in err
