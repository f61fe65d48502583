"""Scoring during training (eval_metric), the best checkpoint it keeps, and stage 'best'."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hw6utils.config import apply_overrides
from hw6utils.checkpoints import list_checkpoints, resolve_checkpoint
from hw6utils.training import train


def read_rows(path: Path) -> list:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_best_checkpoint_survives_keep_last_and_is_stage_best(smoke_cfg, monkeypatch):
    import hw6utils.training as training
    scores = iter([0.1, 0.9, 0.2, 0.3, 0.95, 0.5])  # best: step 2, then step 5 of the resumed run

    def fake_scorer(cfg):
        return lambda model: {"score": next(scores), "colour_shape": 0.0}
    monkeypatch.setattr(training, "training_scorer", fake_scorer)
    cfg = apply_overrides(smoke_cfg, max_steps=4, eval_freq=1, save_freq=100, keep_last=1, eval_metric="shapes")
    train(cfg, progress=False)
    out = Path(cfg.train.output_dir)
    root = out / "ckpt_last"
    assert [p.name for p in list_checkpoints(root)] == ["unet_sch_2", "unet_sch_4"]  # keep_last=1 kept the best too
    assert json.loads((root / "best.json").read_text())["step"] == 2
    assert resolve_checkpoint("best", str(out)) == root / "unet_sch_2"
    assert [float(r["score"]) for r in read_rows(out / "eval_log.csv")] == [0.1, 0.9, 0.2, 0.3]
    # resuming keeps tracking: step 5 beats 0.9, so the old best (step 2) may go; step 4, resumed from, stays
    train(apply_overrides(cfg, max_steps=6, ckpt_path="last"), progress=False)
    assert json.loads((root / "best.json").read_text())["step"] == 5
    assert [p.name for p in list_checkpoints(root)] == ["unet_sch_4", "unet_sch_5", "unet_sch_6"]


def test_stage_best_without_tracking_says_how_to_get_one(smoke_cfg):
    train(apply_overrides(smoke_cfg, max_steps=1, eval_freq=0), progress=False)
    with pytest.raises(FileNotFoundError, match="no best checkpoint recorded .*--eval_metric"):
        resolve_checkpoint("best", smoke_cfg.train.output_dir)


@pytest.mark.slow
def test_shapes_metric_scores_the_model_while_training(smoke_cfg):
    cfg = apply_overrides(smoke_cfg, max_steps=2, eval_freq=2, eval_metric="shapes", eval_limit=4)
    train(cfg, progress=False)
    rows = read_rows(Path(cfg.train.output_dir) / "eval_log.csv")
    assert len(rows) == 1 and 0.0 <= float(rows[0]["colour_shape"]) <= 1.0


@pytest.mark.slow
def test_fid_metric_with_a_stand_in_extractor_logs_fid_and_clip_t(smoke_cfg, tmp_path):
    from hw6utils.scoring import compute_stats, save_stats
    from test_scoring import tiny_extractor
    extractor = tmp_path / "extractor.pt"
    torch.jit.save(torch.jit.script(tiny_extractor()), str(extractor))
    train_pngs = sorted(Path(smoke_cfg.data.data_dir, "train").glob("*.png"))[:16]
    save_stats(tmp_path / "stats", *compute_stats(train_pngs, torch.jit.load(str(extractor))))
    cfg = apply_overrides(smoke_cfg, max_steps=2, eval_freq=1, eval_metric="fid", eval_limit=4,
                          eval_stats=str(tmp_path / "stats"), eval_inception=str(extractor))
    train(cfg, progress=False)
    rows = read_rows(Path(cfg.train.output_dir) / "eval_log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["fid"])) and float(r["score"]) == -float(r["fid"]) for r in rows)
    best = json.loads((Path(cfg.train.output_dir) / "ckpt_last" / "best.json").read_text())
    assert best["fid"] == min(float(r["fid"]) for r in rows)


def test_fid_metric_without_statistics_fails_before_training(smoke_cfg):
    with pytest.raises(ValueError, match="eval_metric='fid' needs eval_stats"):
        train(apply_overrides(smoke_cfg, eval_metric="fid"), progress=False)
    with pytest.raises(ValueError, match="eval_metric must be"):
        train(apply_overrides(smoke_cfg, eval_metric="FID"), progress=False)
