"""Crash safety: Ctrl-C saves and stops; SIGKILL at random moments never leaves a checkpoint that fails to load."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from hw6utils.sampling import list_checkpoints


def start_training(cfg, *extra):
    args = [sys.executable, "-m", "hw6utils.cli", "train", "--preset", "smoke", "--data_dir", cfg.data.data_dir,
            "--vae", cfg.encoders.vae, "--output_dir", cfg.train.output_dir, "--eval_freq", "0", "--log_freq", "1",
            "--num_threads", "1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_steps(cfg, proc, rows: int, timeout: float = 60):
    log = Path(cfg.train.output_dir) / "loss_log.csv"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) > rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"training made no progress: {proc.communicate()[0] if proc.poll() is not None else ''}")


def assert_checkpoints_load(cfg):
    found = list_checkpoints(Path(cfg.train.output_dir) / "ckpt_last")
    for path in found:
        UNet2DConditionModel.from_pretrained(path)
        UNet2DConditionModel.from_pretrained(path / "ema")
        state = torch.load(path / "training_state.pt", weights_only=False)
        assert state["step"] == int(path.name.split("_")[-1])
    return found


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(smoke_cfg):
    proc = start_training(smoke_cfg, "--max_steps", "100000", "--save_freq", "100000")
    wait_for_steps(smoke_cfg, proc, rows=3)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "stopped by Ctrl-C" in output
    found = assert_checkpoints_load(smoke_cfg)
    assert len(found) == 1 and 3 <= int(found[0].name.split("_")[-1]) < 100000


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_and_leaves_complete_checkpoints(smoke_cfg):
    """The first Ctrl-C asks for a save; a second one, sent while that save may be under way, stops at once.
    Whatever moment it lands, every checkpoint that `last` can find loads, and training resumes from it."""
    rng = random.Random(1)
    for attempt in range(3):
        resume = ["--ckpt_path", "last"] if attempt else []
        proc = start_training(smoke_cfg, "--max_steps", "100000", "--save_freq", "1", "--keep_last", "2", *resume)
        rows = len((Path(smoke_cfg.train.output_dir) / "loss_log.csv").read_text().splitlines()) if attempt else 0
        wait_for_steps(smoke_cfg, proc, rows=rows + 2)
        proc.send_signal(signal.SIGINT)
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        tail = f"exit {proc.returncode}: ...{output[-1500:]}"
        if proc.returncode == 130:  # the second Ctrl-C cut the save short
            assert "stopped at once by Ctrl-C" in output, tail
        else:  # the save-and-stop of the first one finished before the second landed (even while exiting)
            assert "stopped by Ctrl-C after step" in output, tail
        assert assert_checkpoints_load(smoke_cfg), "no complete checkpoint survived"


@pytest.mark.slow
def test_sigkill_at_random_moments_never_breaks_a_checkpoint(smoke_cfg):
    rng = random.Random(0)
    kills = 0
    for attempt in range(10):
        resume = ["--ckpt_path", "last"] if list_checkpoints(Path(smoke_cfg.train.output_dir) / "ckpt_last") else []
        proc = start_training(smoke_cfg, "--max_steps", "100000", "--save_freq", "1", "--keep_last", "2", *resume)
        rows = len((Path(smoke_cfg.train.output_dir) / "loss_log.csv").read_text().splitlines()) if attempt else 0
        wait_for_steps(smoke_cfg, proc, rows=rows + 1)
        time.sleep(rng.uniform(0.0, 1.0))  # checkpoints are written every step, so kills land mid-write too
        proc.kill()
        proc.communicate()
        kills += 1
        assert assert_checkpoints_load(smoke_cfg), "no complete checkpoint survived"
    last = list_checkpoints(Path(smoke_cfg.train.output_dir) / "ckpt_last")[-1]
    step = int(last.name.split("_")[-1])
    proc = start_training(smoke_cfg, "--max_steps", str(step + 2), "--ckpt_path", "last")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and f"resumed from {last}" in output, output
    print(f"survived {kills} SIGKILLs; resumed from step {step} and finished step {step + 2}")
