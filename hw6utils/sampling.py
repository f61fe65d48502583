"""Sampling: load a checkpoint as an `HW6Pipeline`, generate images with it, and fill a folder from a test.json.

Every route that makes images (generate, evaluate, sweep, the explorer, training previews and scoring) calls
the pipeline (`hw6utils/pipeline.py`). Its sampler is always built from the noise schedule saved beside the
checkpoint, i.e. the schedule the UNet was trained with (the original course scripts trained with linear betas
and sampled with Stable Diffusion's scaled-linear ones: a silent mismatch).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from .checkpoints import checkpoint_step, is_stable_diffusion, resolve_checkpoint
from .config import Config, load_config, test_json_path
from .data import ensure_writable_dir, free_timestamped_path, load_test_prompts, write_json_atomic
from .encoders import load_text_encoder, load_vae
from .models import amp_dtype
from .pipeline import HW6Pipeline


def make_sampler(schedule_config: dict, kind: str = "ddim", stable_diffusion: bool = False):
    """A sampler with exactly the betas of training: 'ddim' (DDIMScheduler) or 'dpmpp' (DPM-Solver++, fewer steps).

    DDIM uses 'leading' spacing (the first step at t = T - T/steps, e.g. 980 of 1000) rather than 'trailing'
    (t = 999): with the cosine schedule alpha_bar_999 is ~2e-9, and the predicted x_0 = (x_t - sqrt(1 - alpha_bar)
    eps) / sqrt(alpha_bar) would multiply any error in eps by ~20,000 on the very first step. DPM-Solver++
    clips lambda = log(alpha / sigma) at -5.1 for the same reason (diffusers' advice for cosine schedules).
    stable_diffusion: DDIM as Stable Diffusion writes it (steps_offset 1, set_alpha_to_one false), so that
    `StableDiffusionPipeline` samples an exported model exactly as the project does.
    A flow-matching model (its schedule a FlowMatchEulerDiscreteScheduler's) samples by Euler steps along its
    velocity, what DDIM's deterministic step is for the other models: 'ddim' gives it that scheduler.
    """
    if "shift" in schedule_config and "beta_schedule" not in schedule_config:  # sigmas, no betas
        if kind != "ddim":
            raise ValueError(f"sampler {kind!r} does not sample a flow-matching model; use 'ddim' (its Euler steps)")
        return FlowMatchEulerDiscreteScheduler.from_config(schedule_config)
    if kind == "ddim":
        sd = {"steps_offset": 1, "set_alpha_to_one": False} if stable_diffusion else {}
        return DDIMScheduler.from_config(schedule_config, timestep_spacing="leading", clip_sample=False, **sd)
    if kind == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(schedule_config, algorithm_type="dpmsolver++",
                                                       solver_order=2, lambda_min_clipped=-5.1)
    raise ValueError(f"sampler must be 'ddim' or 'dpmpp', got {kind!r}")


def build_pipeline(cfg: Config, unet, vae, tokenizer, text_encoder, schedule_config: dict,
                   sampler: str = "ddim") -> HW6Pipeline:
    """An HW6Pipeline around loaded (or training) modules, conditioned and sampled as `cfg` says."""
    scheduler = make_sampler(schedule_config, sampler, is_stable_diffusion(cfg))
    pipe = HW6Pipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                       text_mask=cfg.encoders.text_mask, max_text_len=cfg.encoders.max_text_len,
                       add_token_embeddings=cfg.encoders.add_token_embeddings,
                       guidance_scale=cfg.sample.guidance_scale)
    pipe.set_progress_bar_config(disable=True)  # the callers show their own bars, per batch of images
    return pipe


@dataclass
class LoadedModel:
    """A checkpoint ready to sample: its pipeline, the config it was trained with, and its folder."""
    pipe: HW6Pipeline
    cfg: Config
    path: Path

    def encode(self, prompts) -> dict:
        return self.pipe.encode_prompt(prompts)

    @property
    def steps(self) -> int:
        """Training steps behind these weights: the checkpoint's step (unet_sch_<step>), else the config's max_steps
        (an exported model, such as the reference)."""
        step = checkpoint_step(self.path)
        return step if step is not None else self.cfg.train.max_steps


def load_model(stage: str = "reference", output_dir: str = "outputs", device="cpu", use_ema: bool = True,
               sampler: str = "ddim") -> LoadedModel:
    """Load a checkpoint (its EMA weights by default) or a pipeline folder as a pipeline, with the noise schedule
    and the encoders it was trained with. On a GPU the UNet runs in the precision it was trained in."""
    path = resolve_checkpoint(stage, output_dir)
    cfg = load_config(path / "hw6_config.json")
    device = torch.device(device)
    if (path / "model_index.json").is_file():  # a pipeline folder: the shipped reference, an export
        unet_dir, schedule_path, vae_name = path / "unet", path / "scheduler" / "scheduler_config.json", str(path / "vae")
        text_name = str(path) if (path / "text_encoder").is_dir() else cfg.encoders.text_encoder
        vae_subfolder = ""
    else:
        unet_dir = path / "ema" if use_ema and (path / "ema").is_dir() else path
        schedule_path, vae_name, vae_subfolder = path / "scheduler" / "scheduler_config.json", cfg.encoders.vae, cfg.encoders.vae_subfolder
        text_name = cfg.encoders.text_encoder
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no UNet in the checkpoint (config.json in it, ema/ or unet/)")
    try:
        schedule = json.loads(schedule_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{schedule_path}: cannot read the noise schedule ({err})") from None
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32).to(device).eval()
    inference_dtype(unet, device, cfg.train.mixed_precision)
    tokenizer, text_model = load_text_encoder(text_name, device)
    vae = load_vae(vae_name, vae_subfolder, device)
    return LoadedModel(build_pipeline(cfg, unet, vae, tokenizer, text_model, schedule, sampler), cfg, path)


def inference_dtype(unet, device: torch.device, mixed_precision: str):
    """The UNet as `hw6 generate` runs it: on CUDA in the training's precision (bf16, or fp16 on GPUs without bf16),
    its weights cast in place; on the CPU in float32."""
    dtype = amp_dtype(device, mixed_precision) if device.type == "cuda" else None
    return unet.to(dtype) if dtype is not None else unet


def generators(seeds: list) -> list:
    """One CPU generator per image: image i depends on seeds[i] alone, whatever else is in its batch."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def generate_batches(model: LoadedModel, prompts: list, seeds: list, *, guidance_scale: float | None = None,
                     num_inference_steps: int | None = None, eta: float = 0.0, batch_size: int = 32,
                     progress: bool = True, callback=None):
    """Yield (start index, PIL images) batch by batch; image i uses seeds[i]. guidance_scale and
    num_inference_steps default to the model's own (its config). callback(step, total) runs after each step."""
    steps = num_inference_steps or model.cfg.sample.num_inference_steps

    def on_step(pipe, i, t, tensors):
        callback(i + 1, steps)
        return {}
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, disable=not progress or len(batches) < 2, desc="generating"):
        images = model.pipe(prompts[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale,
                            generator=generators(seeds[start:start + batch_size]), eta=eta,
                            callback_on_step_end=on_step if callback else None).images
        yield start, images


def generate_images(model: LoadedModel, prompts: list, seeds: list, **kwargs) -> list:
    """Prompts -> PIL images, in batches; image i uses seeds[i] (the keyword arguments of generate_batches)."""
    return [image for _, images in generate_batches(model, prompts, seeds, **kwargs) for image in images]


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
    step = checkpoint_step(model.path)
    return "reference" if stage == "reference" or step is None else str(step)


def image_is_complete(path: Path, size: int) -> bool:
    """Whether a PNG already in the folder decodes whole at the model's resolution (a 0-byte or torn file from a
    killed run, or one of another size, is made again)."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()
            return image.size == (size, size)
    except (OSError, ValueError, SyntaxError):
        return False


@contextlib.contextmanager
def stop_on_interrupt(finishing: str):
    """First Ctrl-C: say `finishing` (what the loop completes before it stops) and let the loop stop there; a second
    Ctrl-C stops at once. Yields a function: was Ctrl-C pressed? (Signals reach the main thread only: elsewhere it
    always says no.) Training finishes its step and saves a checkpoint; generation finishes its batch."""
    hit = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if hit:
            raise KeyboardInterrupt
        hit.append(signum)
        print(f"\nCtrl-C: {finishing} (press again to stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


def generate(cfg: Config, device="cpu", out_dir=None, progress: bool = True) -> Path:
    """Generate one PNG per test.json entry into outputs/png_<reference|step>_<steps>[_dpmpp]/<image_name>.

    Each batch's PNGs are written (atomically) as soon as the batch is done, so an interrupted run keeps them and
    a rerun makes only the missing ones; a PNG there that does not decode, or has the wrong size, is made again.
    Ctrl-C finishes the batch and stops. `<folder>.json` beside the folder records the weights, the settings and
    the prompts; when they differ from this run's, the old folder (and its record) moves to `<folder>_prev_<time>/`
    and the images are made afresh: never mixed, never deleted.
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
    size = model.cfg.data.image_size  # the resolution the model was trained at
    todo = [(i, name, prompt) for i, (name, prompt, _) in enumerate(entries) if not image_is_complete(out / name, size)]
    start, written = time.time(), 0
    with stop_on_interrupt("finishing this batch and writing its images") as interrupted:
        batches = generate_batches(model, [p for _, _, p in todo], [s.sample_seed + i for i, _, _ in todo],
                                   guidance_scale=s.guidance_scale, num_inference_steps=s.num_inference_steps, eta=s.eta,
                                   batch_size=s.gen_batch_size, progress=progress)
        for first, images in batches:
            for (_, name, _), image in zip(todo[first:first + len(images)], images):
                tmp = out / (name + ".tmp")
                image.save(tmp, format="PNG")
                tmp.replace(out / name)
            written += len(images)
            if interrupted():
                break
    done = len(entries) - len(todo) + written
    print(f"wrote {written} image(s) to {out} in {time.time() - start:.1f}s ({len(entries) - len(todo)} already there)")
    if written < len(todo):
        print(f"stopped by Ctrl-C: {done} of {len(entries)} images are done; run the same command again to make the "
              f"other {len(entries) - done}")
    return out
