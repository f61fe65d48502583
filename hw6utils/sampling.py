"""Sampling: DDIM with classifier-free guidance, from a trained checkpoint, and generation from a test.json.

The DDIM schedule is always built from the noise-schedule config saved beside the checkpoint, i.e. the
schedule the UNet was trained with (the original course scripts trained with linear betas and sampled with
Stable Diffusion's scaled-linear ones: a silent mismatch).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from .config import REFERENCE_DIR, Config, load_config, test_json_path
from .data import ensure_writable_dir, free_timestamped_path, load_test_prompts, write_json_atomic
from .encoders import decode_latents, encode_text, load_text_encoder, load_vae, to_pil
from .models import autocast, to_device


def make_sampler(noise_scheduler_config: dict, kind: str = "ddim"):
    """A sampler with exactly the betas of training: 'ddim' (DDIMScheduler) or 'dpmpp' (DPM-Solver++, fewer steps).

    DDIM uses 'leading' spacing (the first step at t = T - T/steps, e.g. 980 of 1000) rather than 'trailing'
    (t = 999): with the cosine schedule alpha_bar_999 is ~2e-9, and the predicted x_0 = (x_t - sqrt(1 - alpha_bar)
    eps) / sqrt(alpha_bar) would multiply any error in eps by ~20,000 on the very first step. DPM-Solver++
    clips lambda = log(alpha / sigma) at -5.1 for the same reason (diffusers' advice for cosine schedules).
    """
    if kind == "ddim":
        return DDIMScheduler.from_config(noise_scheduler_config, timestep_spacing="leading", clip_sample=False)
    if kind == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(noise_scheduler_config, algorithm_type="dpmsolver++",
                                                       solver_order=2, lambda_min_clipped=-5.1)
    raise ValueError(f"sampler must be 'ddim' or 'dpmpp', got {kind!r}")


def unet_kwargs(unet, text: dict) -> dict:
    """The conditioning arguments of one UNet call: token states, their padding mask, and the pooled vector."""
    kwargs = {"encoder_hidden_states": text["emb"], "encoder_attention_mask": text["mask"]}
    config = getattr(unet, "module", unet).config  # a DistributedDataParallel wrapper keeps the UNet in .module
    if config.class_embed_type == "projection":
        kwargs["class_labels"] = text["pooled"]
    return kwargs


def concat_text(*texts: dict) -> dict:
    return {k: torch.cat([t[k] for t in texts]) for k in texts[0]}


def expand_text(text: dict, batch: int) -> dict:
    """Repeat a one-prompt conditioning (e.g. the empty prompt) to `batch` rows."""
    return {k: v.expand(batch, *v.shape[1:]) for k, v in text.items()}


def guided_noise_pred(unet, latents, t, text: dict, null_text: dict, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps_uncond + s * (eps_text - eps_uncond).

    The unconditional and conditional halves run as one batched UNet call. guidance_scale == 1 is the
    plain conditional prediction, so the unconditional half is skipped.
    """
    if guidance_scale == 1.0:
        return unet(latents, t, **unet_kwargs(unet, text)).sample
    cond = concat_text(expand_text(null_text, latents.shape[0]), text)
    # combined in fp32: under autocast the halves are bf16, and s * (difference) would magnify their rounding
    noise_uncond, noise_text = unet(torch.cat([latents, latents]), t, **unet_kwargs(unet, cond)).sample.float().chunk(2)
    return noise_uncond + guidance_scale * (noise_text - noise_uncond)


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
    return onednn_off() if device.type == "cpu" and unet_batch <= 4 else contextlib.nullcontext()


def denoising_timesteps(scheduler, num_inference_steps: int, device) -> list:
    """(t for the scheduler, the same t on `device` for the UNet) for each denoising step, from T down.

    The scheduler looks t up in its tables (alphas_cumprod, sigmas) on the CPU: with t on a GPU every lookup
    would read the GPU and make the CPU wait for it at each step. The UNet's copies go over in one transfer.
    """
    scheduler.set_timesteps(num_inference_steps)
    return list(zip(scheduler.timesteps, scheduler.timesteps.to(device)))


def initial_noise(seeds: list, shape: tuple, device) -> torch.Tensor:
    """x_T ~ N(0, I), one generator per image, so an image depends on its seed alone, not on the batch."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


@torch.no_grad()
def sample(unet, scheduler, vae, text: dict, null_text: dict, seeds: list, guidance_scale: float = 7.5,
           num_inference_steps: int = 50, eta: float = 0.0, mixed_precision: str = "no", return_steps: int = 0,
           progress: bool = False, callback=None):
    """Denoise from x_T to x_0 with the sampler (DDIM or DPM-Solver++) + CFG and decode: images (B, 3, H, W) in [0, 1].

    With return_steps=k > 0 also returns k decoded snapshots of the predicted x_0 along the way.
    callback(step, total), if given, is called after every denoising step (e.g. to move a progress bar).
    """
    device = unet.device
    channels, size = unet.config.in_channels, unet.config.sample_size
    latents = initial_noise(seeds, (channels, size, size), device) * scheduler.init_noise_sigma
    text = {k: v.to(device) for k, v in text.items()}
    null_text = {k: v.to(device) for k, v in null_text.items()}
    timesteps = denoising_timesteps(scheduler, num_inference_steps, device)
    # eta > 0 adds fresh noise at every DDIM step: one generator per image (seeded apart from x_T's), so an
    # image still depends on its own seed alone
    step_generators = [torch.Generator().manual_seed(int(s) + (1 << 32)) for s in seeds] if eta > 0 else None
    unet_batch = latents.shape[0] * (1 if guidance_scale == 1.0 else 2)  # CFG doubles the UNet's batch
    snapshots, keep_at = [], set()
    if return_steps:
        keep_at = {round(i * (num_inference_steps - 1) / max(return_steps - 1, 1)) for i in range(return_steps)}
    for i, (t, unet_t) in enumerate(tqdm(timesteps, disable=not progress, desc="denoising", leave=False)):
        with autocast(device, mixed_precision), cpu_conv_backend(device, unet_batch):
            noise_pred = guided_noise_pred(unet, latents, unet_t, text, null_text, guidance_scale).float()
        extra = {}
        if isinstance(scheduler, DDIMScheduler):
            extra["eta"] = eta
            if step_generators:
                extra["variance_noise"] = to_device(torch.stack([torch.randn(latents.shape[1:], generator=g)
                                                                 for g in step_generators]), device)
        out = scheduler.step(noise_pred, t, latents, **extra)
        latents = out.prev_sample
        if callback is not None:
            callback(i + 1, len(timesteps))
        if i in keep_at:  # DDIM reports its predicted x_0; other samplers show the current x_t
            predicted = getattr(out, "pred_original_sample", None)
            snapshots.append(decode_latents(vae, predicted if predicted is not None else latents))
    with autocast(device, mixed_precision):  # bf16, fp16 on GPUs without bf16, or fp32 for 'no'
        images = decode_latents(vae, latents)
    return (images, snapshots) if return_steps else images


# ----------------------------------------------------------------------------------------------- checkpoints
def read_best(root: Path) -> dict | None:
    """ckpt_last/best.json (written when training tracks eval_metric) with "path" added, or None."""
    if not (Path(root) / "best.json").is_file():
        return None
    best = json.loads((Path(root) / "best.json").read_text())
    return {**best, "path": Path(root) / best["checkpoint"]}


def resolve_checkpoint(stage: str, output_dir: str = "outputs") -> Path:
    """'reference' -> data/reference; 'last' -> newest complete outputs/ckpt_last/unet_sch_<step>; 'best' -> the
    best one by eval_metric (ckpt_last/best.json); a number -> that step; anything else is a folder path."""
    if stage == "reference":
        path = REFERENCE_DIR
    elif stage == "best":
        best = read_best(Path(output_dir) / "ckpt_last")
        if best is None:
            raise FileNotFoundError(f"{Path(output_dir) / 'ckpt_last' / 'best.json'}: no best checkpoint recorded "
                                    "(train with --eval_metric shapes or fid)")
        path = best["path"]
    elif stage == "last" or str(stage).isdigit():
        root = Path(output_dir) / "ckpt_last"
        found = list_checkpoints(root)
        if stage != "last":
            found = [p for p in found if p.name == f"unet_sch_{int(stage)}"]
        if not found:
            raise FileNotFoundError(f"{root}: no complete checkpoint{'' if stage == 'last' else f' for step {stage}'}"
                                    " (train first: `hw6 train`, or use --stage reference)")
        path = found[-1]
    else:
        path = Path(stage)
    if not (path / "hw6_config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no hw6_config.json)")
    return path


def list_checkpoints(root: Path) -> list:
    """Complete checkpoint folders under root, oldest step first ('.tmp' and '.del' folders are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("unet_sch_*") if p.name[9:].isdigit() and (p / "hw6_config.json").is_file()
             and (p / "diffusion_pytorch_model.safetensors").is_file()]
    return sorted(found, key=lambda p: int(p.name[9:]))


@dataclass
class LoadedModel:
    """Everything sampling needs, loaded from one checkpoint folder."""
    cfg: Config
    unet: UNet2DConditionModel
    scheduler: object            # the sampler (DDIM or DPM-Solver++)
    vae: object
    tokenizer: object
    text_model: object
    path: Path

    def encode(self, prompts: list) -> dict:
        return encode_text(self.tokenizer, self.text_model, prompts, self.cfg.encoders.max_text_len)

    @property
    def steps(self) -> int:
        """Training steps behind these weights: the checkpoint's step (unet_sch_<step>), else the config's max_steps
        (an exported model, such as the reference)."""
        name = self.path.name
        return int(name.removeprefix("unet_sch_")) if name.startswith("unet_sch_") else self.cfg.train.max_steps


def load_model(stage: str = "reference", output_dir: str = "outputs", device="cpu", use_ema: bool = True,
               sampler: str = "ddim") -> LoadedModel:
    """Load a checkpoint (UNet, or its EMA copy), its noise schedule, and the encoders it was trained with."""
    path = resolve_checkpoint(stage, output_dir)
    cfg = load_config(path / "hw6_config.json")
    unet_dir = path / "ema" if use_ema and (path / "ema").is_dir() else path
    if not (unet_dir / "config.json").is_file() and (path / "unet").is_dir():
        unet_dir = path / "unet"
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no UNet in the checkpoint (config.json in it, ema/ or unet/)")
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32).to(device).eval()
    scheduler_path = path / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(scheduler_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{scheduler_path}: cannot read the noise schedule ({err})") from None
    tokenizer, text_model = load_text_encoder(cfg.encoders.text_encoder, device)
    vae = load_vae(cfg.encoders.vae, cfg.encoders.vae_subfolder, device)
    return LoadedModel(cfg, unet, make_sampler(scheduler_config, sampler), vae, tokenizer, text_model, path)


def generate_images(model: LoadedModel, prompts: list, seeds: list, guidance_scale: float = 7.5,
                    num_inference_steps: int = 50, eta: float = 0.0, batch_size: int = 32, progress: bool = True,
                    callback=None) -> list:
    """Prompts -> PIL images, in batches; image i uses seeds[i]. callback(step, total) runs after each step."""
    null_text = model.encode([""])
    images = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, disable=not progress or len(batches) < 2, desc="generating"):
        chunk = prompts[start:start + batch_size]
        batch = sample(model.unet, model.scheduler, model.vae, model.encode(chunk), null_text,
                       seeds[start:start + batch_size], guidance_scale, num_inference_steps, eta,
                       model.cfg.train.mixed_precision if model.unet.device.type == "cuda" else "no",
                       callback=callback)
        images.extend(to_pil(batch))
    return images


def generation_record(model: LoadedModel, cfg: Config, entries: list) -> dict:
    """What an output folder's images depend on: the weights (a hash of the checkpoint's safetensors files), the
    sampling settings and each image's prompt. Kept beside the folder (the course wants only PNGs in it)."""
    s = cfg.sample
    weights = hashlib.sha256()
    for path in sorted(model.path.rglob("*.safetensors")):
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                weights.update(chunk)
    return {"checkpoint": str(model.path.resolve()), "weights_sha256": weights.hexdigest(),
            "use_ema": s.use_ema, "sampler": s.sampler, "num_inference_steps": s.num_inference_steps,
            "guidance_scale": s.guidance_scale, "eta": s.eta, "sample_seed": s.sample_seed,
            "prompts": {name: prompt for name, prompt, _ in entries}}


def record_difference(out: Path, old: dict, record: dict) -> str:
    """'' if the images in `out` were made as `record` says, else what differs (in words)."""
    present = [p.name for p in out.glob("*.png")]
    for key, value in record.items():
        if key == "prompts":
            extra = [n for n in present if n not in value]  # the course wants exactly one PNG per entry
            if extra:
                return f"{len(extra)} image(s), e.g. {extra[0]}, that this test.json does not name"
            changed = [n for n in present if old.get(key, {}).get(n, value[n]) != value[n]]
            if changed:
                return f"{len(changed)} image(s), e.g. {changed[0]}, were made for other prompts"
        elif key != "checkpoint" and old.get(key) != value:  # the same weights moved elsewhere are the same model
            return f"made with {key} {old.get(key)!r}, not {value!r}"
    return ""


def stage_label(model: LoadedModel, stage: str) -> str:
    """'reference', or the checkpoint's step ('2600' for unet_sch_2600), for output folder names."""
    return "reference" if stage == "reference" else model.path.name.replace("unet_sch_", "")


def generate(cfg: Config, device="cpu", out_dir=None, progress: bool = True) -> Path:
    """Generate one PNG per test.json entry into outputs/png_<reference|step>_<steps>[_dpmpp]/<image_name>.

    PNGs already there are kept, so an interrupted run resumes. `<folder>.json` beside the folder records the
    weights, the settings and the prompts; when they differ from this run's, the old folder (and its record)
    moves to `<folder>_prev_<time>/` and the images are made afresh: never mixed, never deleted.
    """
    s = cfg.sample
    entries = load_test_prompts(test_json_path(cfg))
    model = load_model(s.stage, cfg.train.output_dir, device, s.use_ema, s.sampler)
    suffix = "" if s.sampler == "ddim" else f"_{s.sampler}"
    out = Path(out_dir or Path(cfg.train.output_dir) / f"png_{stage_label(model, s.stage)}_{s.num_inference_steps}{suffix}").resolve()
    record_path, record = out.with_name(out.name + ".json"), generation_record(model, cfg, entries)
    if any(out.glob("*.png")):
        old = json.loads(record_path.read_text()) if record_path.is_file() else None
        why = "no record of how they were made" if old is None else record_difference(out, old, record)
        if why:
            aside = free_timestamped_path(out.with_name(f"{out.name}_prev"))
            out.rename(aside)
            if old is not None:
                record_path.rename(aside.with_name(aside.name + ".json"))
            print(f"note: {out.name} held images {why}: moved to {aside}")
    ensure_writable_dir(out)
    write_json_atomic(record_path, record)
    todo = [(i, name, prompt) for i, (name, prompt, _) in enumerate(entries) if not (out / name).exists()]
    start = time.time()
    images = generate_images(model, [p for _, _, p in todo], [s.sample_seed + i for i, _, _ in todo],
                             s.guidance_scale, s.num_inference_steps, s.eta, s.gen_batch_size, progress)
    size = model.cfg.data.image_size  # the resolution the model was trained at
    for (_, name, _), image in zip(todo, images):
        if image.size != (size, size):
            image = image.resize((size, size), resample=3)
        tmp = out / (name + ".tmp")
        image.save(tmp, format="PNG")
        tmp.replace(out / name)
    print(f"wrote {len(todo)} image(s) to {out} in {time.time() - start:.1f}s "
          f"({len(entries) - len(todo)} already there)")
    return out
