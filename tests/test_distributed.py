"""torchrun on the CPU: 2 gloo processes train exactly what 1 process trains with the same global batch."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hw6utils.config import apply_overrides
from hw6utils.training import train

pytestmark = pytest.mark.slow


def read_losses(out_dir: Path) -> list:
    with (out_dir / "loss_log.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_two_gloo_processes_match_one_process(smoke_cfg, tmp_path, cached):
    common = dict(max_steps=3, grad_accum=2, log_freq=1, eval_freq=0, save_freq=3, device="cpu", mixed_precision="no",
                  cache_latents=cached, flip=True)
    single = apply_overrides(smoke_cfg, batch_size=8, output_dir=str(tmp_path / "single"), **common)
    train(single, progress=False)

    flags = {**common, "batch_size": 4, "output_dir": str(tmp_path / "ddp"), "data_dir": smoke_cfg.data.data_dir,
             "vae": smoke_cfg.encoders.vae}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "hw6utils.cli", "train", "--preset", "smoke"]
    for name, value in flags.items():
        command += [f"--{name}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "x 2 processes = 16" in done.stdout  # 4 per process x 2 micro-batches x 2 processes

    ddp_dir = tmp_path / "ddp"
    assert read_losses(ddp_dir) == pytest.approx(read_losses(tmp_path / "single"), rel=1e-4)
    weights = "ckpt_last/unet_sch_3/diffusion_pytorch_model.safetensors"
    one, two = load_file(tmp_path / "single" / weights), load_file(ddp_dir / weights)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-4, f"weights differ by up to {worst}"
    assert not list(ddp_dir.glob("ckpt_last/*.tmp"))  # only rank 0 wrote, and completely
