import pytest

from hw6utils.config import PRESETS, config_from_dict, config_to_dict, get_preset, parse_value


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_a_dict(name):
    cfg = get_preset(name)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_overrides_reach_the_owning_stage():
    cfg = get_preset("tiny", lr=3e-4, image_size=32, block_out_channels=[8, 16])
    assert cfg.train.lr == 3e-4 and cfg.data.image_size == 32
    assert cfg.model.block_out_channels == (8, 16)
    assert get_preset("tiny").train.lr != 3e-4  # presets are not mutated


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rate'\].*valid keys: .*lr"):
        get_preset("tiny", learning_rate=1.0)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown preset 'huge'; valid presets: tiny"):
        get_preset("huge")


def test_command_line_values_take_the_field_type():
    assert parse_value("lr", "0.5") == 0.5
    assert parse_value("flip", "true") is True
    assert parse_value("block_out_channels", "8,16") == (8, 16)
    with pytest.raises(ValueError, match="--max_steps expects a int, got 'ten'"):
        parse_value("max_steps", "ten")
    assert parse_value("down_block_types", "DownBlock2D, CrossAttnDownBlock2D") == ("DownBlock2D", "CrossAttnDownBlock2D")
    with pytest.raises(ValueError, match="--block_out_channels expects comma-separated whole numbers, got '16,abc'"):
        parse_value("block_out_channels", "16,abc")


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch_size must be a number at least 1; got 0"),
    ("grad_accum", 0, "grad_accum must be a number at least 1"),
    ("log_freq", 0, "log_freq must be a number at least 1"),
    ("save_freq", 0, "save_freq must be a number at least 1"),
    ("lr", -1e-3, "lr must be a number >= 0"),
    ("ema_decay", 1.0, r"ema_decay must be a number in \[0, 1\)"),
    ("cond_drop_prob", "0.1", r"cond_drop_prob must be a number in \[0, 1\); got '0.1'"),
    ("prediction_type", "v-prediction", "prediction_type must be one of 'epsilon', 'v_prediction', 'flow'; got 'v-prediction'"),
    ("lr_schedule", "step", "lr_schedule must be one of 'cosine', 'constant', 'linear'"),
    ("sampler", "euler", "sampler must be one of 'ddim', 'dpmpp'"),
])
def test_bad_values_are_named_at_once(field, value, message):
    with pytest.raises(ValueError, match=message):
        get_preset("tiny", **{field: value})


def test_help_shows_the_tiny_presets_values():
    from hw6utils.config import field_help
    tiny = get_preset("tiny")
    assert field_help()["max_steps"][0] == tiny.train.max_steps == 3000
    assert field_help()["guidance_scale"][0] == tiny.sample.guidance_scale == 2.0


def test_hw6_preset_is_the_course_setting():
    cfg = get_preset("hw6")
    assert cfg.encoders.text_encoder == "openai/clip-vit-base-patch32"
    assert (cfg.encoders.vae, cfg.encoders.vae_subfolder) == ("CompVis/stable-diffusion-v1-4", "vae")
    assert (cfg.data.image_size, cfg.train.batch_size, cfg.train.grad_accum) == (256, 32, 16)
    assert (cfg.train.eval_freq, cfg.train.save_freq, cfg.sample.num_inference_steps) == (500, 500, 50)
    assert cfg.train.mixed_precision == "bf16"


@pytest.mark.parametrize("field, value, message", [
    ("guidance_scale", float("inf"), "guidance_scale must be a finite number; got inf"),
    ("guidance_scale", 1e308, "guidance_scale must be a number at most 100; got 1e\+308"),
    ("preview_guidance_scale", float("nan"), "preview_guidance_scale must be a finite number; got nan"),
    ("preview_guidance_scale", 500.0, "preview_guidance_scale must be a number at most 100"),
    ("lr", float("inf"), "lr must be a finite number; got inf"),
    ("lr", 5.0, "lr must be a number at most 1"),
    ("eta", float("nan"), "eta must be a finite number"),
    ("eta", 3.0, "eta must be a number at most 1"),
    ("vae_kl_weight", float("inf"), "vae_kl_weight must be a finite number"),
    ("snr_gamma", float("inf"), "snr_gamma must be a finite number"),
    ("snr_floor", 6.0, r"snr_floor must be a number at most snr_gamma \(5.0\), the min-SNR cap it sits under; got 6.0"),
    ("grad_clip", float("-inf"), "grad_clip must be a finite number"),
])
def test_non_finite_or_absurd_floats_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        get_preset("tiny", **{field: value})


def test_every_float_field_must_be_finite():
    from hw6utils.config import field_help
    floats = [name for name, (default, _) in field_help().items() if isinstance(default, float)]
    assert {"guidance_scale", "lr", "eta", "weight_decay", "ema_decay", "vae_lr"} <= set(floats)
    for name in floats:
        with pytest.raises(ValueError, match=f"^{name} must be a finite number; got nan$"):
            get_preset("tiny", **{name: float("nan")})
