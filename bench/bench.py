"""Speed and memory of one preset on this machine, printed as numbers (ratios measured in the same run).

    .venv/bin/python bench/bench.py                                 # tiny preset, CPU
    .venv/bin/python bench/bench.py --preset hw6 --stand_in --flags --generate 1063   # on a GPU

Prints: the machine's fp32 matmul GFLOP/s (to compare figures across machines); parameter count; training images/s
with the latent/text cache and without it (the course's way: both encoders on every step), for steps run back to
back (one read of the loss per step, as in `train`), and the split of a step into data, encoders, UNet
forward+backward and optimizer (each phase timed alone, between synchronisations), and what max_steps of those
steps would take here; DDIM sampling images/s with classifier-free guidance as one batched UNet call vs two calls,
at several batch sizes, and the whole pipeline (HW6Pipeline) at the same sizes; the explorer's case (4 images of
the reference model); peak memory; on CUDA, MFU.
--flags times a training step with each speed flag (tf32, fused AdamW, channels_last, torch.compile) on
its own against all of them off, and the config in the other precision (fp32 / bf16 autocast);
--generate N times generating N prompts (the course's test set: 1,063);
--compare_onednn repeats the CPU sampling rows with PyTorch's own choice of convolution (the library
overrides it for UNet calls of up to 4 rows: `cpu_conv_backend`) and with oneDNN convolutions off.
--stand_in replaces the hub encoders of the hw6 presets (CLIP B/32 text tower, SD VAE) by random-weight
models of the same architecture (speed depends on the shapes, not on the weights), with the shapes set
as data, so the hw6 preset can be timed where the hub is unreachable.
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hw6utils.config import REFERENCE_DIR, apply_overrides, get_preset  # noqa: E402
from hw6utils.encoders import text_hidden_size  # noqa: E402
from hw6utils.models import autocast, count_params, to_device  # noqa: E402
from hw6utils.pipeline import (cpu_conv_backend, denoising_timesteps, guided_noise_pred, onednn_off,  # noqa: E402
                               unet_kwargs)
from hw6utils.sampling import generate_images, generators, inference_dtype, load_model, make_sampler  # noqa: E402
from hw6utils.training import (diffusion_loss, image_batches, make_noise_scheduler, noise_draws, pick_device,  # noqa: E402
                               prepare_data, setup_unet, step_report)

# dense bf16 (fp16 on T4) by device-name substring, the first match wins: the PCIe and NVL H100s are slower
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0,
                    "T4": 65.0}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def matmul_gflops(device, n: int = 1024, reps: int = 10) -> float:
    """The machine's speed as one number, to compare figures measured on different machines: fp32 GFLOP/s of an
    n x n matrix product (a 2-core VM on a 2.0 GHz EPYC, Zen 1: 34 on one thread, 42-64 on two as its host's load
    varied; its training steps were 2.8x slower than on the VM of the README's earlier figures)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):  # warm-up: the first products also start the thread pool
        a @ b
    _, seconds = timed(device, lambda: [a @ b for _ in range(reps)])
    return 2 * n ** 3 * reps / seconds / 1e9


def stand_in_encoders(cfg, root: Path) -> dict:
    """Random-weight CLIP ViT-B/32 text tower and Stable Diffusion VAE (their published configs), saved with
    save_pretrained under root; returns the config overrides that point the preset at them. The tokenizer is
    the offline MiniLM's (CLIP's vocabulary files are on the hub): same sequence length, same compute."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from hw6utils.encoders import resolve_text_encoder
    if cfg.encoders.text_encoder != "openai/clip-vit-base-patch32" or "stable-diffusion" not in cfg.encoders.vae:
        raise SystemExit("--stand_in knows CLIP ViT-B/32 and the SD VAE (the hw6 presets) only")
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_encoder("minilm"))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=512, intermediate_size=2048,
                                        num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                                        eos_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    text.save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=512, scaling_factor=0.18215)
    vae.save_pretrained(root / "vae")
    data_dir = cfg.data.data_dir if Path(cfg.data.data_dir, "train_info.json").is_file() else "outputs/bench/shapes"
    return {"text_encoder": str(root / "text"), "vae": str(root / "vae"), "vae_subfolder": "", "data_dir": data_dir}


def train_step_split(cfg, prepared, unet, optimizer, noise_scheduler, device, steps: int, warmup: int = 1) -> tuple:
    """(seconds per optimizer step run back to back, reading the loss once per step as `train` does (without its
    clipping, EMA and LR schedule); the split of a step into data, encoders, UNet forward+backward and optimizer,
    each phase timed between two synchronisations).

    On a GPU the two differ: back to back, the CPU queues the next kernels while the GPU still runs the last
    ones (train reads the GPU once per step); the synchronised phases add up the CPU's launch time as well.
    """
    generator = torch.Generator().manual_seed(0)
    null_text = {k: v.to(device) for k, v in prepared.null_text.items()}

    def draw():  # cached: latents and text ready to use; uncached: images and captions from the DataLoader
        return next(prepared.batches) if prepared.dataset is not None else prepared.batch(cfg, generator, device)

    def encode(drawn):  # uncached: both frozen encoders on every step, as the course's script ran them
        return drawn if prepared.dataset is None else prepared.encode_batch(cfg, *drawn, generator, device)

    def loss_backward(latents, text):
        drop, noise, timesteps = (to_device(x, device) for x in noise_draws(cfg, latents.shape, generator))
        batch = {"latents": latents, "text": text, "drop": drop, "noise": noise, "timesteps": timesteps}
        loss = diffusion_loss(unet, noise_scheduler, batch, null_text, cfg)
        loss.backward()
        return loss.detach()

    def update():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    split = {"data": 0.0, "encoders": 0.0, "unet": 0.0, "optimizer": 0.0}
    for step in range(steps + warmup):  # the warm-up steps are not counted
        times = {}
        drawn, times["data"] = timed(device, draw)
        (latents, text), times["encoders"] = timed(device, lambda: encode(drawn))
        _, times["unet"] = timed(device, lambda: loss_backward(latents, text))
        _, times["optimizer"] = timed(device, update)
        if step >= warmup:
            for key in split:
                split[key] += times[key] / steps
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = loss_backward(*encode(draw()))
        update()
        step_report([loss], False, 1)  # train's one read of the GPU per step
    sync(device)
    return (time.perf_counter() - start) / steps, split


def two_call_noise_pred(unet, latents, t, text, null_text, *, guidance_scale):
    """CFG as the course scripts did it: one UNet call without the caption, one with it."""
    null_text = {k: v.expand(latents.shape[0], *v.shape[1:]) for k, v in null_text.items()}
    noise_uncond = unet(latents, t, **unet_kwargs(unet, null_text)).sample
    noise_text = unet(latents, t, **unet_kwargs(unet, text)).sample
    return noise_uncond + guidance_scale * (noise_text - noise_uncond)


@torch.no_grad()
def sampling_images_per_s(unet, scheduler, text, null_text, batch, steps, device, batched: bool,
                          conv_backend=cpu_conv_backend) -> float:
    cond = {k: v[:1].expand(batch, *v.shape[1:]).to(device) for k, v in text.items()}
    null = {k: v.to(device) for k, v in null_text.items()}
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = torch.stack([torch.randn(shape, generator=g) for g in generators(range(batch))]).to(device)
    timesteps = denoising_timesteps(scheduler, steps, device)
    predict = guided_noise_pred if batched else two_call_noise_pred

    unet_batch = 2 * batch if batched else batch  # each call runs on the backend `hw6 generate` would pick

    def run():  # bf16 on CUDA (fp16 on GPUs without bf16), as `hw6 generate` runs
        x = latents
        for t, unet_t in timesteps:
            with autocast(device, "bf16" if device.type == "cuda" else "no"), conv_backend(device, unet_batch):
                noise_pred = predict(unet, x, unet_t, cond, null, guidance_scale=7.5).float()
            x = scheduler.step(noise_pred, t, x).prev_sample
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
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. batch_size=16")
    parser.add_argument("--stand_in", action="store_true", help="random-weight CLIP/SD-VAE of the hw6 presets")
    parser.add_argument("--flags", action="store_true", help="time each training speed flag on its own")
    parser.add_argument("--compile", action="store_true", help="include torch.compile in --flags (slow to compile)")
    parser.add_argument("--generate", type=int, default=0, help="time generating this many prompts (1063 = course)")
    parser.add_argument("--skip_uncached", action="store_true", help="time the cached training step only")
    parser.add_argument("--also_batch", default="", help="with --flags: also time these micro-batch sizes, e.g. 64,128")
    parser.add_argument("--compare_onednn", action="store_true",
                        help="CPU: also time sampling with PyTorch's own choice of convolution (native at batch 1, "
                             "oneDNN above) and with oneDNN off")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    from hw6utils.config import parse_value
    overrides = {k: parse_value(k, v) for k, v in (item.split("=", 1) for item in args.set)}
    cfg = get_preset(args.preset, **{"device": str(device), "output_dir": "outputs/bench", "eval_freq": 0, **overrides})
    if args.stand_in:
        cfg = apply_overrides(cfg, **stand_in_encoders(cfg, Path(cfg.train.output_dir) / "stand_in"))
    print(f"preset {cfg.preset} on {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}; "
          f"fp32 matmul {matmul_gflops(device):.0f} GFLOP/s")

    results = {}
    for cached in (True,) if args.skip_uncached else (True, False):
        run_cfg = apply_overrides(cfg, cache_latents=cached)
        prepared = prepare_data(run_cfg, device)
        if not cached:
            prepared.batches = image_batches(prepared.dataset, run_cfg, device)
        unet, model, optimizer = setup_unet(run_cfg, text_hidden_size(prepared.text_model), device)
        seconds, split = train_step_split(run_cfg, prepared, model, optimizer, make_noise_scheduler(run_cfg), device,
                                          args.train_steps, warmup=20 if run_cfg.train.compile else 2)
        total = sum(split.values())
        results[cached] = run_cfg.train.batch_size / seconds
        shares = ", ".join(f"{k} {v / total:.1%}" for k, v in split.items())
        print(f"training {'cached  ' if cached else 'uncached'}: {results[cached]:8.1f} images/s "
              f"(batch {run_cfg.train.batch_size}; phase by phase {run_cfg.train.batch_size / total:.1f} images/s: {shares})")
        if cached:  # what `hw6 train` would take here for these steps (without its clipping, EMA and checkpoints)
            print(f"  {run_cfg.train.max_steps:,} steps of {run_cfg.train.batch_size} (max_steps): "
                  f"~{run_cfg.train.max_steps * seconds / 60:.1f} min of UNet and AdamW steps on this machine")
    if not args.skip_uncached:
        print(f"cache speed-up: {results[True] / results[False]:.2f}x")
    print(f"UNet parameters: {count_params(unet):,}")
    if args.generate:  # first on a GPU: the figure the course cares about
        time_generation(cfg, unet, prepared, device, args.generate)
    if args.flags:
        time_flags(cfg, prepared if args.skip_uncached else prepare_data(cfg, device), device, args)

    unet.eval()
    scheduler = make_sampler(make_noise_scheduler(cfg).config)
    text = prepared.encode(["A red circle. It is big and sits in the middle."])

    def cfg_rows(label, conv_backend=cpu_conv_backend):
        for batch in [int(b) for b in args.batches.split(",")]:
            one, two = (sampling_images_per_s(unet, scheduler, text, prepared.null_text, batch, args.sample_steps,
                                              device, batched, conv_backend) for batched in (True, False))
            print(f"{label}, batch {batch:3d}: batched CFG {one:7.2f} images/s, two calls {two:7.2f} images/s, "
                  f"ratio {one / two:.2f}x")
    cfg_rows(f"sampling DDIM {args.sample_steps} steps")
    pipeline_rows(cfg, unet, prepared, device, [int(b) for b in args.batches.split(",")], args.sample_steps)
    if args.compare_onednn and device.type == "cpu":
        cfg_rows("  PyTorch's choice", lambda device, unet_batch: contextlib.nullcontext())
        cfg_rows("  oneDNN off", lambda device, unet_batch: onednn_off())

    if (REFERENCE_DIR / "hw6_config.json").is_file() and device.type == "cpu":
        model = load_model("reference", device=device)
        prompts = ["A green circle. It is small and sits in the top right corner."] * 4
        generate_images(model, prompts[:1], [0], guidance_scale=7.5, num_inference_steps=2, progress=False)  # warm-up
        _, seconds = timed(device, lambda: generate_images(model, prompts, [0, 1, 2, 3], guidance_scale=7.5,
                                                           num_inference_steps=50, progress=False))
        print(f"explorer: 4 images of the reference model, DDIM 50 steps: {seconds:.2f} s")

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak_mb:,.0f} MB")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        print(f"training cached, config flags: {mfu_text(unet, cfg, results[True], device)}")


def pipeline_rows(cfg, unet, prepared, device, batches: list, steps: int) -> None:
    """Images/s of the whole sampling route (HW6Pipeline: text encoding, DDIM with batched CFG, decoding)."""
    from hw6utils.training import sampling_model
    pipe = sampling_model(cfg, generation_unet(cfg, unet, device), make_noise_scheduler(cfg).config, prepared, ".").pipe
    for batch in batches:
        prompts = ["A red circle. It is big and sits in the middle."] * batch

        def run(num_steps):
            return pipe(prompts, num_inference_steps=num_steps, guidance_scale=7.5, generator=generators(range(batch)),
                        output_type="pt")
        run(2)  # warm-up
        _, seconds = timed(device, lambda: run(steps))
        print(f"pipeline DDIM {steps} steps, batch {batch:3d}: {batch / seconds:7.2f} images/s "
              "(HW6Pipeline: encoding, batched CFG, decoding)")


def time_flags(cfg, prepared, device, args) -> None:
    """Training images/s (cached) with every speed flag off, then each flag on alone, then the config's own."""
    names = ["channels_last", "fused_adamw"] + (["tf32"] if device.type == "cuda" else []) + \
        (["compile"] if args.compile else [])
    off = apply_overrides(cfg, **{n: False for n in names})
    runs = [("all off", off)] + [(f"+{n}", apply_overrides(off, **{n: True})) for n in names] + [("config", cfg)]
    runs += [(f"config, batch {b}", apply_overrides(cfg, batch_size=int(b))) for b in args.also_batch.split(",") if b]
    # the precision: on a 2-core CPU bf16 autocast is slower than fp32 for the tiny UNet (its casts cost more than
    # the bf16 matmuls save), so the tiny preset trains in fp32
    runs += [(f"config, {p}", apply_overrides(cfg, mixed_precision=p)) for p in ("no", "bf16")
             if p != cfg.train.mixed_precision]
    base = None
    for label, run_cfg in runs:
        unet, model, optimizer = setup_unet(run_cfg, text_hidden_size(prepared.text_model), device)
        seconds, _ = train_step_split(run_cfg, prepared, model, optimizer, make_noise_scheduler(run_cfg), device,
                                      args.train_steps, warmup=20 if run_cfg.train.compile else 2)
        speed = run_cfg.train.batch_size / seconds
        base = base or speed
        mfu = f"; {mfu_text(unet, run_cfg, speed, device)}" if device.type == "cuda" else ""
        print(f"flags {label:18s} {speed:8.1f} images/s  ({speed / base:.2f}x all off){mfu}")
        del unet, model, optimizer
        torch._dynamo.reset()


def generation_unet(cfg, unet, device):
    """A copy of the trained UNet as `hw6 generate` loads it (bf16 weights on CUDA). The training UNet itself is
    float32: sampled as it is, it ran 6.2 images/s on an H200 where `hw6 generate` runs bf16."""
    import copy
    return inference_dtype(copy.deepcopy(unet).eval(), device, cfg.train.mixed_precision)


def time_generation(cfg, unet, prepared, device, count: int) -> None:
    """Seconds to generate `count` prompts as `hw6 generate` does (DDIM, CFG, batches of gen_batch_size)."""
    from hw6utils.training import sampling_model
    model = sampling_model(cfg, generation_unet(cfg, unet, device), make_noise_scheduler(cfg).config, prepared, ".")
    prompts = [f"A monster number {i} with wings, sharp teeth and a long tail. The monster is attacking."
               for i in range(count)]
    s = cfg.sample
    generate_images(model, prompts[:2], [0, 1], guidance_scale=s.guidance_scale, num_inference_steps=2, batch_size=2,
                    progress=False)  # warm-up
    _, seconds = timed(device, lambda: generate_images(model, prompts, list(range(count)), guidance_scale=s.guidance_scale,
                                                       num_inference_steps=s.num_inference_steps,
                                                       batch_size=s.gen_batch_size, progress=False))
    print(f"generate {count} prompts, {s.sampler} {s.num_inference_steps} steps, batch {s.gen_batch_size}: {seconds:.1f} s "
          f"({count / seconds:.1f} images/s)")


def mfu_text(unet, cfg, images_per_s: float, device) -> str:
    """Model FLOPs utilisation: FLOPs of one image's forward+backward x images/s over the GPU's bf16 peak."""
    from torch.utils.flop_counter import FlopCounterMode

    size, length, width = cfg.model.sample_size, cfg.encoders.max_text_len, cfg.model.cross_attention_dim
    latents = torch.randn(1, cfg.model.latent_channels, size, size, device=device)
    text = {"emb": torch.randn(1, length, width, device=device), "mask": torch.ones(1, length, device=device),
            "pooled": torch.randn(1, width, device=device)}
    with FlopCounterMode(display=False) as counter, autocast(device, "bf16"):
        unet(latents, torch.tensor([500], device=device), **unet_kwargs(unet, text)).sample.float().sum().backward()
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    achieved = counter.get_total_flops() * images_per_s / 1e12
    return f"{achieved:.1f} TFLOP/s" + (f", MFU {achieved / peak:.1%} of {name}'s {peak:.0f} bf16" if peak else "")


if __name__ == "__main__":
    main()
