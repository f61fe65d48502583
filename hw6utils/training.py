"""Training: the UNet noise-prediction loop (one function, read top to bottom), checkpoints, and the small VAE."""
from __future__ import annotations

import contextlib
import csv
import datetime
import functools
import hashlib
import io
import json
import math
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling, compute_snr
from tqdm.auto import tqdm

from .checkpoints import checkpoint_name, ema_weights, list_checkpoints, read_best, save_checkpoint
from .config import Config, apply_overrides, load_config
from .data import (CourseData, ImageCaptionDataset, ensure_data, ensure_writable_dir, free_timestamped_path,
                   load_course_data, load_images, mirror_caption, write_json_atomic)
from .encoders import (encode_posterior, encode_text, load_text_encoder, load_vae, scale_latents,
                       text_hidden_size)
from .evaluation import image_grid, plot_history, training_scorer
from .models import amp_dtype, autocast, build_unet, build_vae, check_text_hidden_size, count_params, to_device
from .pipeline import unet_kwargs
from .sampling import LoadedModel, build_pipeline, generators, stop_on_interrupt


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False; use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {name!r}")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # so synchronize() and the memory figures measure this GPU, not GPU 0
    return device


def grad_scaler(device: torch.device, mixed_precision: str) -> torch.amp.GradScaler:
    """fp16's small exponent range lets small gradients underflow to 0: the scaler multiplies the loss before
    backward and divides the gradients again before the step (skipping steps whose gradients overflowed).
    For bf16 and fp32 it is disabled, and each of its calls passes straight through."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, mixed_precision) == torch.float16)


def precision_text(device: torch.device, mixed_precision: str) -> str:
    """What runs, for the start-of-training line: 'bf16', 'fp32', or fp16 and why."""
    dtype = amp_dtype(device, mixed_precision)
    if dtype == torch.float16:
        return "fp16 + GradScaler" + (" (this GPU has no bf16)" if mixed_precision == "bf16" else "")
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def make_noise_scheduler(cfg: Config):
    """The forward process q(x_t | x_0) the UNet learns to invert; saved beside every checkpoint. Flow matching's
    is a straight line to the noise, whose scheduler is also its sampler (Euler steps)."""
    if cfg.train.prediction_type == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.train.num_train_timesteps)
    return DDPMScheduler(num_train_timesteps=cfg.train.num_train_timesteps, beta_schedule=cfg.train.noise_schedule,
                         prediction_type=cfg.train.prediction_type, clip_sample=False)


@dataclass
class Prepared:
    """What training draws its batches from (`prepare_data` makes it): the data, both frozen encoders, the empty
    prompt's conditioning, and either the cache (every image's posterior and every caption encoded once) or, with
    cache_latents off, the raw images, read by `batches` and encoded at every step as the course's script did."""
    data: CourseData
    tokenizer: object
    text_model: torch.nn.Module
    vae: torch.nn.Module
    encode: Callable[[list], dict]       # prompts -> text conditioning ({"emb", "mask", "pooled"}), as configured
    null_text: dict                      # encode([""]): what a dropped caption becomes
    latent_mean: torch.Tensor | None = None  # cached: (views, N, C, h, w) posterior mean; view 1 = the flipped copy
    latent_std: torch.Tensor | None = None
    text_table: dict | None = None       # cached: every unique caption encoded, one row each
    caption_ids: list | None = None      # cached: [view][image] -> rows of text_table of its captions
    dataset: ImageCaptionDataset | None = None  # uncached: the images and captions...
    batches: Iterator | None = None      # ...and their endless micro-batches (image_batches; start_or_resume sets it)

    def batch(self, cfg: Config, generator: torch.Generator, device, shard: tuple = (0, 1)) -> tuple:
        """One micro-batch: (latents (B, C, h, w) scaled to unit variance, text conditioning dict).

        shard = (rank, world size): under torchrun every process draws the randomness of the whole global
        micro-batch (B x world) and keeps its own slice, so N processes see exactly what one process would.
        """
        if self.dataset is not None:
            return self.encode_batch(cfg, *next(self.batches), generator, device, shard)
        full, keep = shard_rows(cfg.train.batch_size, shard)
        mean, std = self.latent_mean, self.latent_std
        # the draws come from the CPU generator (reproducible anywhere); the cache may live on the GPU, and
        # to_device copies them there without making the CPU wait for the GPU
        idx = torch.randint(mean.shape[1], (full,), generator=generator)[keep]
        view = torch.randint(mean.shape[0], (full,), generator=generator)[keep]  # 1 = the flipped copy
        eps = torch.randn((full, *mean.shape[2:]), generator=generator)[keep]
        # z ~ q(z | x): a fresh draw from the frozen encoder's posterior each time the image is used
        on = mean.device
        pick = (to_device(view, on), to_device(idx, on))
        z = mean[pick] + std[pick] * to_device(eps, on)
        # one caption per image, drawn afresh among its key's given descriptions (mirrored for a flipped copy)
        choice = torch.randint(1 << 30, (full,), generator=generator)[keep].tolist()
        options = [self.caption_ids[v][i] for v, i in zip(view.tolist(), idx.tolist())]
        caption_ids = torch.tensor([ids[c % len(ids)] for ids, c in zip(options, choice)])
        caption_ids = to_device(caption_ids, on)
        text = {k: v[caption_ids].to(device) for k, v in self.text_table.items()}
        return scale_latents(self.vae, z.to(device)), text

    def encode_batch(self, cfg: Config, images, captions, generator: torch.Generator, device,
                     shard: tuple = (0, 1)) -> tuple:
        """Uncached: both frozen encoders on one drawn micro-batch of images and captions, as the course's script
        ran them at every step; returns what `batch` does."""
        full, keep = shard_rows(cfg.train.batch_size, shard)
        mean, std = encode_posterior(self.vae, images)  # on the VAE's device
        z = mean + std * to_device(torch.randn((full, *mean.shape[1:]), generator=generator)[keep], mean.device)
        text = {k: v.to(device) for k, v in self.encode(list(captions)).items()}
        return scale_latents(self.vae, z).to(device), text


def prepare_data(cfg: Config, device) -> Prepared:
    """Load the data and both frozen encoders; with cache_latents, encode every image and caption once."""
    data = load_course_data(ensure_data(cfg))
    tokenizer, text_model = load_text_encoder(cfg.encoders.text_encoder, device)
    check_text_hidden_size(cfg, text_hidden_size(text_model))  # fails before any encoding on a size mismatch
    vae = load_vae(cfg.encoders.vae, cfg.encoders.vae_subfolder, device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.data.image_size // factor != cfg.model.sample_size:
        raise ValueError(f"image_size {cfg.data.image_size} / VAE factor {factor} = {cfg.data.image_size // factor}"
                         f" latent pixels, but sample_size is {cfg.model.sample_size}; make them agree")

    def encode(prompts):
        e = cfg.encoders
        return encode_text(tokenizer, text_model, prompts, e.max_text_len, e.text_mask, e.add_token_embeddings)

    out = Prepared(data, tokenizer, text_model, vae, encode, null_text=encode([""]))
    if not cfg.train.cache_latents:
        out.dataset = ImageCaptionDataset(data, cfg.data.image_size, cfg.data.flip, cfg.train.seed, cfg.data.image_prep)
        return out
    start = time.time()
    latent_mean, latent_std = cache_latents(data, vae, cfg)
    views = [lambda c: c, mirror_caption] if cfg.data.flip else [lambda c: c]  # a flipped image: left <-> right
    unique = sorted({view(c) for view in views for options in data.captions.values() for c in options})
    index = {c: i for i, c in enumerate(unique)}
    text_table = cache_captions(unique, encode, text_model, cfg)
    # on a GPU the whole cache lives in GPU memory (the course set: ~1.4 GB of latents), so a batch is one gather
    keep_on = device if torch.device(device).type == "cuda" else "cpu"
    out.latent_mean, out.latent_std = latent_mean.to(keep_on), latent_std.to(keep_on)
    out.text_table = {k: v.to(keep_on) for k, v in text_table.items()}
    out.caption_ids = [[[index[view(c)] for c in data.captions[key]] for key in data.image_keys]
                       for view in views]  # [view][image] -> ids of its captions
    print(f"{len(data)} latents x{latent_mean.shape[0]} and {len(unique)} captions ready in {time.time() - start:.1f}s")
    return out


def cache_latents(data, vae, cfg: Config):
    """Posterior mean and std of every training image, (views, N, C, h, w); views = 2 with flips.

    Stored in <cache_dir>/latents_<hash>.safetensors, keyed by the image files (names, sizes, modification
    times), the VAE (name, config and weights), the resolution, the image prep and the flip setting: reused while
    all of these are unchanged, rebuilt when anything changed.
    """
    all_paths, all_keys = list(data.image_paths), list(data.image_keys)
    files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in all_paths]
    vae_config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    key = [files, cfg.encoders.vae, cfg.encoders.vae_subfolder, vae_config, weights_digest(vae),
           cfg.data.image_size, cfg.data.flip, cfg.data.image_prep]
    path = cache_path(cfg, "latents", key)
    saved = read_cache(path, {"mean", "std", "kept"}, "latent cache")
    if saved is None:
        images = load_images(data, cfg.data.image_size, cfg.data.image_prep)  # drops unreadable files, warning each
        readable = set(data.image_paths)
        kept = [i for i, p in enumerate(all_paths) if p in readable]
        views = [images, images.flip(-1)] if cfg.data.flip else [images]  # cache both orientations for flips
        means, stds = [], []
        for view in views:
            parts = [encode_posterior(vae, view[i:i + 32]) for i in range(0, len(view), 32)]
            means.append(torch.cat([m for m, _ in parts]).cpu())
            stds.append(torch.cat([s for _, s in parts]).cpu())
        saved = {"mean": torch.stack(means).contiguous(), "std": torch.stack(stds).contiguous(), "kept": torch.tensor(kept)}
        write_cache(path, saved)
    kept = saved["kept"].tolist()
    data.image_paths, data.image_keys = [all_paths[i] for i in kept], [all_keys[i] for i in kept]
    return saved["mean"], saved["std"]


def cache_captions(captions: list, encode, text_model, cfg: Config) -> dict:
    """{"emb", "mask", "pooled"} of every caption, in order: `encode` in chunks of 512, or read back from
    <cache_dir>/captions_<hash>.safetensors, keyed by the captions, the text encoder (name and weights) and the
    settings that change its output (max_text_len, text_mask, add_token_embeddings)."""
    e = cfg.encoders
    key = [hashlib.sha256(json.dumps(captions).encode()).hexdigest(), e.text_encoder, weights_digest(text_model),
           e.max_text_len, e.text_mask, e.add_token_embeddings]
    path = cache_path(cfg, "captions", key)
    saved = read_cache(path, {"emb", "mask", "pooled"}, "caption cache")
    if saved is None or len(saved["emb"]) != len(captions):
        chunks = [encode(captions[i:i + 512]) for i in range(0, len(captions), 512)]
        saved = {k: torch.cat([chunk[k] for chunk in chunks]).cpu().contiguous() for k in chunks[0]}
        write_cache(path, saved)
    return saved


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the exact bytes of every weight (~0.3 s for the SD VAE): a fine-tuned model saved under the same
    name and config gets another cache."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_path(cfg: Config, kind: str, key: list) -> Path:
    """<cache_dir>/<kind>_<hash of key>.safetensors (cache_dir '' = <output_dir>/cache); clears killed runs' tmp files."""
    folder = Path(cfg.train.cache_dir or Path(cfg.train.output_dir) / "cache")
    remove_orphan_tmp_files(folder)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return folder / f"{kind}_{digest}.safetensors"


def write_cache(path: Path, tensors: dict) -> None:
    """Write to <file>.<pid>.tmp, then rename: a reader never sees half a file, and runs sharing the folder (torchrun
    ranks, runs with one cache_dir) may write the same cache at once."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def read_cache(path: Path, names: set, what: str) -> dict | None:
    """The tensors of a cache file, or None if there is none. A damaged one (cut short by a full disk,
    overwritten) is named in a warning and None is returned, so that it is rebuilt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not path.is_file():
        return None
    try:
        saved = load_file(path)
    except (SafetensorError, OSError) as err:
        reason = str(err)
    else:
        if names <= set(saved):
            return saved
        reason = f"it holds {sorted(saved)}, not {', '.join(sorted(names))}"
    warnings.warn(f"{path}: unreadable {what} ({reason}); rebuilding it", stacklevel=3)
    return None


def remove_orphan_tmp_files(folder: Path) -> None:
    """Delete the <file>.<pid>.tmp files of killed runs. One whose process still runs (another torchrun rank
    writing the same cache) is left alone."""
    for tmp in folder.glob("*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 tests for it without sending anything)."""
    if os.name != "posix":  # os.kill would end the process on Windows: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def shard_rows(batch: int, shard: tuple) -> tuple:
    """(rows of the global micro-batch, the slice of them that is this process's) for shard = (rank, world size)."""
    rank, world = shard
    return batch * world, slice(rank * batch, (rank + 1) * batch)


def image_batches(dataset, cfg: Config, device, start: int = 0, shard: tuple = (0, 1)):
    """Endless (images, captions) micro-batches for training without the cache, read by a DataLoader.

    The order is a function of (seed, epoch) alone and a sample's flip and caption of (seed, epoch, index),
    so resuming at micro-batch `start` yields exactly the batches an unbroken run would have seen.
    """
    rank, world = shard
    batch = cfg.train.batch_size
    per_epoch = len(dataset) // (batch * world)
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} images are fewer than one global batch of {batch * world}")
    epoch, skip = divmod(start, per_epoch)
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.train.seed + epoch))
        # rows are global batches; this process takes its slice of each
        mine = order[:per_epoch * batch * world].view(per_epoch, world, batch)[:, rank]
        dataset.epoch = epoch
        cuda = device.type == "cuda"
        yield from torch.utils.data.DataLoader(dataset, batch_sampler=mine[skip:].tolist(),
                                               num_workers=4 if cuda else 0, pin_memory=cuda,
                                               worker_init_fn=ignore_sigint if cuda else None)
        epoch, skip = epoch + 1, 0


def ignore_sigint(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which finishes the step and saves a checkpoint
    (Ctrl-C signals the whole process group: a worker killed by it would break the step instead)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def init_distributed(device_name: str) -> tuple:
    """(rank, world size, device). Under `torchrun --nproc_per_node N` this joins the process group
    (NCCL on GPUs, gloo on CPU); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # rank 0 alone draws previews, scores and saves while the others wait in the next collective: allow it
        # more than the default 10 minutes (a hw6 checkpoint is ~4 GB, a FID evaluation generates images)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), world, device


def step_report(losses: list, interrupted: bool, world: int) -> tuple:
    """(the micro-batch losses as floats, averaged over processes; whether Ctrl-C was pressed in any process).

    Reading a GPU number makes the CPU wait until the GPU has caught up, so the loop reads once per step, all
    at once, rather than once per micro-batch. Under torchrun one all-reduce on the training device (NCCL has no
    CPU collectives) makes every process see the same losses and the same decision to stop.
    """
    flag = torch.full((1,), float(interrupted), device=losses[0].device)  # made on the device: no copy
    report = torch.cat([torch.stack(losses).float(), flag])
    if world > 1:
        dist.all_reduce(report)
    values = (report / world).tolist()
    return values[:-1], values[-1] > 0


def setup_unet(cfg: Config, text_hidden: int, device) -> tuple:
    """(unet, model, optimizer): a fresh UNet, the module the training step calls (unet itself, or its
    torch.compile'd wrapper sharing the same parameters) and AdamW, with the speed flags of cfg.train."""
    t = cfg.train
    if device.type == "cuda":  # TF32 for the fp32 matmuls outside autocast; cuDNN's TF32 convolutions stay on
        torch.backends.cuda.matmul.allow_tf32 = t.tf32  # (PyTorch's defaults: matmul off, cuDNN on)
    torch.manual_seed(t.seed)  # the UNet's initial weights (the same on every rank)
    unet = build_unet(cfg, text_hidden).to(device).train()
    if t.channels_last:
        unet.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=t.fused_adamw)
    return unet, (torch.compile(unet) if t.compile else unet), optimizer


@contextlib.contextmanager
def output_dir_lock(out_dir: Path):
    """Hold <out_dir>/train.lock for the block, so that a second training into the same folder stops at once instead
    of mixing its checkpoints and logs with this one's. It is an OS lock (filelock): the kernel lets go of it when
    the process ends, however it ends, so a killed run leaves no stale lock. train.lock.json beside it says who
    holds it, for the message. Under torchrun only rank 0 takes it."""
    from filelock import FileLock, Timeout
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    lock, holder = FileLock(out_dir / "train.lock", timeout=0), out_dir / "train.lock.json"
    try:
        lock.acquire()
    except Timeout:
        raise ValueError(f"{out_dir}: another training ({lock_holder(holder)}) is writing into this folder; wait "
                         "for it to end, stop it, or pick another --output_dir") from None
    try:
        holder.write_text(json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def lock_holder(holder: Path) -> str:
    """'pid 1234, started 2025-05-01 10:00:00' from train.lock.json ('pid unknown' while it is being written)."""
    try:
        info = json.loads(holder.read_text())
        return f"pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def holding_output_dir(train_fn):
    """Decorator: train() holds its output folder's lock (output_dir_lock) while it runs, and lets go of it on
    any exit, an exception included (a notebook can train again)."""
    @functools.wraps(train_fn)
    def locked(cfg: Config, *args, **kwargs):
        with output_dir_lock(ensure_writable_dir(cfg.train.output_dir)):
            return train_fn(cfg, *args, **kwargs)
    return locked


@dataclass
class Run:
    """Everything one training run holds: what `start_or_resume` builds and the loop of `train` reads."""
    cfg: Config
    prepared: Prepared          # data, encoders and (cached) latents: prepare_data's
    rank: int                   # this process under torchrun (0 of 1 without it)
    world: int
    device: torch.device
    out_dir: Path
    unet: torch.nn.Module       # the weights; `model` is what the step calls (compiled and/or DDP-wrapped unet)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: EMAModel | None
    scaler: torch.amp.GradScaler
    noise_scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler
    generator: torch.Generator  # every random draw of training (draw_batch), saved in each checkpoint
    null_text: dict             # the empty prompt's conditioning, for caption dropout
    scorer: object              # eval_metric's scorer (rank 0), or None
    start_step: int
    history: list
    window: list                # losses since the last log line
    resume_from: Path | None

    @property
    def main_process(self) -> bool:
        return self.rank == 0


@holding_output_dir
def train(cfg: Config, prepared: Prepared | None = None, progress: bool = True, reserve_steps: int = 0,
          spent: float = 0.0) -> list:
    """Train the UNet to predict the noise added to latents (DDPM, Ho et al. 2020, Algorithm 1). Returns history.

    Runs as one process, or as N under `torchrun --nproc_per_node N` (DistributedDataParallel): the global
    batch is then batch_size x grad_accum x N, and only rank 0 writes checkpoints, previews and logs.
    With time_budget, the run ends within that many minutes of this call, leaving reserve_steps' worth of time
    for what the caller does next (`hw6 demo` scores the model), and counting the `spent` seconds before it.
    """
    t = cfg.train
    started = time.time() - spent
    run = start_or_resume(cfg, prepared)
    if run.start_step >= t.max_steps:
        return run.history
    bar = tqdm(range(run.start_step, t.max_steps), initial=run.start_step, total=t.max_steps,
               disable=not (progress and run.main_process))
    pace = None  # (time, step) from which time_budget measures the pace, once the first steps are behind
    tick, timed = time.time(), 0  # timed: micro-batches since tick (the window may hold losses from before a resume)
    with stop_on_interrupt("finishing this step and saving a checkpoint") as interrupted:
        for step in bar:
            micro_losses = []
            for micro in range(t.grad_accum):
                batch = draw_batch(run.prepared, cfg, run.generator, run.device, (run.rank, run.world))
                # DDP: all-reduce the gradients only after the last micro-batch of the step
                sync = run.world == 1 or micro == t.grad_accum - 1
                with contextlib.nullcontext() if sync else run.model.no_sync():
                    loss = diffusion_loss(run.model, run.noise_scheduler, batch, run.null_text, cfg)
                    # divide by grad_accum so the summed gradients equal the big-batch mean
                    run.scaler.scale(loss / t.grad_accum).backward()
                micro_losses.append(loss.detach())  # kept on the device: reading it now would stall the GPU
            timed += t.grad_accum
            # the step's one GPU->CPU read: the losses (averaged over processes) and whether Ctrl-C was pressed
            losses, stop = step_report(micro_losses, interrupted(), run.world)
            if not all(map(math.isfinite, losses)):  # before the optimizer step: the weights stay finite
                raise FloatingPointError(f"loss is {next(x for x in losses if not math.isfinite(x))} at step {step + 1};"
                                         f" stopping ({kept_checkpoint(run.out_dir)}). Lower lr or check the data.")
            run.window += losses
            lr_used = optimizer_step(run)
            done = step + 1
            if t.time_budget and done - run.start_step == 5:  # the first steps allocate memory: not the pace
                pace = (time.time(), done)
            if pace and done - pace[1] >= 10 and done % 10 == 0:
                fit_to_time_budget(run, done, started, pace, reserve_steps, t.max_steps, bar)
            last = run.cfg.train.max_steps  # time_budget may have lowered it
            if done % t.log_freq == 0 or done == last:
                record = log_losses(run, done, lr_used, timed * t.batch_size * run.world / max(time.time() - tick, 1e-9))
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
                tick, timed = time.time(), 0
            evaluate_and_save(run, done, stop)
            if stop:
                if run.main_process:
                    print(f"stopped by Ctrl-C after step {done}, checkpoint saved in {run.out_dir / 'ckpt_last'}; resume "
                          f"with --ckpt_path last --output_dir {t.output_dir} (ckpt_path='last' in a notebook)")
                break
            if done == last:
                break
    finish(run)
    return run.history


def seconds_per_step(cfg: Config, prepared: Prepared, steps: int = 30) -> float:
    """This machine's pace for cfg's run: `steps` steps of it in a scratch folder, the last third timed (the first
    steps allocate memory). The run after it, sharing `prepared`, is the same as without it (its draws are its own)."""
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(io.StringIO()):
        probe = apply_overrides(cfg, output_dir=scratch, max_steps=steps, log_freq=max(steps // 3, 1), eval_freq=0,
                                eval_metric="", save_freq=steps, time_budget=0, ckpt_path="")
        history = train(probe, prepared, progress=False)
    return cfg.train.batch_size * cfg.train.grad_accum / history[-1]["images_per_s"]


def start_or_resume(cfg: Config, prepared: Prepared | None = None) -> Run:
    """A run at step 0 (an earlier run's files moved aside), or resumed from cfg.train.ckpt_path with everything its
    checkpoint saved: weights, EMA, optimizer, schedule, random state, history."""
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    rank, world, device = init_distributed(t.device)
    main_process = rank == 0
    out_dir = ensure_writable_dir(t.output_dir)
    if world > 1 and prepared is None:  # one process builds the shapes set (when missing) while the others wait
        if main_process:
            ensure_data(cfg)
        dist.barrier()
    prepared = prepared or prepare_data(cfg, device)
    unet, model, optimizer = setup_unet(cfg, text_hidden_size(prepared.text_model), device)
    # foreach: the EMA update is two fused kernels over all weights rather than three per weight tensor
    ema = EMAModel(unet.parameters(), decay=t.ema_decay, foreach=True) if t.ema_decay > 0 else None
    run = Run(cfg, prepared, rank, world, device, out_dir, unet, model, optimizer, lr_schedule(optimizer, t), ema,
              grad_scaler(device, t.mixed_precision), make_noise_scheduler(cfg), torch.Generator().manual_seed(t.seed),
              {k: v.to(device) for k, v in prepared.null_text.items()},
              training_scorer(cfg) if main_process else None,  # loads its networks now: a missing file fails early
              0, [], [], resolve_resume(t.ckpt_path, out_dir) if t.ckpt_path else None)
    if run.resume_from is not None:
        run.start_step, run.history, run.window = load_training_state(
            run.resume_from, unet, ema, optimizer, run.generator, t.lr, t.weight_decay, run.scaler)
        run.lr_scheduler = lr_schedule(optimizer, t, last_epoch=run.start_step - 1)  # where the step is on t's schedule
        if run.start_step >= t.max_steps:
            if main_process:
                print(f"nothing to train: the checkpoint is at step {run.start_step} and max_steps is {t.max_steps}")
            return run
        saved_steps = load_config(run.resume_from / "hw6_config.json").train.max_steps
        if saved_steps != t.max_steps and t.lr_schedule != "constant" and main_process:
            rate = run.lr_scheduler.get_last_lr()[0]
            print(f"note: max_steps {saved_steps} -> {t.max_steps}: the {t.lr_schedule} schedule now ends at step "
                  f"{t.max_steps}, so the learning rate at step {run.start_step} is {rate:.3g}")
        if main_process:  # rows that a run which went on logged after this checkpoint are logged again now
            for log in (out_dir / "loss_log.csv", out_dir / "eval_log.csv"):
                truncate_csv(log, run.start_step)
    elif main_process:
        archive_previous_run(out_dir)
    if prepared.dataset is not None:
        prepared.batches = image_batches(prepared.dataset, cfg, device, run.start_step * t.grad_accum, (rank, world))
    if world > 1:  # averages gradients across processes during backward
        run.model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if main_process:
        print(f"training {cfg.preset}: UNet {count_params(unet) / 1e6:.2f}M params, {len(prepared.data)} images, "
              f"effective batch {t.batch_size} x {t.grad_accum}" + (f" x {world} processes" if world > 1 else "") +
              f" = {t.batch_size * t.grad_accum * world}, steps {run.start_step} -> {t.max_steps}, "
              f"{precision_text(device, t.mixed_precision)} on {device}")
    return run


def lr_schedule(optimizer, t, last_epoch: int = -1):
    """diffusers' schedule of t.lr_schedule over t.max_steps (after last_epoch steps, when it is rebuilt mid-run)."""
    # diffusers' plain "constant" ignores the warm-up; "constant_with_warmup" is the constant rate after it
    return get_scheduler("constant_with_warmup" if t.lr_schedule == "constant" else t.lr_schedule, optimizer,
                         num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps, last_epoch=last_epoch)


def fit_to_time_budget(run: Run, done: int, started: float, pace: tuple, reserve_steps: int, asked: int,
                       bar=None) -> None:
    """Lower (or raise again, up to the asked max_steps) run.cfg's max_steps to the steps that end training within
    time_budget minutes of `started`, at the seconds per step measured since pace = (time, step), keeping
    reserve_steps' worth of time free after it; the learning-rate schedule is rebuilt to end at the new last step.
    Under torchrun every process takes the smallest fit, so that all stop at the same step."""
    now = time.time()
    per_step = (now - pace[0]) / (done - pace[1])
    fit = min(max(done + steps_that_fit(run.cfg.train.time_budget, now - started, per_step, reserve_steps), done), asked)
    if run.world > 1:
        agreed = torch.tensor([fit], device=run.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        fit = int(agreed.item())
    before = run.cfg.train.max_steps
    if fit == before:
        return
    run.cfg = apply_overrides(run.cfg, max_steps=fit)
    run.lr_scheduler = lr_schedule(run.optimizer, run.cfg.train, last_epoch=done - 1)
    if bar is not None:
        bar.total = fit
        bar.refresh()
    if run.main_process and before == asked:  # the first time the budget binds
        print(f"time_budget {run.cfg.train.time_budget:g} min: at {1 / per_step:.1f} steps/s, training ends at step "
              f"{fit} of {asked} (the learning-rate schedule ends there too)")


def steps_that_fit(time_budget: float, elapsed: float, per_step: float, reserve_steps: int) -> int:
    """Steps that still fit in time_budget minutes once `elapsed` seconds have gone, at per_step seconds a step,
    keeping reserve_steps' worth of time free (negative where not even the reserve fits)."""
    return int((time_budget * 60 - elapsed) / per_step) - reserve_steps


def optimizer_step(run: Run) -> float:
    """Clip the gradients, step, clear them, update the EMA; returns the learning rate the step used."""
    if run.cfg.train.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients (fp16 only; otherwise a no-op)
        torch.nn.utils.clip_grad_norm_(run.unet.parameters(), run.cfg.train.grad_clip)
    lr_used = run.lr_scheduler.get_last_lr()[0]
    run.scaler.step(run.optimizer)  # optimizer.step(), unless fp16 gradients overflowed
    run.scaler.update()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(run.unet.parameters())
    return lr_used


def log_losses(run: Run, done: int, lr_used: float, images_per_s: float) -> dict:
    """One row of the history (and of loss_log.csv): the mean loss since the last row."""
    record = {"step": done, "loss": sum(run.window) / len(run.window), "lr": lr_used, "images_per_s": images_per_s}
    run.history.append(record)
    if run.main_process:
        append_csv(run.out_dir / "loss_log.csv", record)
    run.window = []
    return record


def evaluate_and_save(run: Run, done: int, stop: bool) -> None:
    """Every eval_freq steps a preview grid (and the eval_metric score, best.json when it is the best so far); every
    save_freq steps, at the end, on Ctrl-C and at a new best a checkpoint. Rank 0 alone."""
    t = run.cfg.train
    if not run.main_process:
        return
    new_best = None
    if t.eval_freq and (done % t.eval_freq == 0 or done == t.max_steps):
        save_preview(run.unet, run.ema, run.noise_scheduler, run.prepared, run.cfg,
                     run.out_dir / "samples_last" / f"step_{done}.png")
        if run.scorer is not None:
            new_best = score_checkpoint(run.scorer, run.unet, run.ema, run.noise_scheduler, run.prepared, run.cfg,
                                        run.out_dir, done)
    if done % t.save_freq == 0 or done == t.max_steps or stop or new_best:
        best = read_best(run.out_dir / "ckpt_last")
        save_checkpoint(run.out_dir, done, run.unet, run.ema, run.optimizer, run.noise_scheduler,
                        run.cfg, run.generator, run.history, protect={run.resume_from, best and best["path"]},
                        window=run.window, scaler=run.scaler)
        if new_best:  # written after its checkpoint is complete
            write_json_atomic(run.out_dir / "ckpt_last" / "best.json", new_best)


def finish(run: Run) -> None:
    """history.json and the loss curve (rank 0); under torchrun no process leaves before rank 0 has saved."""
    if run.main_process:
        (run.out_dir / "history.json").write_text(json.dumps(run.history))
        if run.history:
            plot_history(run.history, run.out_dir / "loss.png")
    if run.world > 1:
        dist.barrier()


def kept_checkpoint(out_dir: Path) -> str:
    """What is left to resume from when training stops on an error, for its message."""
    found = list_checkpoints(out_dir / "ckpt_last")
    return f"the last checkpoint, {found[-1]}, is kept" if found else "no checkpoint was saved yet"


def sampling_model(cfg: Config, unet, schedule_config, prepared: Prepared, path) -> LoadedModel:
    """The UNet being trained (or benchmarked) in a pipeline with its schedule's sampler and the loaded encoders,
    ready for `generate_images`."""
    pipe = build_pipeline(cfg, unet, prepared.vae, prepared.tokenizer, prepared.text_model, schedule_config,
                          cfg.sample.sampler)
    return LoadedModel(pipe, cfg, Path(path))


@torch.no_grad()
def score_checkpoint(scorer, unet, ema, noise_scheduler, prepared, cfg: Config, out_dir: Path, step: int):
    """Score the EMA weights with cfg.train.eval_metric; log the figures to eval_log.csv beside the loss log.
    Returns the new best.json content if this step beats the best so far, else None."""
    unet.eval()
    with ema_weights(unet, ema):
        figures = scorer(sampling_model(cfg, unet, noise_scheduler.config, prepared, out_dir))
    unet.train()
    append_csv(out_dir / "eval_log.csv", {"step": step, **figures})
    best = read_best(out_dir / "ckpt_last")
    print(f"step {step}: {cfg.train.eval_metric} " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()) +
          (f" (best so far: step {best['step']})" if best else ""))
    if best is None or figures["score"] > best["score"]:
        return {"step": step, "checkpoint": checkpoint_name(step), "metric": cfg.train.eval_metric, **figures}
    return None


def draw_batch(prepared: Prepared, cfg: Config, generator: torch.Generator, device, shard: tuple = (0, 1)) -> dict:
    """Every random draw of one micro-batch, in one place: x_0 ~ q(x_0) and its caption (Prepared.batch), then which
    captions are dropped, eps ~ N(0, I) and t ~ Uniform({0, ..., T-1}) (or timestep_sampling's density; noise_draws),
    and with text_noise the jitter of the caption's token states. All come from `generator`."""
    latents, text = prepared.batch(cfg, generator, device, shard)
    drop, noise, timesteps = noise_draws(cfg, latents.shape, generator, shard)
    on = latents.device
    if cfg.train.text_noise > 0:  # jittered token states (NEFTune, Jain et al. 2023): an unseen word near a known one
        emb = text["emb"]         # is read like it
        full, keep = shard_rows(emb.shape[0], shard)
        jitter = torch.randn((full, *emb.shape[1:]), generator=generator)[keep]
        text = dict(text, emb=emb + cfg.train.text_noise * to_device(jitter, emb.device))
    return {"latents": latents, "text": text, "drop": to_device(drop, on), "noise": to_device(noise, on),
            "timesteps": to_device(timesteps, on)}


def noise_draws(cfg: Config, latent_shape, generator: torch.Generator, shard: tuple = (0, 1)) -> tuple:
    """(drop, noise, timesteps) for a micro-batch of latents of latent_shape, on the CPU. shard = (rank, world size):
    as in Prepared.batch, draw for the global batch and keep this process's slice."""
    batch = latent_shape[0]
    full, keep = shard_rows(batch, shard)
    drop = torch.rand(full, generator=generator)[keep] < cfg.train.cond_drop_prob
    noise = torch.randn((full, *latent_shape[1:]), generator=generator)[keep]
    steps, flow = cfg.train.num_train_timesteps, cfg.train.prediction_type == "flow"  # flow: t/T = s in (0, 1)
    if cfg.train.timestep_sampling == "uniform":
        timesteps = torch.rand(full, generator=generator) * steps if flow else \
            torch.randint(0, steps, (full,), generator=generator)
    else:  # SD3's logit-normal density of t/T (Esser et al. 2024)
        u = compute_density_for_timestep_sampling("logit_normal", full, logit_mean=cfg.train.timestep_mean,
                                                  logit_std=cfg.train.timestep_std, generator=generator)
        timesteps = u * steps if flow else (u * steps).long().clamp(max=steps - 1)
    return drop, noise, timesteps[keep]


def diffusion_loss(unet, noise_scheduler, batch: dict, null_text: dict, cfg: Config) -> torch.Tensor:
    """The training loss of one micro-batch (DDPM, Ho et al. 2020, Algorithm 1), with caption dropout and min-SNR
    (or flow matching's, Lipman et al. 2023, as SD3 trains it).
    batch: draw_batch's latents x_0, text, drop, noise eps and timesteps t."""
    t = cfg.train
    latents, noise, timesteps, drop = batch["latents"], batch["noise"], batch["timesteps"], batch["drop"]
    # caption dropout: replace a fraction of captions by "" so the same UNet learns eps(x_t, t, empty)
    text = {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), null_text[k].expand_as(v), v)
            for k, v in batch["text"].items()}
    if t.prediction_type == "flow":  # flow matching: x_s = (1 - s) x_0 + s eps, a straight line; s = t/T
        s = (timesteps / t.num_train_timesteps).view(-1, 1, 1, 1)
        noisy_latents = (1 - s) * latents + s * noise
        target = noise - latents  # its velocity dx_s/ds, the same all along the line
    else:  # x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        # eps, or v = sqrt(alpha_bar_t) * eps - sqrt(1 - alpha_bar_t) * x_0
        target = noise if t.prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    if t.channels_last:
        noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
    with autocast(latents.device, t.mixed_precision):
        noise_pred = unet(noisy_latents, timesteps, **unet_kwargs(unet, text, cfg.encoders.text_mask)).sample
    loss = F.mse_loss(noise_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (loss * loss_weights(noise_scheduler, timesteps, t.snr_gamma, t.prediction_type, t.snr_floor)).mean()


def loss_weights(noise_scheduler, timesteps, snr_gamma: float, prediction_type: str, snr_floor: float = 0.0):
    """Min-SNR-gamma weighting (Hang et al. 2023): w_t = min(SNR_t, gamma) / SNR_t for eps (/(SNR_t + 1) for v).

    Each is min(SNR_t, gamma) on the x_0 error: ||eps_hat - eps||^2 = SNR ||x0_hat - x0||^2 and ||v_hat - v||^2 =
    (SNR + 1) ||x0_hat - x0||^2. It stops the many easy, low-noise timesteps from dominating the loss; gamma = 0
    gives plain MSE. snr_floor (v only) keeps the x_0 weight of the noisiest steps from vanishing with their SNR:
    clamp(SNR_t, snr_floor, gamma) / (SNR_t + 1) (Salimans & Ho's truncated SNR is max(SNR_t, 1)).
    """
    if snr_gamma <= 0 or prediction_type == "flow":
        return torch.ones(timesteps.shape, device=timesteps.device)
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    if prediction_type == "v_prediction":
        return torch.clamp(clipped, min=snr_floor) / (snr + 1)
    return clipped / snr


def truncate_csv(path: Path, step: int) -> None:
    """Drop the rows of a log after `step` (kept in <log>.bak), so that a resume does not log a step twice."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if line.split(",", 1)[0].isdigit()  # (a torn last line goes)
                        and int(line.split(",", 1)[0]) <= step]
    if len(kept) < len(lines):
        path.with_name(path.name + ".bak").write_text("".join(lines))
        path.write_text("".join(kept))


def append_csv(path: Path, record: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(record))
        if new:
            writer.writeheader()
        writer.writerow(record)


def preview_prompts(prepared: Prepared, count: int = 8) -> list:
    """Fixed prompts for the training previews: the first captions of evenly spaced keys."""
    keys = sorted(prepared.data.captions)
    step = max(len(keys) // count, 1)
    return [prepared.data.captions[k][0] for k in keys[::step][:count]]


@torch.no_grad()
def save_preview(unet, ema, noise_scheduler, prepared, cfg: Config, path: Path) -> None:
    """A seeded grid of the fixed preview prompts, sampled with the EMA weights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prompts = preview_prompts(prepared)
    unet.eval()
    with ema_weights(unet, ema):
        pipe = sampling_model(cfg, unet, noise_scheduler.config, prepared, path).pipe
        images = pipe(prompts, num_inference_steps=min(cfg.sample.num_inference_steps, 25),
                      guidance_scale=cfg.sample.preview_guidance_scale, generator=generators(range(len(prompts)))).images
    unet.train()
    image_grid(images, cols=8).save(path)


def archive_previous_run(out_dir: Path) -> None:
    """A fresh run moves an earlier run's checkpoints and loss log into ckpt_prev_<time>/ (nothing is deleted),
    so that 'last' always means this run's newest checkpoint."""
    previous = [p for p in (out_dir / "ckpt_last", out_dir / "loss_log.csv", out_dir / "eval_log.csv",
                            out_dir / "samples_last", out_dir / "history.json", out_dir / "loss.png") if p.exists()]
    if not previous:
        return
    archive = free_timestamped_path(out_dir / "ckpt_prev")
    archive.mkdir(parents=True)
    for path in previous:
        path.rename(archive / path.name)
    print(f"starting fresh: the previous run's checkpoints and loss log were moved to {archive}")


def resolve_resume(ckpt_path: str, out_dir: Path) -> Path:
    """The checkpoint to resume from ('last': the newest in <out_dir>/ckpt_last/), its files checked first."""
    if ckpt_path == "last":
        found = list_checkpoints(out_dir / "ckpt_last")
        if not found:
            raise FileNotFoundError(f"{out_dir / 'ckpt_last'}: ckpt_path='last' but no complete checkpoint is there")
        check_intact(found[-1])
        return found[-1]
    path = Path(ckpt_path)
    if not (path / "training_state.pt").is_file() or not (path / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: ckpt_path must be a checkpoint folder with "
                                "diffusion_pytorch_model.safetensors and training_state.pt")
    check_intact(path)
    return path


RESUME_FILES = ("diffusion_pytorch_model.safetensors", "ema/diffusion_pytorch_model.safetensors", "training_state.pt")


def damaged_file(path: Path) -> tuple | None:
    """(file, why) for the first file a resume needs that is cut short or not what its name says; None if all are
    whole. Cheap: reads the safetensors headers and the zip index at the end of training_state.pt (torch's format)."""
    import zipfile

    from safetensors import SafetensorError, safe_open
    for name in RESUME_FILES:
        file = path / name
        if not file.is_file():
            if name.startswith("ema/"):  # trained without EMA (ema_decay 0)
                continue
            return file, "missing"
        try:
            if file.suffix == ".safetensors":
                with safe_open(file, framework="pt"):
                    pass
            else:
                zipfile.ZipFile(file).close()
        except (SafetensorError, zipfile.BadZipFile, OSError) as err:
            return file, str(err)
    return None


def check_intact(path: Path) -> None:
    """A one-line error naming the damaged file of checkpoint `path` and the newest intact checkpoint beside it."""
    damage = damaged_file(path)
    if damage is None:
        return
    intact = [p for p in list_checkpoints(path.parent) if p != path and damaged_file(p) is None]
    advice = (f"resume from the newest intact checkpoint: --ckpt_path {intact[-1]}" if intact
              else "no intact checkpoint is left beside it: start afresh without --ckpt_path")
    raise ValueError(f"{damage[0]}: truncated or corrupt ({damage[1]}); {advice}")


def load_training_state(path: Path, unet, ema, optimizer, generator, lr: float | None = None,
                        weight_decay: float | None = None, scaler=None) -> tuple:
    """Restore everything save_checkpoint wrote but the learning-rate schedule, which the caller rebuilds at the
    saved step (lr_schedule); returns (step, history, losses not yet logged).

    lr and weight_decay, when given, replace the saved ones (a resume with a new --lr uses it from the next step,
    along the same schedule: the schedule scales each group's initial_lr)."""
    from diffusers import UNet2DConditionModel

    saved = UNet2DConditionModel.from_pretrained(path, torch_dtype=torch.float32)
    def plain(config):  # JSON round trip: tuples and lists compare equal; private keys are ignored
        return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))

    saved_config, preset_config = plain(saved.config), plain(unet.config)
    if saved_config != preset_config:
        diff = sorted(k for k in preset_config if saved_config.get(k) != preset_config.get(k))
        raise ValueError(f"{path}: the checkpoint's UNet config differs from the preset in {diff}")
    unet.load_state_dict(saved.state_dict())
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    saved_lr, saved_wd = optimizer.param_groups[0]["initial_lr"], optimizer.param_groups[0]["weight_decay"]
    if (lr is not None and lr != saved_lr) or (weight_decay is not None and weight_decay != saved_wd):
        print(f"resuming with lr {lr if lr is not None else saved_lr:g} (saved {saved_lr:g}) and weight decay "
              f"{weight_decay if weight_decay is not None else saved_wd:g} (saved {saved_wd:g})")
    for group in optimizer.param_groups:
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
        if lr is not None:
            group["initial_lr"] = lr
    if ema is not None:
        ema_unet = UNet2DConditionModel.from_pretrained(path / "ema", torch_dtype=torch.float32)
        # laid out like the UNet's own weights (channels_last too), so the foreach update keeps its fast path
        ema.shadow_params = [torch.empty_like(q).copy_(p) for q, p in zip(unet.parameters(), ema_unet.parameters())]
        ema.optimization_step = state["ema_optimization_step"]
    if scaler is not None and scaler.is_enabled() and state.get("grad_scaler"):  # fp16: go on at the learned scale
        scaler.load_state_dict(state["grad_scaler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resumed from {path} at step {state['step']}")
    return state["step"], list(state["history"]), list(state.get("loss_window", []))


# ----------------------------------------------------------------------------------------------- the small VAE
def train_vae(cfg: Config, progress: bool = True) -> Path:
    """Train the small offline AutoencoderKL on the training images; save it with save_pretrained.

    Loss: MSE + 0.5 L1 reconstruction + a tiny KL (keeps the posterior near N(0, I) without blurring).
    The per-channel mean/std of the latents is stored in the config (latents_mean/latents_std) so that
    the UNet sees unit-variance latents.
    """
    v = cfg.vae
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = pick_device(cfg.train.device)
    images = load_images(load_course_data(ensure_data(cfg)), cfg.data.image_size, cfg.data.image_prep)
    torch.manual_seed(cfg.train.seed)
    vae = build_vae(cfg).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=v.vae_lr, weight_decay=0.0)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=min(100, v.vae_steps // 10),
                                 num_training_steps=v.vae_steps)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    scaler = grad_scaler(device, cfg.train.mixed_precision)
    print(f"training the VAE: {count_params(vae) / 1e6:.2f}M params, {len(images)} images, {v.vae_steps} steps, "
          f"{precision_text(device, cfg.train.mixed_precision)}")
    bar = tqdm(range(v.vae_steps), disable=not progress)
    for _ in bar:
        batch = images[torch.randint(len(images), (v.vae_batch_size,), generator=generator)].to(device)
        with autocast(device, cfg.train.mixed_precision):
            posterior = vae.encode(batch).latent_dist
            recon = vae.decode(posterior.sample(generator=None)).sample
        recon = recon.float()
        loss = F.mse_loss(recon, batch) + 0.5 * F.l1_loss(recon, batch) + v.vae_kl_weight * posterior.kl().mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i:i + 256].to(device)).latent_dist.mean.float().cpu()
                           for i in range(0, len(images), 256)])
        check = images[:256].to(device)
        recon = vae.decode(vae.encode(check).latent_dist.mean).sample.float().clamp(-1, 1)
        psnr = 10 * math.log10(4.0 / F.mse_loss(recon, check).item())
    vae.register_to_config(latents_mean=means.mean(dim=(0, 2, 3)).tolist(), latents_std=means.std(dim=(0, 2, 3)).tolist(),
                           scaling_factor=1.0)
    out = Path(v.vae_out)
    vae.save_pretrained(out)
    print(f"VAE saved to {out}: reconstruction PSNR {psnr:.1f} dB on 256 training images")
    return out
