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


def torchrun_hw6_train(flags: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m hw6utils.cli train --preset smoke --<name> <value>...`, one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "hw6utils.cli", "train", "--preset", "smoke"]
    for name, value in flags.items():
        command += [f"--{name}", str(value)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


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
    done = torchrun_hw6_train(flags)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "x 2 processes = 16" in done.stdout  # 4 per process x 2 micro-batches x 2 processes

    ddp_dir = tmp_path / "ddp"
    assert read_losses(ddp_dir) == pytest.approx(read_losses(tmp_path / "single"), rel=1e-4)
    weights = "ckpt_last/unet_sch_3/diffusion_pytorch_model.safetensors"
    one, two = load_file(tmp_path / "single" / weights), load_file(ddp_dir / weights)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-4, f"weights differ by up to {worst}"
    assert not list(ddp_dir.glob("ckpt_last/*.tmp"))  # only rank 0 wrote, and completely


FIT_ON_TWO_CLOCKS = """
import time, types
import torch, torch.distributed as dist
from hw6utils.config import get_preset
from hw6utils.training import fit_to_time_budget
dist.init_process_group("gloo")
rank = dist.get_rank()
optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
optimizer.param_groups[0]["initial_lr"] = 1e-3  # as a scheduler built at the start of the run leaves it
run = types.SimpleNamespace(cfg=get_preset("smoke", max_steps=1000, time_budget=1.0), world=2, device=torch.device("cpu"),
                            optimizer=optimizer, lr_scheduler=None, main_process=rank == 0)
now = time.time()
# 100 steps in the last 10 s (0.1 s a step); rank 1 started 20 s before rank 0, so 20 s fewer are left to it:
# alone, rank 0 would fit 100 + 500 steps and rank 1 100 + 300
fit_to_time_budget(run, 100, now - 10 - 20 * rank, (now - 10, 0), 0, 1000)
print(f"rank {rank} max_steps {run.cfg.train.max_steps} lr {run.lr_scheduler.get_last_lr()[0]:.6g}")
dist.barrier()
dist.destroy_process_group()  # leaving with gloo's threads still up can abort the process (SIGABRT)
"""


def test_processes_that_measure_different_paces_agree_on_the_smallest_fit(tmp_path):
    """Each process fits the budget on its own clock; an all-reduce makes them take the smallest fit, so that all stop
    at the same step (had one stopped first, the other would wait in its next collective)."""
    import re
    script = tmp_path / "fit.py"
    script.write_text(FIT_ON_TWO_CLOCKS)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    fits = dict(re.findall(r"rank (\d) max_steps (\d+ lr [\d.e-]+)", done.stdout))
    assert fits.keys() == {"0", "1"} and fits["0"] == fits["1"], done.stdout
    assert 395 <= int(fits["0"].split()[0]) <= 400, done.stdout


def test_two_gloo_processes_end_a_time_budget_at_the_same_step(smoke_cfg, tmp_path):
    """A whole run under a time budget in two processes: it ends, rank 0 alone says where, and the checkpoint's
    config records the steps it took."""
    import json
    import re
    out = tmp_path / "ddp"
    flags = {"max_steps": 100000, "time_budget": 0.1, "batch_size": 4, "log_freq": 5, "eval_freq": 0,
             "save_freq": 100000, "device": "cpu", "mixed_precision": "no", "output_dir": str(out),
             "data_dir": smoke_cfg.data.data_dir, "vae": smoke_cfg.encoders.vae, "cache_dir": smoke_cfg.train.cache_dir}
    done = torchrun_hw6_train(flags, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    fitted = re.findall(r"time_budget 0.1 min: at [\d.]+ steps/s, training ends at step (\d+) of 100000", done.stdout)
    assert len(fitted) == 1, done.stdout[-2000:]  # rank 0 alone prints
    (ckpt,) = (out / "ckpt_last").iterdir()
    steps = json.loads((ckpt / "hw6_config.json").read_text())["train"]["max_steps"]
    assert ckpt.name == f"unet_sch_{steps}" and steps < 100000
