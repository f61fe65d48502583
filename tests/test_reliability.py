"""Crash safety: Ctrl-C saves and stops; SIGKILL at random moments never leaves a checkpoint that fails to load."""
import json
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

from hw6utils.checkpoints import list_checkpoints


def start_training(cfg, *extra):
    args = [sys.executable, "-m", "hw6utils.cli", "train", "--preset", "smoke", "--data_dir", cfg.data.data_dir,
            "--vae", cfg.encoders.vae, "--output_dir", cfg.train.output_dir, "--cache_dir", cfg.train.cache_dir, "--eval_freq", "0", "--log_freq", "1",
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


@pytest.mark.slow
def test_a_second_training_into_the_same_folder_stops_at_once_and_a_killed_one_does_not_block(smoke_cfg):
    out = Path(smoke_cfg.train.output_dir)
    first = start_training(smoke_cfg, "--max_steps", "100000", "--save_freq", "1", "--keep_last", "2")
    wait_for_steps(smoke_cfg, first, rows=2)
    second = start_training(smoke_cfg, "--max_steps", "2")
    output, _ = second.communicate(timeout=120)
    assert second.returncode == 2, output
    error = output.strip().splitlines()[-1]
    assert error.startswith(f"hw6 train: error: {out}: another training (pid {first.pid}, started "), output
    assert "captions ready" not in output and "starting fresh" not in output, output  # stopped before any work
    assert first.poll() is None and list_checkpoints(out / "ckpt_last"), "the first run was disturbed"
    first.kill()  # SIGKILL: no chance to let go of the lock; the kernel does it
    first.communicate()
    third = start_training(smoke_cfg, "--max_steps", "2")
    output, _ = third.communicate(timeout=180)
    assert third.returncode == 0 and "starting fresh" in output, output


def test_only_rank_0_takes_the_output_folder_lock(tmp_path, monkeypatch):
    from hw6utils.training import output_dir_lock
    monkeypatch.setenv("RANK", "1")
    with output_dir_lock(tmp_path):
        assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    with output_dir_lock(tmp_path):
        assert (tmp_path / "train.lock.json").is_file()
    assert not (tmp_path / "train.lock.json").exists()


@pytest.mark.slow
def test_ctrl_c_during_generate_keeps_the_finished_batches_and_a_rerun_makes_the_rest(smoke_cfg):
    proc = start_training(smoke_cfg, "--max_steps", "2")
    assert proc.wait(timeout=180) == 0, proc.communicate()[0]
    out = Path(smoke_cfg.train.output_dir) / "png"
    prompts = Path(smoke_cfg.train.output_dir) / "test.json"  # 20 of the set's prompts
    entries = dict(list(json.loads(Path(smoke_cfg.data.data_dir, "test.json").read_text()).items())[:20])
    prompts.write_text(json.dumps(entries))
    args = [sys.executable, "-m", "hw6utils.cli", "generate", "--preset", "smoke", "--data_dir", smoke_cfg.data.data_dir,
            "--output_dir", smoke_cfg.train.output_dir, "--stage", "last", "--out", str(out), "--gen_batch_size", "1",
            "--num_inference_steps", "30", "--test_json", str(prompts)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("*.png"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "Ctrl-C: finishing this batch" in output and "stopped by Ctrl-C" in output, output
    kept = sorted(out.glob("*.png"))
    total = len(entries)
    assert 2 <= len(kept) < total and not list(out.glob("*.tmp")), output
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and f"({len(kept)} already there)" in proc.stdout, proc.stdout + proc.stderr
    assert len(list(out.glob("*.png"))) == total
