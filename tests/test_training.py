import dataclasses
import json
from pathlib import Path

import pytest
import torch

from hw6utils.config import apply_overrides
from hw6utils.training import make_noise_scheduler, pick_device, prepare_data, seconds_per_step, train


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


def test_training_encodes_captions_as_the_pipeline_does(smoke_cfg):
    """The cached caption table and the null conditioning of training come from the pipeline's encode_prompt with
    the config's settings (add_token_embeddings here), so a model samples with the conditioning it learnt."""
    from hw6utils.pipeline import encode_prompt
    cfg = apply_overrides(smoke_cfg, add_token_embeddings=True)
    prepared = prepare_data(cfg, pick_device("cpu"))
    caption = prepared.data.captions[prepared.data.image_keys[0]][0]
    row = prepared.caption_ids[0][0][0]
    expected = encode_prompt(prepared.tokenizer, prepared.text_model, [caption, ""], cfg.encoders.max_text_len,
                             add_token_embeddings=True)
    torch.testing.assert_close(prepared.text_table["emb"][row], expected["emb"][0])
    torch.testing.assert_close(prepared.null_text["emb"][0], expected["emb"][1])
    plain = encode_prompt(prepared.tokenizer, prepared.text_model, [caption], cfg.encoders.max_text_len)
    assert not torch.allclose(plain["emb"][0], expected["emb"][0])


def test_cached_flips_draw_the_mirrored_caption(smoke_cfg):
    """With flip on, a micro-batch sample that takes the flipped latents of an image takes one of its captions with
    left and right swapped; an unflipped one, one of its captions as given."""
    from hw6utils.data import mirror_caption
    from hw6utils.pipeline import latent_shift_scale
    cfg = apply_overrides(smoke_cfg, flip=True, batch_size=64)
    prepared = prepare_data(cfg, pick_device("cpu"))
    data, mean = prepared.data, prepared.latent_mean
    assert len(prepared.caption_ids) == mean.shape[0] == 2
    # every latent of image i in view v (1 = flipped) holds the number 1000 v + i, with no posterior noise
    mark = torch.arange(2)[:, None] * 1000 + torch.arange(mean.shape[1])[None]
    marked = dataclasses.replace(prepared, latent_mean=mark[..., None, None, None].float().expand_as(mean).contiguous(),
                                 latent_std=torch.zeros_like(prepared.latent_std))
    z, text = marked.batch(cfg, torch.Generator().manual_seed(0), "cpu")
    shift, scale = latent_shift_scale(prepared.vae)
    numbers = (z[:, 0, 0, 0] / scale.flatten()[0] + shift.flatten()[0]).round().long().tolist()
    views = []
    for number, emb in zip(numbers, text["emb"]):
        view, i = divmod(number, 1000)
        given = data.captions[data.image_keys[i]]
        expected = [mirror_caption(c) for c in given] if view else given
        assert any(torch.allclose(prepared.encode([c])["emb"][0], emb, atol=1e-5) for c in expected), (view, given)
        views.append(view)
    assert set(views) == {0, 1}
    flipped_sides = [mirror_caption(c) != c for key in data.image_keys for c in data.captions[key]]
    assert any(flipped_sides)  # the smoke set names left and right, so the check above can tell the views apart


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_resume_continues_exactly(smoke_cfg, cached):
    """Train 4 steps straight vs 2, save, resume for 2: the same losses step by step (with and without the
    latent cache; the uncached DataLoader path must restore the data order too)."""
    smoke_cfg = apply_overrides(smoke_cfg, cache_latents=cached, batch_size=4, flip=True)
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


def test_resume_logs_like_an_uninterrupted_run_and_takes_a_new_lr(smoke_cfg):
    """log_freq 3 with checkpoints every 2 steps: the losses since the last log line travel in the checkpoint, so
    the resumed step-6 line equals the uninterrupted one; a resume in the same folder logs no step twice; and
    a new --lr / --weight_decay replaces the saved ones along the same schedule."""
    import csv
    import math
    cfg = apply_overrides(smoke_cfg, max_steps=6, save_freq=2, log_freq=3, keep_last=0, eval_freq=0, batch_size=4)
    prepared = prepare_data(cfg, pick_device("cpu"))
    straight = train(cfg, prepared, progress=False)
    out = Path(cfg.train.output_dir)
    resumed = train(apply_overrides(cfg, ckpt_path=str(out / "ckpt_last/unet_sch_4")), prepared, progress=False)
    assert [h["step"] for h in resumed] == [3, 6]
    assert resumed[-1]["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-5)
    with (out / "loss_log.csv").open() as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [3, 6]
    train(apply_overrides(cfg, ckpt_path=str(out / "ckpt_last/unet_sch_4"), lr=1e-5, weight_decay=0.5), prepared,
          progress=False)
    state = torch.load(out / "ckpt_last/unet_sch_6/training_state.pt", weights_only=False)
    group = state["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0.5 and group["initial_lr"] == 1e-5
    # step 6 ran at step index 5 of the cosine schedule: 2 warm-up steps, then 0.5 (1 + cos(pi (5 - 2) / 4))
    with (out / "loss_log.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    assert float(last["lr"]) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))


def test_constant_schedule_warms_up(smoke_cfg):
    history = train(apply_overrides(smoke_cfg, max_steps=4, warmup_steps=2, log_freq=1, lr_schedule="constant",
                                    eval_freq=0, lr=1e-3), progress=False)
    assert [h["lr"] for h in history] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])  # the rate each step ran at


def test_resume_with_fewer_max_steps_says_where_the_schedule_now_is(smoke_cfg, capsys):
    cfg = apply_overrides(smoke_cfg, max_steps=4, save_freq=2, eval_freq=0, lr_schedule="cosine", warmup_steps=0)
    train(cfg, progress=False)
    capsys.readouterr()
    from hw6utils.sampling import load_model
    assert load_model(cfg.train.output_dir + "/ckpt_last/unet_sch_2").steps == 2  # not the run's max_steps (4)
    assert load_model("reference").steps == 18000  # an exported model: its config's max_steps
    train(apply_overrides(cfg, max_steps=3, ckpt_path=cfg.train.output_dir + "/ckpt_last/unet_sch_2"), progress=False)
    out = capsys.readouterr().out
    # cosine over 3 steps, at step 2: lr x (1 + cos(pi x 2/3)) / 2 = lr / 4
    assert f"note: max_steps 4 -> 3: the cosine schedule now ends at step 3, so the learning rate at step 2 is " \
           f"{cfg.train.lr / 4:.3g}" in out


def run_on_a_clock(training_clock, cfg, prepared, seconds_per_step: float, reserve_steps: int = 0) -> list:
    """train() with training's clock replaced by one that moves seconds_per_step with every optimizer step."""
    training_clock(seconds_per_step)
    return train(cfg, prepared, progress=False, reserve_steps=reserve_steps)


def test_time_budget_ends_the_run_and_its_schedule_at_the_steps_that_fit(smoke_cfg, training_clock, capsys):
    """At 1 s a step, a 1-minute budget with 10 steps' worth kept free fits 50 of the 200 steps asked: the run
    stops at step 50, saves it with max_steps 50 in its config, and its cosine schedule ends there (the last step
    runs at the rate of step index 49 of 50, not of 200)."""
    import math

    from hw6utils.config import load_config
    cfg = apply_overrides(smoke_cfg, max_steps=200, time_budget=1.0, batch_size=4, log_freq=1, eval_freq=0,
                          save_freq=1000, warmup_steps=2, lr_schedule="cosine")
    history = run_on_a_clock(training_clock, cfg, prepare_data(cfg, pick_device("cpu")), 1.0, reserve_steps=10)
    assert history[-1]["step"] == 50
    ckpt = Path(cfg.train.output_dir) / "ckpt_last" / "unet_sch_50"
    assert load_config(ckpt / "hw6_config.json").train.max_steps == 50
    lr = cfg.train.lr
    assert history[-1]["lr"] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (49 - 2) / (50 - 2))))
    assert history[12]["lr"] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (12 - 2) / (200 - 2))))  # before the fit
    rates = [h["lr"] for h in history[2:]]
    assert all(b <= a for a, b in zip(rates, rates[1:]))  # rebuilt in place: no jump when the schedule shortens
    assert "time_budget 1 min: at 1.0 steps/s, training ends at step 50 of 200" in capsys.readouterr().out


def test_a_time_budget_that_is_not_reached_changes_nothing(smoke_cfg, training_clock):
    cfg = apply_overrides(smoke_cfg, max_steps=30, batch_size=4, log_freq=1, eval_freq=0, save_freq=1000)
    prepared = prepare_data(cfg, pick_device("cpu"))
    plain = train(cfg, prepared, progress=False)
    budgeted = run_on_a_clock(training_clock, apply_overrides(cfg, output_dir=cfg.train.output_dir + "_b", time_budget=1.0),
                              prepared, 1.0)
    assert [h["step"] for h in budgeted] == list(range(1, 31))
    for key in ("loss", "lr"):
        assert [h[key] for h in budgeted] == pytest.approx([h[key] for h in plain], rel=1e-6), key


def test_a_pace_probe_times_a_step_and_leaves_the_run_after_it_unchanged(smoke_cfg, training_clock):
    """seconds_per_step times the last third of a short run in a scratch folder (here on a clock of 0.5 s a step); a
    run that shares its prepared data afterwards draws and learns what it would have without it."""
    cfg = apply_overrides(smoke_cfg, max_steps=4, batch_size=4, log_freq=1, eval_freq=0, save_freq=1000)
    prepared = prepare_data(cfg, pick_device("cpu"))
    plain = train(cfg, prepared, progress=False)
    training_clock(0.5)
    assert seconds_per_step(cfg, prepared, steps=6) == pytest.approx(0.5)
    after = train(apply_overrides(cfg, output_dir=cfg.train.output_dir + "_b"), prepared, progress=False)
    assert [h["loss"] for h in after] == pytest.approx([h["loss"] for h in plain], rel=1e-6)


def test_resume_rejects_a_missing_checkpoint(smoke_cfg):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(apply_overrides(smoke_cfg, ckpt_path="last"), progress=False)


def test_min_snr_weights_the_x0_error_alike_for_eps_and_v_and_the_floor_keeps_the_noisiest_steps(smoke_cfg):
    from hw6utils.training import loss_weights
    scheduler = make_noise_scheduler(smoke_cfg)
    timesteps = torch.tensor([0, 300, 600, 800, 900, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    eps = loss_weights(scheduler, timesteps, 5.0, "epsilon")
    v = loss_weights(scheduler, timesteps, 5.0, "v_prediction")
    # ||eps_hat - eps||^2 = SNR ||x0_hat - x0||^2, ||v_hat - v||^2 = (SNR + 1) ||x0_hat - x0||^2: both min(SNR, 5) on x0
    assert torch.allclose(eps * snr, snr.clamp(max=5.0), rtol=1e-4)
    assert torch.allclose(v * (snr + 1), snr.clamp(max=5.0), rtol=1e-4)
    floored = loss_weights(scheduler, timesteps, 5.0, "v_prediction", snr_floor=1.0)
    assert torch.allclose(floored * (snr + 1), snr.clamp(min=1.0, max=5.0), rtol=1e-4)
    assert v[-1] < 1e-6 and floored[-1] > 0.99  # the noisiest step: next to nothing without the floor, full with it
    assert torch.equal(floored[snr >= 1], v[snr >= 1])  # from SNR 1 on, min-SNR as before
    assert torch.equal(loss_weights(scheduler, timesteps, 5.0, "epsilon", snr_floor=1.0), eps)  # eps: no floor


@pytest.mark.parametrize("snr_floor", [0.0, 1.0])
def test_the_v_loss_is_the_x0_error_weighed_by_clamped_snr(smoke_cfg, snr_floor):
    """A UNet whose x_0 is off by 0.1 everywhere: diffusion_loss with v-prediction is mean(clamp(SNR, floor, 5)) *
    0.1^2, so ||v_hat - v||^2 = (SNR + 1) ||x0_hat - x0||^2 holds and the floor reaches the loss."""
    from types import SimpleNamespace

    from hw6utils.training import diffusion_loss
    cfg = apply_overrides(smoke_cfg, prediction_type="v_prediction", snr_floor=snr_floor, mixed_precision="no")
    scheduler = make_noise_scheduler(cfg)
    timesteps = torch.tensor([0, 300, 600, 800, 900, 999])
    latents, noise = torch.randn(6, 4, 4, 4, dtype=torch.float64), torch.randn(6, 4, 4, 4, dtype=torch.float64)
    alpha_bar = scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def off_by_a_tenth(noisy, t, **text):
        x0_hat = latents + 0.1
        eps_hat = (noisy.double() - a * x0_hat) / s
        return SimpleNamespace(sample=a * eps_hat - s * x0_hat)  # v of that x_0
    off_by_a_tenth.config = SimpleNamespace(class_embed_type=None)
    text = {"emb": torch.zeros(6, 3, 8), "mask": torch.ones(6, 3)}
    batch = {"latents": latents.float(), "text": text, "drop": torch.zeros(6, dtype=torch.bool),
             "noise": noise.float(), "timesteps": timesteps}
    loss = diffusion_loss(off_by_a_tenth, scheduler, batch, {"emb": torch.zeros(1, 3, 8), "mask": torch.ones(1, 3)}, cfg)
    snr = alpha_bar.view(-1) / (1 - alpha_bar.view(-1))
    assert loss.item() == pytest.approx(0.01 * snr.clamp(min=snr_floor, max=5.0).mean().item(), rel=1e-3)


def test_v_prediction_trains_and_is_saved_in_the_schedule(smoke_cfg):
    cfg = apply_overrides(smoke_cfg, max_steps=2, prediction_type="v_prediction", eval_freq=0)
    history = train(cfg, progress=False)
    assert torch.isfinite(torch.tensor(history[-1]["loss"]))
    saved = json.loads((Path(cfg.train.output_dir) / "ckpt_last/unet_sch_2/scheduler/scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"


def test_flow_matching_learns_the_velocity_of_a_straight_line_and_samples_with_euler_steps(smoke_cfg, tmp_path):
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    from hw6utils.checkpoints import export_pipeline
    from hw6utils.sampling import load_model
    from hw6utils.training import diffusion_loss, make_noise_scheduler, noise_draws
    cfg = apply_overrides(smoke_cfg, prediction_type="flow", timestep_sampling="logit_normal", timestep_mean=1.0,
                          mixed_precision="no", cond_drop_prob=0.0)
    latents = torch.randn(5, 4, 4, 4)
    drop, noise, timesteps = noise_draws(cfg, latents.shape, torch.Generator().manual_seed(0))
    assert timesteps.dtype == torch.float32 and 0 < timesteps.min() and timesteps.max() < 1000
    seen = []

    def oracle(noisy, t, **text):  # the true velocity eps - x_0 of every x_s on the line
        seen.append((noisy, t))
        return SimpleNamespace(sample=noise - latents)
    oracle.config = SimpleNamespace(class_embed_type=None)
    text = {"emb": torch.zeros(5, 3, 8), "mask": torch.ones(5, 3)}
    batch = {"latents": latents, "text": text, "drop": drop, "noise": noise, "timesteps": timesteps}
    null_text = {"emb": torch.zeros(1, 3, 8), "mask": torch.ones(1, 3)}
    loss = diffusion_loss(oracle, make_noise_scheduler(cfg), batch, null_text, cfg)
    s = (timesteps / 1000).view(-1, 1, 1, 1)
    assert loss.item() == 0 and torch.equal(seen[0][1], timesteps)
    assert torch.allclose(seen[0][0], (1 - s) * latents + s * noise)  # x_s on the line from x_0 to eps

    history = train(apply_overrides(cfg, max_steps=2, eval_freq=0), progress=False)
    assert torch.isfinite(torch.tensor(history[-1]["loss"]))
    model = load_model("last", cfg.train.output_dir)
    assert isinstance(model.pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    image = model.pipe("A red circle.", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                       output_type="np").images[0]
    assert image.shape == (cfg.data.image_size, cfg.data.image_size, 3)
    with pytest.raises(ValueError, match="sampler 'dpmpp' does not sample a flow-matching model"):
        load_model("last", cfg.train.output_dir, sampler="dpmpp")
    exported = load_model(str(export_pipeline(model, tmp_path / "export")))  # a pipeline folder keeps its sampler
    assert isinstance(exported.pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    again = exported.pipe("A red circle.", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                          output_type="np").images[0]
    assert abs(again - image).max() < 1e-5


def test_latent_cache_is_reused_and_rebuilt_when_the_data_changes(smoke_cfg, tmp_path):
    import shutil
    import warnings

    from hw6utils.data import load_course_data
    from hw6utils.encoders import load_vae
    from hw6utils.training import cache_latents
    data_dir = tmp_path / "data"
    shutil.copytree(smoke_cfg.data.data_dir, data_dir)
    cfg = apply_overrides(smoke_cfg, data_dir=str(data_dir), cache_dir="")  # '' = <output_dir>/cache
    vae = load_vae(cfg.encoders.vae)
    first = cache_latents(load_course_data(data_dir), vae, cfg)[0]
    files = list((Path(cfg.train.output_dir) / "cache").iterdir())
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    assert torch.equal(cache_latents(load_course_data(data_dir), vae, cfg)[0], first)
    assert files[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    victim = sorted((data_dir / "train").iterdir())[0]
    victim.write_bytes(b"not a png")  # a corrupt image: skipped with a warning, and a new cache
    data = load_course_data(data_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mean, _ = cache_latents(data, vae, cfg)
    assert any("unreadable or corrupt" in str(w.message) for w in caught)
    assert mean.shape[1] == first.shape[1] - 1 == len(data.image_paths) == len(data.image_keys)
    assert victim not in data.image_paths
    assert len(list((Path(cfg.train.output_dir) / "cache").iterdir())) == 2
    with torch.no_grad():  # the same VAE name and config with other weights (a fine-tuned VAE): rebuilt too
        next(vae.parameters()).mul_(1.01)
    assert not torch.equal(cache_latents(load_course_data(data_dir), vae, cfg)[0], mean)
    assert len(list((Path(cfg.train.output_dir) / "cache").iterdir())) == 3


def test_runs_sharing_a_cache_dir_encode_the_captions_once(smoke_cfg, tmp_path, monkeypatch):
    import hw6utils.training as training
    encoded = []
    real_encode_text = training.encode_text
    monkeypatch.setattr(training, "encode_text", lambda tok, model, prompts, *args: encoded.append(len(prompts))
                        or real_encode_text(tok, model, prompts, *args))
    cfg = apply_overrides(smoke_cfg, cache_dir=str(tmp_path / "shared"), output_dir=str(tmp_path / "a"))
    first = training.prepare_data(cfg, "cpu")
    assert sum(encoded) == 1 + 600  # the empty prompt and every unique caption
    kinds = sorted(path.name.split("_")[0] for path in (tmp_path / "shared").iterdir())
    assert kinds == ["captions", "latents"] and not (tmp_path / "a").exists()
    encoded.clear()
    again = training.prepare_data(apply_overrides(cfg, output_dir=str(tmp_path / "b")), "cpu")  # another run
    assert encoded == [1]  # only the empty prompt: the captions were read back
    for name in ("emb", "mask", "pooled"):
        assert torch.equal(again.text_table[name], first.text_table[name])
    assert torch.equal(again.latent_mean, first.latent_mean)
    other = training.prepare_data(apply_overrides(cfg, add_token_embeddings=True), "cpu")  # other text states
    assert sum(encoded) == 1 + 1 + 600 and len(list((tmp_path / "shared").iterdir())) == 3
    assert not torch.equal(other.text_table["emb"], first.text_table["emb"])


def test_precision_bf16_or_fp16_where_a_gpu_has_no_bf16(monkeypatch):
    from hw6utils.models import amp_dtype
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype(cpu, "bf16") == torch.bfloat16 and amp_dtype(cpu, "fp16") == torch.float16
    assert amp_dtype(cpu, "no") is None
    with pytest.raises(ValueError, match="mixed_precision must be"):
        amp_dtype(cpu, "fp8")
    # T4 / V100: is_bf16_supported() is True there (emulation), but there are no bf16 convolutions
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or False)
    assert amp_dtype(cuda, "bf16") == torch.float16 and asked == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype(cuda, "bf16") == torch.bfloat16


def test_fp16_trains_with_a_grad_scaler(smoke_cfg, monkeypatch, capsys):
    scaled = []
    real_scale = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, x: scaled.append(self.is_enabled()) or
                        real_scale(self, x))
    cfg = apply_overrides(smoke_cfg, max_steps=30, batch_size=16, lr=3e-3, warmup_steps=5, log_freq=5, eval_freq=0,
                          mixed_precision="fp16")
    history = train(cfg, progress=False)
    assert "fp16 + GradScaler on cpu" in capsys.readouterr().out
    assert len(scaled) == 30 and all(scaled)  # every micro-batch's loss was scaled before backward
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert history[-1]["loss"] < 0.9 * history[0]["loss"], history


def test_a_resumed_fp16_run_goes_on_at_the_saved_loss_scale(smoke_cfg):
    """The GradScaler's learned scale travels in training_state.pt; without it a resumed run would start again at
    65536 and skip steps while it overflows its way back down."""
    cfg = apply_overrides(smoke_cfg, max_steps=2, save_freq=1, eval_freq=0, keep_last=0, mixed_precision="fp16")
    train(cfg, progress=False)
    root = Path(cfg.train.output_dir) / "ckpt_last"
    state_file = root / "unet_sch_2" / "training_state.pt"
    state = torch.load(state_file, weights_only=False)
    assert set(state["grad_scaler"]) >= {"scale", "_growth_tracker"}
    state["grad_scaler"]["scale"] = 1024.0  # as if the run had settled there
    torch.save(state, state_file)
    train(apply_overrides(cfg, max_steps=3, ckpt_path="last"), progress=False)
    assert torch.load(root / "unet_sch_3" / "training_state.pt", weights_only=False)["grad_scaler"]["scale"] == 1024.0
    # bf16 has no scaler: nothing saved, and a bf16 checkpoint resumes as before
    bf16 = apply_overrides(cfg, mixed_precision="bf16", output_dir=cfg.train.output_dir + "_bf16")
    train(bf16, progress=False)
    assert torch.load(Path(bf16.train.output_dir) / "ckpt_last" / "unet_sch_2" / "training_state.pt",
                      weights_only=False)["grad_scaler"] == {}


def test_adamw_is_fused_on_the_cpu_too_and_takes_the_loops_step():
    """fused_adamw (on by default) runs AdamW's fused kernel on the CPU as on CUDA (the tiny preset's step 1.09x
    faster on 2 cores); off, AdamW's loop over the parameters. Both take the same step from the same gradients."""
    from hw6utils.config import get_preset
    from hw6utils.training import setup_unet
    cpu, weights = torch.device("cpu"), {}
    latents, timesteps, text = torch.randn(4, 4, 8, 8), torch.tensor([10, 300, 600, 900]), torch.randn(4, 32, 384)
    flat = lambda unet: torch.cat([p.detach().flatten() for p in unet.parameters()])  # noqa: E731
    for fused in (True, False):
        cfg = get_preset("smoke", fused_adamw=fused, mixed_precision="no", lr=1e-2)
        unet, _, optimizer = setup_unet(cfg, 384, cpu)
        assert optimizer.defaults["fused"] is fused
        initial = flat(unet)  # the same both times: setup_unet seeds the weights
        for _ in range(3):
            out = unet(latents, timesteps, text, class_labels=text.mean(1)).sample
            torch.nn.functional.mse_loss(out, latents).backward()
            optimizer.step()
            optimizer.zero_grad()
        weights[fused] = flat(unet)
        assert (weights[fused] - initial).abs().max() > 1e-3  # the steps moved the weights (lr 1e-2)
    assert torch.allclose(weights[True], weights[False], atol=1e-5)


def test_step_report_reads_the_losses_and_the_stop_flag_in_one_go():
    from hw6utils.training import step_report
    assert step_report([torch.tensor(0.5), torch.tensor(0.25)], False, 1) == ([0.5, 0.25], False)
    assert step_report([torch.tensor(float("inf"))], True, 1) == ([float("inf")], True)


def test_dataloader_workers_leave_ctrl_c_to_the_main_process():
    import signal
    from hw6utils.training import ignore_sigint
    before = signal.getsignal(signal.SIGINT)
    try:
        ignore_sigint(0)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_timesteps_are_uniform_or_logit_normal_and_sharded_alike():
    from hw6utils.config import get_preset
    from hw6utils.training import noise_draws
    uniform = get_preset("smoke")
    _, _, t = noise_draws(uniform, (2000, 4, 2, 2), torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)  # the uniform draws are DDPM's randint, after dropout and noise
    torch.rand(2000, generator=generator), torch.randn((2000, 4, 2, 2), generator=generator)
    assert torch.equal(t, torch.randint(0, 1000, (2000,), generator=generator))
    noisy = get_preset("smoke", timestep_sampling="logit_normal", timestep_mean=1.0)
    _, _, t = noise_draws(noisy, (2000, 4, 2, 2), torch.Generator().manual_seed(0))
    assert 0 <= t.min() and t.max() <= 999 and t.dtype == torch.long
    assert 0.5 < (t >= 500).float().mean() and 650 < t.float().mean() < 750  # E[sigmoid(N(1, 1))] ~ 0.70
    # two processes draw the global batch and keep their halves: together, one process's batch
    halves = [noise_draws(noisy, (1000, 4, 2, 2), torch.Generator().manual_seed(0), (rank, 2))[2] for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), t)
    # a wider density (timestep_std) reaches both ends: the low-noise steps that sharpen edges come up more often
    wide = get_preset("smoke", timestep_sampling="logit_normal", timestep_mean=1.0, timestep_std=2.0)
    _, _, t_wide = noise_draws(wide, (2000, 4, 2, 2), torch.Generator().manual_seed(0))
    assert (t_wide < 200).float().mean() > 2 * (t < 200).float().mean()
    assert 0.1 < (t_wide < 200).float().mean() < 0.2  # P(sigmoid(N(1, 4)) < 0.2) = P(z < -1.19) ~ 0.12
    with pytest.raises(ValueError, match="timestep_std must be a number >= 0"):
        get_preset("smoke", timestep_std=-1.0)
    with pytest.raises(ValueError, match="timestep_sampling must be one of"):
        get_preset("smoke", timestep_sampling="logit-normal")


def test_text_noise_jitters_the_token_states_only_when_asked_and_shards_alike():
    from types import SimpleNamespace

    from hw6utils.config import get_preset
    from hw6utils.training import Prepared, draw_batch
    vae = SimpleNamespace(config=SimpleNamespace(latent_channels=4, latents_mean=None, latents_std=None,
                                                 scaling_factor=1.0, shift_factor=None))
    table = {"emb": torch.randn(3, 5, 8), "mask": torch.ones(3, 5), "pooled": torch.randn(3, 8)}
    prepared = Prepared(data=None, tokenizer=None, text_model=None, vae=vae, encode=None, null_text={},
                        latent_mean=torch.randn(1, 6, 4, 2, 2), latent_std=torch.ones(1, 6, 4, 2, 2) * 0.1,
                        text_table=table, caption_ids=[[[i % 3] for i in range(6)]])
    plain = get_preset("smoke", batch_size=400)
    batch = draw_batch(prepared, plain, torch.Generator().manual_seed(0), "cpu")
    assert all(any(torch.equal(row, states) for states in table["emb"]) for row in batch["text"]["emb"])  # as cached
    noisy = get_preset("smoke", batch_size=400, text_noise=0.5)
    jittered = draw_batch(prepared, noisy, torch.Generator().manual_seed(0), "cpu")
    for k in ("latents", "noise", "timesteps", "drop"):  # the other draws are those of a run without it
        assert torch.equal(jittered[k], batch[k]), k
    assert torch.equal(jittered["text"]["pooled"], batch["text"]["pooled"])
    jitter = jittered["text"]["emb"] - batch["text"]["emb"]
    assert 0.45 < jitter.std() < 0.55 and abs(jitter.mean()) < 0.02
    halves = [draw_batch(prepared, get_preset("smoke", batch_size=200, text_noise=0.5),
                         torch.Generator().manual_seed(0), "cpu", (rank, 2)) for rank in (0, 1)]
    assert torch.equal(torch.cat([h["text"]["emb"] for h in halves]), jittered["text"]["emb"])
    with pytest.raises(ValueError, match="text_noise must be a number >= 0"):
        get_preset("smoke", text_noise=-0.1)
