"""Speed and memory of one preset on this machine, printed as numbers (ratios measured in the same run).

    .venv/bin/python bench/bench.py                 # tiny preset, CPU
    .venv/bin/python bench/bench.py --preset hw6    # needs the hub weights (or local paths) and a GPU

Prints: parameter count; training images/s with the latent/text cache and without it (the course's way:
both encoders on every step), with the split of a step into data, encoders, UNet forward+backward and
optimizer; DDIM sampling images/s with classifier-free guidance as one batched UNet call vs two calls, at
several batch sizes; the explorer's case (4 images of the reference model); peak memory; on CUDA, MFU.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hw6utils.config import REFERENCE_DIR, apply_overrides, get_preset  # noqa: E402
from hw6utils.encoders import encode_posterior, scale_latents, text_hidden_size  # noqa: E402
from hw6utils.models import build_unet, count_params  # noqa: E402
from hw6utils.sampling import (expand_text, guided_noise_pred, initial_noise, load_model, make_sampler,  # noqa: E402
                               unet_kwargs)
from hw6utils.training import diffusion_loss, get_batch, make_noise_scheduler, pick_device, prepare_data  # noqa: E402

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0}  # dense bf16 (fp16 on T4)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def train_step_split(cfg, prepared, unet, optimizer, noise_scheduler, device, steps: int) -> dict:
    """Seconds per optimizer step spent in data, encoders, UNet forward+backward and optimizer."""
    generator = torch.Generator().manual_seed(0)
    null_text = {k: v.to(device) for k, v in prepared["null_text"].items()}
    split = {"data": 0.0, "encoders": 0.0, "unet": 0.0, "optimizer": 0.0}
    for step in range(steps + 1):  # the first step warms up and is not counted
        times = {}
        if "loader" in prepared:
            (images, captions), times["data"] = timed(device, lambda: next(prepared["batches"]))

            def encode():
                mean, std = encode_posterior(prepared["vae"], images.to(device))
                z = mean + std * torch.randn(mean.shape, generator=generator).to(device)
                return scale_latents(prepared["vae"], z), prepared["encode"](list(captions))
            (latents, text), times["encoders"] = timed(device, encode)
        else:
            (latents, text), times["data"] = timed(device, lambda: get_batch(prepared, cfg, generator, device))
            times["encoders"] = 0.0
        _, times["unet"] = timed(device, lambda: diffusion_loss(unet, noise_scheduler, latents, text, null_text, cfg,
                                                                generator).backward())

        def update():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _, times["optimizer"] = timed(device, update)
        if step:
            for key in split:
                split[key] += times[key] / steps
    return split


def two_call_noise_pred(unet, latents, t, text, null_text, guidance_scale):
    """CFG as the course scripts did it: one UNet call without the caption, one with it."""
    noise_uncond = unet(latents, t, **unet_kwargs(unet, expand_text(null_text, latents.shape[0]))).sample
    noise_text = unet(latents, t, **unet_kwargs(unet, text)).sample
    return noise_uncond + guidance_scale * (noise_text - noise_uncond)


@torch.no_grad()
def sampling_images_per_s(unet, scheduler, text, null_text, batch, steps, device, batched: bool) -> float:
    cond = {k: v[:1].expand(batch, *v.shape[1:]).to(device) for k, v in text.items()}
    null = {k: v.to(device) for k, v in null_text.items()}
    latents = initial_noise(list(range(batch)), (unet.config.in_channels, unet.config.sample_size,
                                                  unet.config.sample_size), device)
    scheduler.set_timesteps(steps, device=device)
    predict = guided_noise_pred if batched else two_call_noise_pred

    def run():
        x = latents
        for t in scheduler.timesteps:
            x = scheduler.step(predict(unet, x, t, cond, null, 7.5), t, x).prev_sample
        return x
    run()  # warm-up
    _, seconds = timed(device, run)
    return batch / seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train_steps", type=int, default=10, help="timed optimizer steps per setting [10]")
    parser.add_argument("--sample_steps", type=int, default=50, help="DDIM steps when timing sampling [50]")
    parser.add_argument("--batches", default="1,4,16", help="sampling batch sizes [1,4,16]")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    cfg = get_preset(args.preset, device=str(device), output_dir="outputs/bench", eval_freq=0)
    print(f"preset {cfg.preset} on {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}")

    results = {}
    for cached in (True, False):
        run_cfg = apply_overrides(cfg, cache_latents=cached)
        prepared = prepare_data(run_cfg, device)
        if not cached:
            prepared["batches"] = iter(prepared["loader"])
        torch.manual_seed(0)
        unet = build_unet(run_cfg, text_hidden_size(prepared["text_model"])).to(device).train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=device.type == "cuda")
        split = train_step_split(run_cfg, prepared, unet, optimizer, make_noise_scheduler(run_cfg), device,
                                 args.train_steps)
        total = sum(split.values())
        results[cached] = run_cfg.train.batch_size / total
        shares = ", ".join(f"{k} {v / total:.1%}" for k, v in split.items())
        print(f"training {'cached  ' if cached else 'uncached'}: {results[cached]:8.1f} images/s "
              f"(batch {run_cfg.train.batch_size}; {shares})")
    print(f"cache speed-up: {results[True] / results[False]:.2f}x")
    print(f"UNet parameters: {count_params(unet):,}")

    unet.eval()
    scheduler = make_sampler(make_noise_scheduler(cfg).config)
    text = prepared["encode"](["A red circle. It is big and sits in the middle."])
    for batch in [int(b) for b in args.batches.split(",")]:
        one = sampling_images_per_s(unet, scheduler, text, prepared["null_text"], batch, args.sample_steps, device, True)
        two = sampling_images_per_s(unet, scheduler, text, prepared["null_text"], batch, args.sample_steps, device, False)
        print(f"sampling DDIM {args.sample_steps} steps, batch {batch:3d}: batched CFG {one:7.2f} images/s, "
              f"two calls {two:7.2f} images/s, ratio {one / two:.2f}x")

    if (REFERENCE_DIR / "hw6_config.json").is_file() and device.type == "cpu":
        from hw6utils.sampling import generate_images
        model = load_model("reference", device=device)
        prompts = ["A green circle. It is small and sits in the top right corner."] * 4
        generate_images(model, prompts[:1], [0], 7.5, 2, progress=False)  # warm-up
        _, seconds = timed(device, lambda: generate_images(model, prompts, [0, 1, 2, 3], 7.5, 50, progress=False))
        print(f"explorer: 4 images of the reference model, DDIM 50 steps: {seconds:.2f} s")

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak_mb:,.0f} MB")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        report_mfu(unet, cfg, results[True], device)


def report_mfu(unet, cfg, images_per_s: float, device) -> None:
    """Model FLOPs utilisation: FLOPs of one image's forward+backward x images/s over the GPU's bf16 peak."""
    from torch.utils.flop_counter import FlopCounterMode

    size, length, width = cfg.model.sample_size, cfg.encoders.max_text_len, cfg.model.cross_attention_dim
    latents = torch.randn(1, cfg.model.latent_channels, size, size, device=device)
    text = {"emb": torch.randn(1, length, width, device=device), "mask": torch.ones(1, length, device=device),
            "pooled": torch.randn(1, width, device=device)}
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
        unet(latents, torch.tensor([500], device=device), **unet_kwargs(unet, text)).sample.float().sum().backward()
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    achieved = counter.get_total_flops() * images_per_s / 1e12
    print(f"{name}: {achieved:.1f} TFLOP/s" + (f", MFU {achieved / peak:.1%} of {peak:.0f} TFLOP/s bf16" if peak else ""))


if __name__ == "__main__":
    main()
