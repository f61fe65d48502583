import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from hw6utils.encoders import (decode_latents, encode_images, encode_text, latent_shift_scale, load_text_encoder,
                               load_vae, text_hidden_size)


def test_minilm_loads_offline_from_its_local_path():
    tokenizer, model = load_text_encoder("minilm")
    assert text_hidden_size(model) == 384 and not any(p.requires_grad for p in model.parameters())
    out = encode_text(tokenizer, model, ["A red circle.", ""], max_length=20)
    assert out["emb"].shape == (2, 20, 384) and out["pooled"].shape == (2, 384)
    assert out["mask"][0].sum() > out["mask"][1].sum() == 2  # "" is just [CLS] [SEP]
    with pytest.warns(UserWarning, match="1 of 2 prompt\\(s\\) are longer than 20 tokens and were truncated"):
        long = encode_text(tokenizer, model, ["word " * 100, "short"], max_length=20)
    assert long["emb"].shape == (2, 20, 384)  # truncated to max_length
    with pytest.raises(ValueError, match="max_text_len 600 is more than the text encoder's limit of 512 tokens"):
        encode_text(tokenizer, model, ["short"], max_length=600)
    with pytest.warns(UserWarning, match="truncated \\(the text encoder's limit\\)"):
        encode_text(tokenizer, model, ["word " * 600], max_length=512)


def test_a_clip_text_model_loads_through_the_same_call(tmp_path):
    """A 2-layer CLIP text model saved with save_pretrained stands in for openai/clip-vit-base-patch32."""
    config = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(config).save_pretrained(tmp_path / "clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "red</w>": 3, "circle</w>": 4, "!": 5}
    (tmp_path / "vocab.json").write_text(__import__("json").dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(tmp_path / "clip")
    tokenizer, model = load_text_encoder(str(tmp_path / "clip"))
    assert isinstance(model, CLIPTextModel) and text_hidden_size(model) == 32
    out = encode_text(tokenizer, model, ["a red circle"], max_length=77)
    assert out["emb"].shape == (1, 77, 32) and out["pooled"].shape == (1, 32)


def test_vae_round_trip_shapes_and_scaling(vae_dir):
    vae = load_vae(str(vae_dir))
    assert not any(p.requires_grad for p in vae.parameters())
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = encode_images(vae, images)
    assert latents.shape == (2, 4, 16, 16)
    shift, scale = latent_shift_scale(vae)
    assert torch.allclose(shift.flatten(), torch.tensor([0.0, 0.1, 0.0, -0.1]))
    assert torch.allclose(scale.flatten(), 1 / torch.tensor([0.5, 0.5, 0.6, 0.4]))
    decoded = decode_latents(vae, latents)
    assert decoded.shape == (2, 3, 64, 64) and 0 <= decoded.min() and decoded.max() <= 1


def test_missing_vae_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load the VAE"):
        load_vae(str(tmp_path / "none"))
