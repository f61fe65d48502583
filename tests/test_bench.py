"""bench/bench.py runs end to end on the smoke preset and prints every figure the speed issue asks for."""
import importlib.util
import re

import pytest

from checkout import CHECKOUT

BENCH = CHECKOUT / "bench" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_prints_every_figure(bench, shapes_dir, vae_dir, tmp_path, capsys):
    bench.main(["--preset", "smoke", "--device", "cpu", "--train_steps", "3", "--sample_steps", "2",
                "--batches", "1,2", "--compare_onednn", "--set", f"data_dir={shapes_dir}", f"vae={vae_dir}",
                f"output_dir={tmp_path / 'bench'}", "max_steps=3000"])
    out = capsys.readouterr().out
    assert float(re.search(r"fp32 matmul (\d+) GFLOP/s", out).group(1)) > 0  # the machine's speed, to compare runs
    speeds = {kind: float(v) for kind, v in re.findall(r"training (cached|uncached)\s*:\s+([\d.]+) images/s", out)}
    assert set(speeds) == {"cached", "uncached"} and all(v > 0 for v in speeds.values())
    # what max_steps of training would take here, from the same timing
    minutes = float(re.search(r"3,000 steps of 8 \(max_steps\): ~([\d.]+) min", out).group(1))
    # images/s is printed to 0.1: on a busy machine (1-2 images/s) that rounding alone moves the estimate by 2-5%
    assert minutes == pytest.approx(3000 * 8 / speeds["cached"] / 60, rel=0.02 + 0.05 / speeds["cached"], abs=0.06)
    ratio = float(re.search(r"cache speed-up: ([\d.]+)x", out).group(1))
    assert ratio == pytest.approx(speeds["cached"] / speeds["uncached"], rel=0.03)  # speeds are printed to 0.1
    # the split of a step: with the cache on the encoders do not run (what is left, under 2%, is the timer's own
    # microseconds, which a busy machine can stretch to 0.1%); without it they encode every batch
    splits = dict(re.findall(r"training (cached|uncached).*\((.*)\)", out))
    assert {"data", "encoders", "unet", "optimizer"} <= set(re.findall(r"(\w+) [\d.]+%", splits["cached"]))
    encoders = {kind: float(re.search(r"encoders ([\d.]+)%", split).group(1)) for kind, split in splits.items()}
    assert encoders["cached"] < 2 < encoders["uncached"], encoders
    assert re.search(r"UNet parameters: [\d,]+", out)
    rows = re.findall(r"batch\s+(\d+): batched CFG\s+([\d.]+) images/s, two calls\s+([\d.]+) images/s, ratio ([\d.]+)x",
                      out)
    assert [r[0] for r in rows] == ["1", "2"] * 3  # the library's rows, PyTorch's own choice, oneDNN off
    for _, one, two, r in rows:
        assert float(r) == pytest.approx(float(one) / float(two), abs=0.01)
    assert "PyTorch's choice" in out and "oneDNN off" in out
    assert [b for b, v in re.findall(r"pipeline DDIM 2 steps, batch\s+(\d+):\s+([\d.]+) images/s", out) if float(v) > 0] == ["1", "2"]
    import torch
    assert torch.backends.mkldnn.enabled  # restored afterwards
    assert re.search(r"peak resident memory: [\d,]+ MB", out)
    assert re.search(r"explorer: 4 images of the reference model, DDIM 50 steps: [\d.]+ s", out)
    assert any((tmp_path / "bench").rglob("*.safetensors"))  # the latent cache went to --set output_dir


def test_bench_flags_time_each_flag_and_the_other_precision(bench, shapes_dir, vae_dir, tmp_path, capsys):
    """--flags: a row per speed flag against all off, and the config in the other precision (fp32 against bf16
    autocast: on a 2-core CPU fp32 trains the tiny UNet faster, so the tiny preset uses it)."""
    bench.main(["--preset", "smoke", "--device", "cpu", "--train_steps", "2", "--sample_steps", "2", "--batches", "1",
                "--flags", "--skip_uncached", "--set", f"data_dir={shapes_dir}", f"vae={vae_dir}",
                f"output_dir={tmp_path / 'bench'}"])
    rows = dict(re.findall(r"flags (.+?)\s+([\d.]+) images/s", capsys.readouterr().out))
    assert {"all off", "+channels_last", "+fused_adamw", "config", "config, no"} <= set(rows), rows
    assert all(float(v) > 0 for v in rows.values())


def test_unets_bench_times_each_distinct_unet_of_a_sweep_file(tmp_path, capsys):
    """bench/unets.py: one row per distinct UNet of a sweep file (runs that differ only in steps or seed share one),
    the tiny preset's first at 1.00x, each with the parameters and FLOPs of the UNet the flags build."""
    spec = importlib.util.spec_from_file_location("unets", BENCH.parent / "unets.py")
    unets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(unets)
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# a comment\nbase_s0 --max_steps 3000 --seed 0\nbase_s1 --max_steps 2000 --seed 1\n"
                     "narrow --seed 0 --block_out_channels 16,32,64 --norm_num_groups 8\n"
                     "small --image_size 32 --sample_size 8 --seed 2\n"
                     "f8 --vae outputs/vae_f8 --sample_size 8 --latent_channels 16\n")
    assert unets.unet_flags("narrow --seed 0 --block_out_channels 16,32,64") == {"block_out_channels": (16, 32, 64)}
    assert unets.unet_flags("add --resnet_time_scale_shift default --seed 0") == {"resnet_time_scale_shift": "default"}
    unets.main([str(sweep), "--rounds", "1", "--steps", "1", "--threads", "1"])
    rows = re.findall(r"([\d.]+) steps/s\s+([\d.]+)x\s+([\d.]+) M params\s+([\d.]+) GFLOP fwd\s+(.*)", capsys.readouterr().out)
    assert [r[4] for r in rows] == ["tiny", "--block_out_channels 16,32,64 --norm_num_groups 8", "--image_size 32 --sample_size 8",
                                    "--sample_size 8 --latent_channels 16"]
    assert rows[0][1] == "1.00"
    params = {r[4]: float(r[2]) for r in rows}
    flops = {r[4]: float(r[3]) for r in rows}
    assert params["--image_size 32 --sample_size 8"] == params["tiny"]  # the same UNet on a quarter of the pixels
    assert flops["--image_size 32 --sample_size 8"] < flops["tiny"] / 2
    assert params["--block_out_channels 16,32,64 --norm_num_groups 8"] < params["tiny"] / 2
    # an f=8 autoencoder's 8x8x16 latents: the same levels on a quarter of the positions
    assert flops["--sample_size 8 --latent_channels 16"] < flops["tiny"] / 2
