"""The bad-input catalogue: each entry gets a one-line error (or a warning where the run can go on).

Entries tested in their own module's tests: missing data folder, malformed train_info.json entries, test.json
entries and escaping image names, misnamed images and keys with no images (test_data), corrupt images
(test_training), unknown preset or key (test_config), hidden-size mismatch (test_models), long prompts
(test_encoders).
"""
import json
import os
from pathlib import Path

import pytest
import torch

from hw6utils.config import apply_overrides
from hw6utils.data import load_course_data, load_images, load_test_prompts
from hw6utils.checkpoints import list_checkpoints
from hw6utils.training import train


def test_test_json_that_is_not_json_or_not_an_object(tmp_path):
    path = tmp_path / "test.json"
    path.write_text("{oops")
    with pytest.raises(ValueError, match="test.json: not valid JSON"):
        load_test_prompts(path)
    path.write_text('"just a string"')
    with pytest.raises(ValueError, match="test.json: expected a JSON object at the top level, got str"):
        load_test_prompts(path)
    path.write_text(json.dumps({"1": {"text_prompt": "x", "image_name": "/etc/x.png"}}))
    with pytest.raises(ValueError, match="field 'image_name' must be a plain file name"):
        load_test_prompts(path)
    path.write_text(json.dumps({"1": {"text_prompt": "x"}}))
    with pytest.raises(ValueError, match=r"entry '1': field 'image_name' is missing \(expected a file name ending in .png\)"):
        load_test_prompts(path)
    path.write_text("{}")
    with pytest.raises(ValueError, match="test.json: no entries"):
        load_test_prompts(path)


def test_all_images_corrupt_is_an_error(tmp_path, shapes_dir):
    data = load_course_data(shapes_dir)
    for path in data.image_paths[:3]:
        (tmp_path / path.name).write_bytes(b"junk")
    data.image_paths = [tmp_path / p.name for p in data.image_paths[:3]]
    data.image_keys = data.image_keys[:3]
    with pytest.warns(UserWarning, match="unreadable or corrupt image"):
        with pytest.raises(ValueError, match="every training image is unreadable"):
            load_images(data, 16)


def test_output_folder_that_cannot_be_written(smoke_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="a_file/out: output folder is not writable"):
        train(apply_overrides(smoke_cfg, output_dir=str(blocker / "out")), progress=False)


def test_ckpt_path_that_does_not_exist_or_holds_no_weights(smoke_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: ckpt_path must be a checkpoint folder"):
        train(apply_overrides(smoke_cfg, ckpt_path=str(tmp_path / "nowhere")), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: ckpt_path must be a checkpoint folder"):
        train(apply_overrides(smoke_cfg, ckpt_path=str(tmp_path / "empty")), progress=False)


def test_checkpoint_of_another_architecture(smoke_cfg):
    train(apply_overrides(smoke_cfg, max_steps=1, eval_freq=0), progress=False)
    other = apply_overrides(smoke_cfg, max_steps=2, eval_freq=0, block_out_channels=(8, 16), ckpt_path="last")
    with pytest.raises(ValueError, match=r"checkpoint's UNet config differs from the preset in \['block_out_channels'"):
        train(other, progress=False)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(smoke_cfg, monkeypatch):
    import hw6utils.training as training
    cfg = apply_overrides(smoke_cfg, max_steps=2, eval_freq=0, save_freq=1)
    train(cfg, progress=False)
    real_loss = training.diffusion_loss  # a NaN that backward goes through, as a diverging run's would
    monkeypatch.setattr(training, "diffusion_loss", lambda *args, **kwargs: real_loss(*args, **kwargs) * float("nan"))
    with pytest.raises(FloatingPointError, match="loss is nan at step 3"):
        train(apply_overrides(cfg, max_steps=4, ckpt_path="last"), progress=False)
    assert [p.name for p in list_checkpoints(Path(cfg.train.output_dir) / "ckpt_last")] == ["unet_sch_1", "unet_sch_2"]


def test_disk_full_while_saving_leaves_the_previous_checkpoint_intact(smoke_cfg, monkeypatch):
    import errno

    import hw6utils.training as training
    cfg = apply_overrides(smoke_cfg, max_steps=1, eval_freq=0)
    train(cfg, progress=False)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training.torch, "save", full_disk)
    with pytest.raises(OSError, match="unet_sch_2: could not write the checkpoint .*No space left on device"):
        train(apply_overrides(cfg, max_steps=2, ckpt_path="last"), progress=False)
    root = Path(cfg.train.output_dir) / "ckpt_last"
    assert sorted(p.name for p in root.iterdir()) == ["unet_sch_1"]  # no partial folder left behind
    monkeypatch.undo()
    train(apply_overrides(cfg, max_steps=2, ckpt_path="last"), progress=False)  # and it resumes from it


def test_a_really_full_disk_while_saving(smoke_cfg, tmp_path):
    """A size-limited tmpfs (needs mount rights, as root in CI): the second checkpoint does not fit. Whatever the
    writer raises (torch's RuntimeError, safetensors' own error, OSError), it is one OSError naming the
    checkpoint, no partial folder is left, and the first checkpoint still resumes (elsewhere)."""
    import subprocess
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=11m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        cfg = apply_overrides(smoke_cfg, max_steps=1, eval_freq=0, keep_last=0, output_dir=str(disk / "outputs"))
        train(cfg, progress=False)
        with pytest.raises(OSError, match="unet_sch_2: could not write the checkpoint"):
            train(apply_overrides(cfg, max_steps=2, ckpt_path="last"), progress=False)
        root = disk / "outputs" / "ckpt_last"
        assert sorted(p.name for p in root.iterdir()) == ["unet_sch_1"]
        train(apply_overrides(cfg, max_steps=2, ckpt_path=str(root / "unet_sch_1"), output_dir=str(tmp_path / "more")),
              progress=False)  # the checkpoint left on the full disk is whole: it resumes on another one
        assert (tmp_path / "more" / "ckpt_last" / "unet_sch_2").is_dir()
    finally:
        import gc
        gc.collect()  # drop the loaded checkpoints' memory maps, then detach (lazily, if still busy)
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    assert not any(str(disk) in line for line in Path("/proc/mounts").read_text().splitlines())


def test_data_check_opens_every_image_and_lists_each_that_fails(tmp_path, shapes_dir):
    import shutil

    from hw6utils.data import check_course_data
    root = tmp_path / "data"
    shutil.copytree(shapes_dir, root)
    train_dir = root / "train"
    good = sorted(train_dir.iterdir())
    good[0].write_bytes(os.urandom(2000))                    # random bytes
    good[1].write_bytes(good[1].read_bytes()[:300])          # a truncated PNG
    good[2].write_bytes(b"")                                 # 0 bytes
    data = good[3].read_bytes()                              # a flipped byte in the pixel data (bad CRC)
    good[3].write_bytes(data[:-30] + bytes([data[-30] ^ 0xFF]) + data[-29:])
    name = good[4].name.rsplit("_", 1)[0] + "_77.png"
    (train_dir / name).mkdir()                               # a directory named like an image
    report = check_course_data(root)
    problems = "\n".join(report["problems"])
    for path in [*good[:4], train_dir / name]:
        assert f"{path}: " in problems, (path.name, problems)
    assert f"{good[5]}" not in problems
    assert report["images"] == len(good) + 1 and report["unreadable_images"] == 5


def test_data_check_finds_no_problem_in_a_good_set(shapes_dir):
    from hw6utils.data import check_course_data
    report = check_course_data(shapes_dir)
    assert report["unreadable_images"] == 0 and report["problems"] == []


def test_a_truncated_or_garbage_latent_cache_is_rebuilt_with_a_warning(smoke_cfg):
    from hw6utils.config import apply_overrides
    from hw6utils.data import load_course_data
    from hw6utils.encoders import load_vae
    from hw6utils.training import cache_latents
    smoke_cfg = apply_overrides(smoke_cfg, cache_dir="")  # its own <output_dir>/cache, not the session's
    vae = load_vae(smoke_cfg.encoders.vae)
    first = cache_latents(load_course_data(smoke_cfg.data.data_dir), vae, smoke_cfg)[0]
    cache = Path(smoke_cfg.train.output_dir) / "cache"
    path = next(cache.iterdir())
    orphan = cache / f"{path.name}.{2 ** 22 + 1}.tmp"       # a killed run's partial file (no such process)
    orphan.write_bytes(b"partial")
    alive = cache / f"{path.name}.{os.getppid()}.tmp"      # another process still writing it: left alone
    alive.write_bytes(b"partial")
    for damage in (path.read_bytes()[:len(path.read_bytes()) // 2], b"garbage" * 10):
        path.write_bytes(damage)
        with pytest.warns(UserWarning, match=f"{path}: unreadable latent cache .*; rebuilding it"):
            again = cache_latents(load_course_data(smoke_cfg.data.data_dir), vae, smoke_cfg)[0]
        assert torch.equal(again, first)
    assert not orphan.exists() and alive.exists()


def corrupt(path: Path) -> None:
    """Cut a file in half, as a full disk or a killed copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_a_truncated_checkpoint_file_names_it_and_the_newest_intact_checkpoint(smoke_cfg, capsys):
    import shutil

    from hw6utils.cli import main
    cfg = apply_overrides(smoke_cfg, max_steps=2, eval_freq=0, save_freq=1, keep_last=0)
    train(cfg, progress=False)
    root = Path(cfg.train.output_dir) / "ckpt_last"
    shutil.copytree(root / "unet_sch_2", root.parent / "kept")
    for name in ("training_state.pt", "diffusion_pytorch_model.safetensors", "ema/diffusion_pytorch_model.safetensors"):
        corrupt(root / "unet_sch_2" / name)
        capsys.readouterr()
        assert main(["train", "--output_dir", cfg.train.output_dir, "--ckpt_path", "last", "--max_steps", "3"]) == 2
        message = capsys.readouterr().err.strip()
        assert message.startswith(f"hw6 train: error: {root / 'unet_sch_2' / name}: truncated or corrupt"), message
        assert message.count(str(root / "unet_sch_2")) == 1 and "\n" not in message, message
        assert message.endswith(f"resume from the newest intact checkpoint: --ckpt_path {root / 'unet_sch_1'}"), message
        if name == "training_state.pt":  # the library says the same
            with pytest.raises(ValueError, match=f"{root / 'unet_sch_2' / name}: truncated or corrupt"):
                train(apply_overrides(cfg, max_steps=3, ckpt_path=str(root / "unet_sch_2")), progress=False)
        shutil.rmtree(root / "unet_sch_2")
        shutil.copytree(root.parent / "kept", root / "unet_sch_2")
    assert [p.name for p in list_checkpoints(root)] == ["unet_sch_1", "unet_sch_2"]  # nothing was lost


def test_a_resume_past_max_steps_says_only_that_there_is_nothing_to_train(smoke_cfg, capsys):
    cfg = apply_overrides(smoke_cfg, max_steps=3, eval_freq=0)
    train(cfg, progress=False)
    before = list_checkpoints(Path(cfg.train.output_dir) / "ckpt_last")
    capsys.readouterr()
    train(apply_overrides(cfg, max_steps=2, ckpt_path="last"), progress=False)
    out = capsys.readouterr().out
    assert "nothing to train: the checkpoint is at step 3 and max_steps is 2" in out
    assert "learning rate" not in out and "steps 3 -> 2" not in out, out
    assert list_checkpoints(Path(cfg.train.output_dir) / "ckpt_last") == before


def test_non_finite_loss_before_any_checkpoint_does_not_claim_one_was_kept(smoke_cfg, monkeypatch):
    import hw6utils.training as training
    real_loss = training.diffusion_loss
    monkeypatch.setattr(training, "diffusion_loss", lambda *args, **kwargs: real_loss(*args, **kwargs) * float("nan"))
    with pytest.raises(FloatingPointError) as err:
        train(apply_overrides(smoke_cfg, max_steps=2, eval_freq=0), progress=False)
    assert "loss is nan at step 1" in str(err.value) and "no checkpoint was saved yet" in str(err.value)
    assert "last checkpoint kept" not in str(err.value)


@pytest.mark.parametrize("kind", ["text encoder", "VAE"])
def test_a_hub_model_missing_offline_is_one_line_with_the_hub_id(kind):
    from hw6utils.encoders import load_text_encoder, load_vae  # (conftest sets HF_HUB_OFFLINE=1)
    with pytest.raises(FileNotFoundError) as err:
        if kind == "VAE":
            load_vae("no-such-user/no-such-model", "vae")
        else:
            load_text_encoder("no-such-user/no-such-model")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"no-such-user/no-such-model: cannot load the {kind}"), message
    assert "HF_HUB_OFFLINE=1" in message, message
