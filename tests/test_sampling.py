import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from hw6utils.config import apply_overrides, get_preset
from hw6utils.encoders import load_text_encoder, load_vae
from hw6utils.models import build_unet
from hw6utils.pipeline import cpu_conv_backend, denoising_timesteps, unet_kwargs
from hw6utils.sampling import generate, load_model, make_sampler
from hw6utils.training import make_noise_scheduler, train


@pytest.fixture(scope="module")
def parts(vae_dir):
    cfg = get_preset("smoke")
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    tokenizer, text_model = load_text_encoder("minilm")
    from hw6utils.encoders import encode_text
    encode = lambda prompts: encode_text(tokenizer, text_model, prompts, 20)  # noqa: E731
    return cfg, unet, load_vae(str(vae_dir)), encode


def test_sampler_uses_the_training_schedule():
    ddpm = make_noise_scheduler(get_preset("hw6"))
    ddim = make_sampler(ddpm.config)
    assert torch.equal(ddim.betas, ddpm.betas) and ddim.config.beta_schedule == "linear"


@pytest.mark.parametrize("kind", ["ddim", "dpmpp"])
def test_the_scheduler_keeps_its_timesteps_on_the_cpu_and_the_unet_gets_its_own_copy(kind):
    """Every step the scheduler looks t up in its CPU tables: a t on the GPU would make each lookup a GPU read."""
    scheduler = make_sampler(make_noise_scheduler(get_preset("tiny")).config, kind)
    steps = denoising_timesteps(scheduler, 10, torch.device("meta"))  # "meta" stands in for a GPU here
    assert len(steps) == 10 and [int(t) for t, _ in steps] == scheduler.timesteps.tolist()
    assert all(t.device.type == "cpu" and unet_t.device.type == "meta" for t, unet_t in steps)
    assert scheduler.timesteps.device.type == "cpu"


def test_ddim_step_by_hand_matches_the_scheduler():
    ddim = make_sampler(make_noise_scheduler(get_preset("tiny")).config)
    ddim.set_timesteps(10)
    t, prev_t = ddim.timesteps[3], ddim.timesteps[4]
    latents, noise_pred = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    a_t, a_prev = ddim.alphas_cumprod[t], ddim.alphas_cumprod[prev_t]
    pred_x0 = (latents - (1 - a_t).sqrt() * noise_pred) / a_t.sqrt()          # DDIM eq. (12), predicted x_0
    by_hand = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * noise_pred      # plus the direction to x_t (eta = 0)
    assert torch.allclose(ddim.step(noise_pred, t, latents).prev_sample, by_hand, atol=1e-5)


def test_small_cpu_unet_calls_use_the_native_convolution_and_give_the_same_prediction(parts):
    cfg, unet, _, encode = parts
    cpu = torch.device("cpu")
    latents, t, text = torch.randn(2, 4, 16, 16), torch.tensor(500), encode(["A red circle.", "A blue star."])
    with torch.no_grad():
        by_onednn = unet(latents, t, **unet_kwargs(unet, text)).sample
        with cpu_conv_backend(cpu, 2):
            assert not torch.backends.mkldnn.enabled
            native = unet(latents, t, **unet_kwargs(unet, text)).sample
    assert torch.backends.mkldnn.enabled  # restored
    assert torch.allclose(native, by_onednn, atol=1e-4)
    for device, batch in [(cpu, 8), (torch.device("cuda"), 2)]:  # larger batches and GPUs: PyTorch's choice
        with cpu_conv_backend(device, batch):
            assert torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError), cpu_conv_backend(cpu, 4):
        raise RuntimeError("a failed call")
    assert torch.backends.mkldnn.enabled


def test_generate_writes_one_png_per_test_entry(smoke_cfg, tmp_path):
    cfg = apply_overrides(smoke_cfg, max_steps=1, eval_freq=0)
    train(cfg, progress=False)
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps({str(i): {"text_prompt": p, "image_name": f"{i}_main.png"}
                                     for i, p in enumerate(["A red circle.", "A cyan star.", "A big square."])}))
    out = generate(apply_overrides(cfg, test_json=str(test_json), num_inference_steps=3), progress=False)
    assert out.name == "png_1_3"
    assert sorted(p.name for p in out.iterdir()) == ["0_main.png", "1_main.png", "2_main.png"]
    assert Image.open(out / "0_main.png").size == (64, 64)
    before = (out / "1_main.png").stat().st_mtime_ns
    generate(apply_overrides(cfg, test_json=str(test_json), num_inference_steps=3), progress=False)
    assert (out / "1_main.png").stat().st_mtime_ns == before  # existing images are kept (resumable)
    (out / "2_main.png").unlink()  # an interrupted run: only the missing image is made again
    generate(apply_overrides(cfg, test_json=str(test_json), num_inference_steps=3), progress=False)
    assert (out / "2_main.png").is_file() and (out / "1_main.png").stat().st_mtime_ns == before
    # other settings, weights or prompts would mix images made two ways: the old folder moves aside, whole
    def run(**kw):
        return generate(apply_overrides(cfg, test_json=str(test_json), num_inference_steps=3, **kw), progress=False)

    def asides():
        return sorted(p for p in out.parent.glob("png_1_3_prev_*") if p.is_dir())

    original = {p.name: p.read_bytes() for p in out.glob("*.png")}
    run(guidance_scale=9.0)
    assert len(asides()) == 1 and {p.name: p.read_bytes() for p in asides()[0].glob("*.png")} == original
    assert json.loads(asides()[0].with_name(asides()[0].name + ".json").read_text())["guidance_scale"] == 7.5
    assert sorted(p.name for p in out.glob("*.png")) == sorted(original)  # made afresh
    assert (out / "1_main.png").read_bytes() != original["1_main.png"]
    assert json.loads((out.parent / "png_1_3.json").read_text())["guidance_scale"] == 9.0
    made = (out / "1_main.png").stat().st_mtime_ns
    run(guidance_scale=9.0)
    assert len(asides()) == 1 and (out / "1_main.png").stat().st_mtime_ns == made  # the same settings: kept
    subset = json.loads(test_json.read_text())
    del subset["2"]
    test_json.write_text(json.dumps(subset))
    run(guidance_scale=9.0)  # a test.json without 2_main.png: the folder must hold one PNG per entry, no more
    assert len(asides()) == 2 and sorted(p.name for p in out.glob("*.png")) == ["0_main.png", "1_main.png"]
    test_json.write_text(json.dumps({"0": {"text_prompt": "A green star.", "image_name": "0_main.png"}}))
    run(guidance_scale=9.0)  # another prompt for an image already there
    assert len(asides()) == 3
    train(apply_overrides(cfg, max_steps=1, seed=1), progress=False)  # a new run (other weights) at the same step
    run(guidance_scale=9.0)
    assert len(asides()) == 4  # other weights, same folder name
    import shutil
    shutil.copytree(out.parent / "ckpt_last", tmp_path / "moved")  # the same weights elsewhere: the same model
    made = (out / "0_main.png").stat().st_mtime_ns
    run(guidance_scale=9.0, stage=str(tmp_path / "moved" / "unet_sch_1"), output_dir=str(out.parent))
    assert len(asides()) == 4 and (out / "0_main.png").stat().st_mtime_ns == made
    assert load_model("last", cfg.train.output_dir).cfg.train.noise_schedule == "squaredcos_cap_v2"


def test_dpm_solver_uses_the_training_schedule():
    ddpm = make_noise_scheduler(get_preset("smoke"))
    solver = make_sampler(ddpm.config, "dpmpp")
    assert torch.equal(solver.betas, ddpm.betas) and solver.config.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match="sampler must be 'ddim' or 'dpmpp', got 'euler'"):
        make_sampler(ddpm.config, "euler")


def test_generate_evaluate_and_sweep_name_their_outputs_alike(smoke_cfg, shapes_dir):
    from hw6utils.cli import main
    train(apply_overrides(smoke_cfg, max_steps=1, eval_freq=0), progress=False)
    out_dir = smoke_cfg.train.output_dir
    flags = ["--preset", "smoke", "--output_dir", out_dir, "--data_dir", str(shapes_dir), "--stage", "last",
             "--num_inference_steps", "2"]
    assert main(["evaluate", *flags]) == 0
    assert main(["sweep", *flags, "--steps", "2", "--guidance", "2", "--limit", "2"]) == 0
    made = {p.name for p in Path(out_dir).iterdir()}
    assert {"eval_1.json", "eval_1.png", "sweep_1"} <= made, made
