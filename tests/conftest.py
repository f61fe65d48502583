"""Tiny fixtures built from configs (as diffusers' own tests do): no downloads, seconds on a CPU."""
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*accelerate.*")

from checkout import pythonpath_with_checkout  # noqa: E402
from hw6utils.config import get_preset  # noqa: E402
from hw6utils.data import build_shapes_dataset  # noqa: E402
from hw6utils.models import build_vae  # noqa: E402


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """The shapes set with one frame per object-action (200 images)."""
    return build_shapes_dataset(tmp_path_factory.mktemp("shapes") / "shapes", frames=1, seed=0)


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A random-weight 3-level AutoencoderKL (f=4) saved with save_pretrained, with per-channel latent stats."""
    torch.manual_seed(0)
    vae = build_vae(get_preset("smoke", vae_block_out_channels=(8, 8, 8)))
    vae.register_to_config(latents_mean=[0.0, 0.1, 0.0, -0.1], latents_std=[0.5, 0.5, 0.6, 0.4])
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def encoded_cache_dir(tmp_path_factory):
    """One cache_dir for every smoke run: the 600 captions and 200 latents are encoded once per session, not once
    per training (MiniLM takes 5-15 s over them on one CPU thread)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def smoke_cfg(shapes_dir, vae_dir, encoded_cache_dir, tmp_path):
    """The smoke preset on the small shapes set and the random VAE, writing into a fresh folder."""
    return get_preset("smoke", data_dir=str(shapes_dir), vae=str(vae_dir), output_dir=str(tmp_path / "outputs"),
                      cache_dir=str(encoded_cache_dir))


@pytest.fixture
def kernels_import_this_checkout(monkeypatch):
    """Put this checkout first on PYTHONPATH, so that notebook kernels and subprocesses import its hw6utils, also
    where it is not pip-installed."""
    monkeypatch.setenv("PYTHONPATH", pythonpath_with_checkout())


@pytest.fixture
def training_clock(monkeypatch):
    """training_clock(seconds): training's clock (time.time, which time_budget reads) moves that many seconds with
    every optimizer step and not otherwise, so a budget binds at a known step."""
    import time
    import types

    from hw6utils import training

    def set_pace(seconds_per_step: float) -> None:
        clock = [0.0]
        monkeypatch.setattr(training, "time", types.SimpleNamespace(time=lambda: clock[0], strftime=time.strftime))
        step = training.optimizer_step

        def timed_step(run):
            clock[0] += seconds_per_step
            return step(run)
        monkeypatch.setattr(training, "optimizer_step", timed_step)
    return set_pace
