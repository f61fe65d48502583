import pytest
import torch

from hw6utils.config import get_preset
from hw6utils.models import build_unet, count_params


def test_hw6_preset_builds_the_exact_course_unet():
    cfg = get_preset("hw6")
    unet = build_unet(cfg, text_hidden_size=512)
    assert count_params(unet) == 241_363_972
    assert unet.config.down_block_types == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 32, 32), 10, encoder_hidden_states=torch.randn(1, 77, 512)).sample
    assert out.shape == (1, 4, 32, 32)


def test_tiny_unet_has_the_documented_size():
    """4.65 M parameters (README, notebook 03): cross-attention at two levels plus the pooled-text projection;
    4.77 M with resnets that take the embedding as a scale and a shift (README, "Scale and shift")."""
    assert count_params(build_unet(get_preset("tiny"), text_hidden_size=384)) == 4_649_188
    assert count_params(build_unet(get_preset("tiny", resnet_time_scale_shift="scale_shift"),
                                   text_hidden_size=384)) == 4_768_900


@pytest.mark.parametrize("name", ["tiny", "reference", "smoke"])
def test_small_presets_build_and_run(name):
    cfg = get_preset(name)
    unet = build_unet(cfg, text_hidden_size=384)
    size = cfg.model.sample_size
    with torch.no_grad():
        out = unet(torch.randn(2, 4, size, size), torch.tensor([1, 500]), encoder_hidden_states=torch.randn(2, 5, 384),
                   class_labels=torch.randn(2, 384)).sample
    assert out.shape == (2, 4, size, size)


def test_cross_attention_dim_must_match_the_text_encoder():
    with pytest.raises(ValueError, match="cross_attention_dim is 384 but the text encoder 'minilm' has hidden size 512"):
        build_unet(get_preset("tiny"), text_hidden_size=512)


def test_hw6_plus_keeps_the_course_encoders_and_builds():
    cfg = get_preset("hw6_plus")
    assert cfg.preset == "hw6_plus" and cfg.encoders == get_preset("hw6").encoders
    assert (cfg.data.image_size, cfg.data.image_prep, cfg.sample.sampler) == (256, "center", "dpmpp")
    unet = build_unet(cfg, text_hidden_size=512)
    assert unet.config.block_out_channels == (192, 384, 768)


def test_scale_shift_resnets_take_the_embedding_as_a_scale_and_a_shift(tmp_path):
    """resnet_time_scale_shift='scale_shift' (ADM's AdaGN): each resnet projects the time + pooled-text embedding to
    a scale and a shift of its normalised features (2 x its channels), and the saved UNet loads back the same."""
    cfg = get_preset("smoke", resnet_time_scale_shift="scale_shift")
    unet = build_unet(cfg, text_hidden_size=384).eval()
    plain = build_unet(get_preset("smoke", resnet_time_scale_shift="default"), text_hidden_size=384)
    resnet, plain_resnet = unet.down_blocks[0].resnets[0], plain.down_blocks[0].resnets[0]
    assert resnet.time_emb_proj.out_features == 2 * plain_resnet.time_emb_proj.out_features == 2 * 16
    unet.save_pretrained(tmp_path)
    loaded = type(unet).from_pretrained(tmp_path).eval()
    assert loaded.config.resnet_time_scale_shift == "scale_shift"
    args = (torch.randn(2, 4, 16, 16), torch.tensor([1, 500]))
    kw = {"encoder_hidden_states": torch.randn(2, 5, 384), "class_labels": torch.randn(2, 384)}
    with torch.no_grad():
        assert torch.equal(unet(*args, **kw).sample, loaded(*args, **kw).sample)
    with pytest.raises(ValueError, match="resnet_time_scale_shift must be one of 'default', 'scale_shift'; got 'ada'"):
        get_preset("smoke", resnet_time_scale_shift="ada")
