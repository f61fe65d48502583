"""The bad-input catalogue: each entry gets a one-line error (or a warning where the run can go on).

Entries tested in their own module's tests: missing data folder, malformed train_info.json entries, test.json
entries and escaping image names, misnamed images and keys with no images (test_data), corrupt images
(test_training), unknown preset or key (test_config), hidden-size mismatch (test_models), long prompts
(test_encoders).
"""
import json
from pathlib import Path

import pytest
import torch

from hw6utils.config import apply_overrides
from hw6utils.data import load_course_data, load_images, load_test_prompts
from hw6utils.sampling import list_checkpoints
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
