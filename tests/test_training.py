import json
from pathlib import Path

import pytest
import torch

from hw6utils.config import apply_overrides
from hw6utils.training import make_noise_scheduler, pick_device, prepare_data, train


def test_add_noise_is_the_closed_form(smoke_cfg):
    scheduler = make_noise_scheduler(smoke_cfg)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 400, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    by_hand = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise  # x_t = sqrt(a_t) x_0 + sqrt(1-a_t) eps
    assert torch.allclose(scheduler.add_noise(latents, noise, timesteps), by_hand, atol=1e-6)


def test_short_training_reduces_the_loss_and_writes_everything(smoke_cfg):
    cfg = apply_overrides(smoke_cfg, max_steps=60, batch_size=16, lr=3e-3, warmup_steps=5, log_freq=5,
                          eval_freq=30, save_freq=30, keep_last=1)
    history = train(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert history[-1]["loss"] < 0.85 * history[0]["loss"], history
    out = Path(cfg.train.output_dir)
    assert sorted(p.name for p in (out / "ckpt_last").iterdir()) == ["unet_sch_60"]  # keep_last=1 pruned step 30
    ckpt = out / "ckpt_last" / "unet_sch_60"
    for name in ["diffusion_pytorch_model.safetensors", "config.json", "ema/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "hw6_config.json", "training_state.pt"]:
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "scheduler" / "scheduler_config.json").read_text())["beta_schedule"] == "squaredcos_cap_v2"
    for name in ["samples_last/step_30.png", "samples_last/step_60.png", "loss.png", "loss_log.csv", "history.json"]:
        assert (out / name).is_file(), name


def test_resume_continues_exactly(smoke_cfg):
    device = pick_device("cpu")
    prepared = prepare_data(smoke_cfg, device)
    straight = train(apply_overrides(smoke_cfg, max_steps=4, save_freq=2, eval_freq=0), prepared, progress=False)
    resumed_cfg = apply_overrides(smoke_cfg, max_steps=4, save_freq=2, eval_freq=0,
                                  output_dir=smoke_cfg.train.output_dir + "_b")
    train(apply_overrides(resumed_cfg, max_steps=2), prepared, progress=False)
    ckpt = resumed_cfg.train.output_dir + "/ckpt_last/unet_sch_2"
    resumed = train(apply_overrides(resumed_cfg, ckpt_path=ckpt), prepared, progress=False)
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in straight], rel=1e-5)


def test_resume_rejects_a_missing_checkpoint(smoke_cfg):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(apply_overrides(smoke_cfg, ckpt_path="last"), progress=False)
