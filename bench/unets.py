"""The cost of one training step of each UNet in a sweep file, against the tiny preset's, in the same run.

    .venv/bin/python bench/unets.py bench/sweeps/arch_2026-12-04.txt

For every distinct UNet among the file's runs (the flags that shape it: SHAPE_FLAGS, the image and latent
sizes among them; the others do not change a step's cost) this builds the model as
`hw6 train` does, then times a step of batch 16 on random latents and text (forward, backward, AdamW) and counts
the forward's FLOPs. The UNets take turns, a few steps each, for several rounds, and each one's figure is its
median round, so that a machine whose speed drifts (a shared VM) moves them all alike. Prints ms per step,
steps/s, the ratio to the tiny preset's step, parameters and forward GFLOP. A line with another autoencoder
(`--vae DIR --sample_size 8 --latent_channels 16`: an f=8 one) is timed on latents of its size and channels.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hw6utils.config import get_preset, parse_value  # noqa: E402
from hw6utils.models import build_unet, count_params  # noqa: E402

SHAPE_FLAGS = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "attention_head_dim",
               "norm_num_groups", "resnet_time_scale_shift", "image_size", "sample_size", "latent_channels")


def unet_flags(line: str) -> dict:
    """The flags of one sweep line that shape the UNet, as config overrides."""
    words = shlex.split(line)[1:]
    flags = {words[i][2:]: words[i + 1] for i in range(0, len(words) - 1, 2) if words[i].startswith("--")}
    return {name: parse_value(name, flags[name]) for name in SHAPE_FLAGS if name in flags}


def step_fn(cfg, batch: int):
    """One training step of cfg's UNet on random inputs, and the UNet."""
    torch.manual_seed(0)
    unet = build_unet(cfg)
    m, t = cfg.model, cfg.train
    latents = torch.randn(batch, m.latent_channels, m.sample_size, m.sample_size)
    timesteps = torch.randint(0, t.num_train_timesteps, (batch,))
    text = torch.randn(batch, cfg.encoders.max_text_len, m.cross_attention_dim)
    extra = {"class_labels": torch.randn(batch, m.cross_attention_dim)} if m.use_pooled_text else {}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=t.lr)

    def step():
        loss = torch.nn.functional.mse_loss(unet(latents, timesteps, text, **extra).sample, latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(latents, timesteps, text, **extra)
    return step, unet, counter.get_total_flops()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per UNet per round")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (make demo's 2 cores: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = {"tiny": {}}
    for line in Path(args.sweep_file).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            flags = unet_flags(line)
            key = " ".join(f"--{k} {','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in flags.items())
            variants.setdefault(key or "tiny", flags)
    built = {key: step_fn(get_preset("tiny", **flags), args.batch) for key, flags in variants.items()}
    times = {key: [] for key in built}
    for step, _, _ in built.values():
        step()  # warm-up
    for _ in range(args.rounds):
        for key, (step, _, _) in built.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[key].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["tiny"])
    print(f"{args.threads} CPU threads, batch {args.batch}, median of {args.rounds} rounds of {args.steps} steps")
    for key, (_, unet, flops) in built.items():
        ms = statistics.median(times[key])
        print(f"{ms * 1000:6.0f} ms/step {1 / ms:5.1f} steps/s {base / ms:5.2f}x  {count_params(unet) / 1e6:5.2f} M params "
              f"{flops / 1e9:5.2f} GFLOP fwd  {key}")


if __name__ == "__main__":
    main()
