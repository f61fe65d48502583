"""Models built from the config: the UNet trained from scratch and the small offline autoencoder."""
from __future__ import annotations

import contextlib

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from .config import CHOICES, Config


def build_unet(cfg: Config, text_hidden_size: int | None = None) -> UNet2DConditionModel:
    """A randomly initialised UNet2DConditionModel from cfg.model.

    With `use_pooled_text`, the pooled sentence vector is projected and added to the time embedding
    (class_embed_type="projection"), on top of cross-attention over the token states.
    """
    m = cfg.model
    if text_hidden_size is not None:
        check_text_hidden_size(cfg, text_hidden_size)
    if len(m.down_block_types) != len(m.block_out_channels) or len(m.up_block_types) != len(m.block_out_channels):
        raise ValueError(f"block_out_channels has {len(m.block_out_channels)} levels but down_block_types has "
                         f"{len(m.down_block_types)} and up_block_types {len(m.up_block_types)}; they must match")
    extra = {}
    if m.use_pooled_text:
        extra = {"class_embed_type": "projection", "projection_class_embeddings_input_dim": m.cross_attention_dim}
    return UNet2DConditionModel(
        sample_size=m.sample_size, in_channels=m.latent_channels, out_channels=m.latent_channels,
        block_out_channels=tuple(m.block_out_channels), down_block_types=tuple(m.down_block_types),
        up_block_types=tuple(m.up_block_types), layers_per_block=m.layers_per_block,
        cross_attention_dim=m.cross_attention_dim, attention_head_dim=m.attention_head_dim,
        norm_num_groups=m.norm_num_groups, resnet_time_scale_shift=m.resnet_time_scale_shift, **extra)


def check_text_hidden_size(cfg: Config, text_hidden_size: int) -> None:
    """Cross-attention reads the text encoder's token states, so their widths must agree."""
    if text_hidden_size != cfg.model.cross_attention_dim:
        raise ValueError(f"cross_attention_dim is {cfg.model.cross_attention_dim} but the text encoder "
                         f"{cfg.encoders.text_encoder!r} has hidden size {text_hidden_size}; "
                         f"set cross_attention_dim={text_hidden_size}")


def build_vae(cfg: Config) -> AutoencoderKL:
    """The small AutoencoderKL of the offline presets (f = 2**(levels-1); no mid-block attention)."""
    channels = tuple(cfg.vae.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=cfg.model.latent_channels, norm_num_groups=8, sample_size=cfg.data.image_size,
        mid_block_add_attention=False, scaling_factor=1.0)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def amp_dtype(device: torch.device, mixed_precision: str):
    """The autocast dtype for cfg.train.mixed_precision on this device, or None for fp32.

    'bf16' needs no GradScaler (it has fp32's exponent range), but CUDA GPUs before Ampere (compute capability
    below 8.0: T4, V100) have no bf16 convolutions in cuDNN (`is_bf16_supported()` says True there only
    because bf16 tensors can be emulated), so 'bf16' runs as fp16 on them, with a GradScaler in training.
    """
    if mixed_precision not in CHOICES["mixed_precision"]:
        raise ValueError(f"mixed_precision must be 'bf16', 'fp16' or 'no', got {mixed_precision!r}")
    if mixed_precision == "no":
        return None
    if mixed_precision == "fp16" or (device.type == "cuda"
                                     and not torch.cuda.is_bf16_supported(including_emulation=False)):
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, mixed_precision: str):
    """Autocast in the dtype `amp_dtype` picks (bf16, or fp16 on GPUs without bf16), or nothing for 'no'."""
    dtype = amp_dtype(device, mixed_precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """Copy a tensor to `device` without making the CPU wait for the GPU.

    A copy from ordinary (pageable) CPU memory to a GPU first waits until the GPU has run everything queued
    before it, so the CPU cannot queue the next kernels while the GPU works: one such copy per micro-batch
    leaves the GPU idle while Python launches the next forward pass. From pinned memory, with non_blocking,
    the copy simply joins the GPU's queue. Elsewhere this is plain `.to(device)`.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
