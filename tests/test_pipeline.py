"""HW6Pipeline, the one sampling route, and exports that plain diffusers loads (StableDiffusionPipeline for hw6)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hw6utils.cli import main
from hw6utils.config import apply_overrides, get_preset
from hw6utils.encoders import load_text_encoder, load_vae
from hw6utils.models import build_unet
from hw6utils.pipeline import HW6Pipeline, guided_noise_pred, unet_kwargs
from hw6utils.sampling import build_pipeline, generate, generators
from hw6utils.training import make_noise_scheduler, train

PROMPTS = ["A red circle.", "A blue star."]


@pytest.fixture(scope="module")
def pipe(vae_dir):
    cfg = get_preset("smoke", max_text_len=20)
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    tokenizer, text_model = load_text_encoder("minilm")
    return build_pipeline(cfg, unet, load_vae(str(vae_dir)), tokenizer, text_model, make_noise_scheduler(cfg).config)


def run(pipe, prompts=PROMPTS, seeds=(7, 8), **kwargs):
    kwargs = {"num_inference_steps": 4, "guidance_scale": 4.0, "output_type": "pt", **kwargs}
    return pipe(prompts, generator=generators(seeds), **kwargs).images


def test_images_are_deterministic_per_seed_and_in_range(pipe):
    first = run(pipe)
    assert first.shape == (2, 3, 64, 64) and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, run(pipe))
    assert torch.allclose(first[1:], run(pipe, PROMPTS[1:], [8]), atol=1e-5)  # image i depends on its seed alone
    assert not torch.allclose(first[0], run(pipe, PROMPTS[:1], [9])[0])


def test_stochastic_ddim_still_depends_on_the_seed_alone(pipe):
    both = run(pipe, eta=1.0)
    assert torch.allclose(both[1:], run(pipe, PROMPTS[1:], [8], eta=1.0), atol=1e-5)
    assert torch.equal(both, run(pipe, eta=1.0))
    assert not torch.allclose(both, run(pipe, eta=0.0), atol=1e-3)


def test_the_diffusers_arguments(pipe):
    four = pipe(PROMPTS, num_images_per_prompt=2, generator=generators(range(4)), num_inference_steps=2,
                output_type="np").images
    assert four.shape == (4, 64, 64, 3) and four.dtype == np.float32
    one = pipe(PROMPTS[1], generator=torch.Generator().manual_seed(2), num_inference_steps=2, output_type="np").images
    assert np.allclose(four[2], one[0], atol=1e-5)  # prompts repeat as [p0, p0, p1, p1], generator i for image i
    pil = pipe(PROMPTS[0], num_inference_steps=2).images[0]
    assert isinstance(pil, Image.Image) and pil.size == (64, 64)
    latents = pipe(PROMPTS[0], num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16)
    assert isinstance(pipe(PROMPTS[0], num_inference_steps=2, return_dict=False), tuple)
    assert pipe.config.guidance_scale == 7.5 and pipe.config.text_mask  # the smoke preset's defaults
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        pipe(PROMPTS, generator=generators(range(3)))
    with pytest.raises(ValueError, match="guidance_scale must be a number in \\[0, 100\\], got inf"):
        pipe(PROMPTS, guidance_scale=float("inf"))
    with pytest.raises(ValueError, match="output_type must be"):
        pipe(PROMPTS, output_type="jpeg")


def test_callback_on_step_end_runs_once_per_step_and_can_change_the_latents(pipe):
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, int(t), sorted(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else {}
    run(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"])
    assert [i for i, _, _ in seen] == [0, 1, 2, 3] and seen[0][2] == ["latents", "pred_original_sample"]
    assert [t for _, t, _ in seen] == pipe.scheduler.timesteps.tolist()


def test_a_sampler_swaps_in_the_diffusers_way(pipe):
    from diffusers import DPMSolverMultistepScheduler
    ddim = pipe.scheduler
    try:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(ddim.config, algorithm_type="dpmsolver++")
        assert torch.equal(pipe.scheduler.betas, ddim.betas)
        images = run(pipe)
        assert images.shape == (2, 3, 64, 64) and torch.equal(images, run(pipe))
    finally:
        pipe.scheduler = ddim


def test_guidance_one_is_the_conditional_prediction_and_guidance_is_combined_in_fp32(pipe):
    unet, text, null = pipe.unet, pipe.encode_prompt(PROMPTS), pipe.encode_prompt([""] * 2)
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor(500)
    with torch.no_grad():
        conditional = unet(latents, t, **unet_kwargs(unet, text)).sample
        uncond = unet(latents, t, **unet_kwargs(unet, null)).sample
        assert torch.allclose(guided_noise_pred(unet, latents, t, text, null, guidance_scale=1.0), conditional, atol=1e-5)
        strong = guided_noise_pred(unet, latents, t, text, null, guidance_scale=3.0)
        assert torch.allclose(strong, uncond + 3.0 * (conditional - uncond), atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert guided_noise_pred(unet, latents, t, text, null, guidance_scale=7.5).dtype == torch.float32


def test_save_pretrained_and_from_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    again = HW6Pipeline.from_pretrained(tmp_path / "pipe")
    assert again.config.text_mask and again.config.max_text_len == 20
    assert torch.equal(run(pipe), run(again))


def test_token_embeddings_are_added_to_the_last_layer_and_tell_left_from_right(pipe, tmp_path):
    """add_token_embeddings: the text states are the encoder's last layer plus its layer 0, which separates the
    place words the last layer blurs; the pipeline keeps the setting when saved and loaded again."""
    from hw6utils.pipeline import encode_prompt
    tokenizer, model = pipe.tokenizer, pipe.text_encoder
    prompts = ["a red circle in the top left", "a red circle in the top right"]
    plain = encode_prompt(tokenizer, model, prompts, 20)
    added = encode_prompt(tokenizer, model, prompts, 20, add_token_embeddings=True)
    tokens = tokenizer(prompts, padding="max_length", max_length=20, return_tensors="pt")
    layer0 = model(**tokens, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(added["emb"], plain["emb"] + layer0)
    assert torch.equal(added["mask"], plain["mask"])
    side = (tokens.input_ids[0] != tokens.input_ids[1]).nonzero().item()  # the token "left" / "right"

    def cosine(text):
        return torch.cosine_similarity(text["emb"][0, side], text["emb"][1, side], dim=0).item()
    assert cosine(added) < cosine(plain) - 0.1
    pipe.register_to_config(add_token_embeddings=True)
    try:
        torch.testing.assert_close(pipe.encode_prompt(prompts)["emb"], added["emb"])
        pipe.save_pretrained(tmp_path / "pipe")
    finally:
        pipe.register_to_config(add_token_embeddings=False)
    assert HW6Pipeline.from_pretrained(tmp_path / "pipe").config.add_token_embeddings


def test_the_reference_is_a_pipeline_folder_that_loads_with_no_other_argument():
    from hw6utils.config import REFERENCE_DIR
    pipe = HW6Pipeline.from_pretrained(REFERENCE_DIR)  # the MiniLM comes from its PyPI package
    assert type(pipe.text_encoder).__name__ == "BertModel" and pipe.config.guidance_scale == 2.0
    image = pipe("A red circle.", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


# ------------------------------------------------------------------------------------------- exports, end to end
NO_PROJECT = "import sys\nsys.modules['hw6utils'] = None  # importing the project now fails\n"


def in_plain_diffusers(tmp_path, script: str) -> np.ndarray:
    """Run `script` in a fresh interpreter that cannot import hw6utils; it saves the images to images.npy."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ""}
    code = NO_PROJECT + "import numpy as np, torch\n" + script
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(tmp_path / "images.npy")


def generated(cfg, tmp_path, prompts, steps, guidance) -> np.ndarray:
    """hw6 generate's PNGs for the prompts (image i: seed i), as (N, H, W, 3) uint8."""
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps({str(i): {"text_prompt": p, "image_name": f"{i}.png"} for i, p in enumerate(prompts)}))
    out = generate(apply_overrides(cfg, test_json=str(test_json), num_inference_steps=steps, guidance_scale=guidance,
                                   sample_seed=0), progress=False)
    return np.stack([np.asarray(Image.open(out / f"{i}.png").convert("RGB")) for i in range(len(prompts))])


def differs_by(images: np.ndarray, float_images: np.ndarray) -> int:
    return int(np.abs(images.astype(int) - (float_images * 255).round().astype(int)).max())


@pytest.fixture(scope="module")
def tiny_clip_and_sd_vae(tmp_path_factory):
    """A 2-layer CLIP text model with a character-level CLIP tokenizer (77 tokens) and a small SD-style VAE
    (one scaling factor, 0.18215), random weights, saved with save_pretrained: the hw6 architecture, tiny."""
    from diffusers import AutoencoderKL
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    root = tmp_path_factory.mktemp("hw6_parts")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char], vocab[char + "</w>"] = len(vocab), len(vocab) + 1
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(root / "clip")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1, projection_dim=32)).save_pretrained(root / "clip")
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
                  scaling_factor=0.18215).save_pretrained(root / "vae")
    return root


@pytest.mark.slow
def test_an_hw6_export_is_a_plain_stable_diffusion_pipeline(tiny_clip_and_sd_vae, shapes_dir, tmp_path):
    parts = tiny_clip_and_sd_vae
    cfg = get_preset("hw6", data_dir=str(shapes_dir), image_size=32, flip=False, text_encoder=str(parts / "clip"),
                     vae=str(parts / "vae"), vae_subfolder="", sample_size=16, block_out_channels=(16, 32),
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=32,
                     attention_head_dim=2, norm_num_groups=8, max_steps=3, batch_size=4, grad_accum=1, warmup_steps=1,
                     eval_freq=0, save_freq=3, log_freq=1, output_dir=str(tmp_path / "outputs"))
    train(cfg, progress=False)
    prompts = ["A red circle. It is big.", "A blue star at the top.", "A purple triangle."]
    ours = generated(cfg, tmp_path, prompts, steps=10, guidance=7.5)
    assert main(["export", "--preset", "hw6", "--output_dir", cfg.train.output_dir, "--stage", "last",
                 "--out", str(tmp_path / "export")]) == 0
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    scheduler = json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["steps_offset"] == 1
    card = (tmp_path / "export" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "StableDiffusionPipeline.from_pretrained" in card
    theirs = in_plain_diffusers(tmp_path, f"""
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("export")
gens = [torch.Generator().manual_seed(i) for i in range({len(prompts)})]
images = pipe({prompts!r}, num_inference_steps=10, guidance_scale=7.5, generator=gens, output_type="np").images
np.save("images.npy", images)
""")
    assert differs_by(ours, theirs) <= 2


@pytest.mark.slow
def test_a_tiny_export_loads_in_plain_diffusers_with_its_own_pipeline_code(smoke_cfg, tmp_path):
    cfg = apply_overrides(smoke_cfg, max_steps=2, eval_freq=0, add_token_embeddings=True)  # as tiny conditions
    train(cfg, progress=False)
    prompts = ["A red circle.", "A green square at the bottom."]
    ours = generated(cfg, tmp_path, prompts, steps=5, guidance=2.0)
    assert main(["export", "--preset", "smoke", "--output_dir", cfg.train.output_dir, "--stage", "last",
                 "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "pipeline.py").is_file() and (tmp_path / "export" / "text_encoder").is_dir()
    theirs = in_plain_diffusers(tmp_path, f"""
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("export", trust_remote_code=True)
assert type(pipe).__name__ == "HW6Pipeline", type(pipe)
gens = [torch.Generator().manual_seed(i) for i in range({len(prompts)})]
np.save("images.npy", pipe({prompts!r}, num_inference_steps=5, guidance_scale=2.0, generator=gens, output_type="np").images)
""")
    assert differs_by(ours, theirs) <= 2
    # exporting again keeps the first export, moved aside
    assert main(["export", "--preset", "smoke", "--output_dir", cfg.train.output_dir, "--stage", "last",
                 "--out", str(tmp_path / "export")]) == 0
    assert len(list(tmp_path.glob("export_prev_*"))) == 1
