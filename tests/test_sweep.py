"""`hw6 sweep` on the shipped reference model: a few prompts and steps, so a whole grid takes seconds."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from course_fixture import write_course_fixture
from hw6utils.cli import main
from hw6utils.data import shape_test_entries
from hw6utils.evaluation import sweep
from hw6utils.sampling import generate_images, load_model
from test_scoring import extractor_file, random_png, tiny_clip_dir  # noqa: F401  (the scorer's stand-ins)

PROMPTS = [e["text_prompt"] for e in shape_test_entries(0).values()]


def test_sweep_generates_each_cell_with_its_own_settings():
    seen = {}

    def record(images, cell):
        seen[cell["sampler"], cell["steps"], cell["guidance"]] = [np.asarray(image) for image in images]
        return {"mean": float(np.mean(seen[cell["sampler"], cell["steps"], cell["guidance"]]))}

    rows = sweep(load_model("reference"), PROMPTS[:2], record, [1, 5], [2, 3], ["ddim", "dpmpp"], seed=7)
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in rows] == list(seen)
    assert len(rows) == 8 and all(r["s_per_image"] > 0 and set(r) == {"sampler", "steps", "guidance", "mean",
                                                                       "s_per_image"} for r in rows)
    # a cell equals a plain generation with the same sampler, steps, guidance and seeds
    alone = generate_images(load_model("reference", sampler="dpmpp"), PROMPTS[:2], [7, 8], guidance_scale=5.0,
                            num_inference_steps=3, progress=False)
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(alone, seen["dpmpp", 3, 5.0]))
    # and the cells differ from each other
    assert len({np.asarray(images).tobytes() for images in seen.values()}) == 8


def test_shapes_sweep_through_the_cli(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--stage", "reference", "--guidance", "3,5", "--steps", "2,3", "--samplers", "ddim,dpmpp",
                 "--limit", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in rows] == [
        (s, n, g) for s in ["ddim", "dpmpp"] for n in [2, 3] for g in [3.0, 5.0]]
    for row in rows:
        for key in ["colour_shape", "held_out", "unseen_phrasing", "colour", "shape"]:
            assert math.isnan(row[key]) or 0 <= row[key] <= 1, row
        assert row["colour_shape"] <= min(row["colour"], row["shape"]) and row["s_per_image"] > 0
    table = (out / "sweep.md").read_text().strip()
    assert table in printed and len(table.splitlines()) == 2 + len(rows)
    assert table.splitlines()[0] == ("| sampler | steps | guidance | colour_shape | held_out | unseen_phrasing | colour "
                                     "| shape | s_per_image |")
    assert len((out / "sweep.csv").read_text().splitlines()) == 1 + len(rows)


@pytest.mark.parametrize("flags, message", [(["--samplers", "ddim,euler"], "sampler must be 'ddim' or 'dpmpp'"),
                                            (["--steps", "5,x"], "--steps expects comma-separated whole numbers of at least 1"),
                                            (["--guidance", "3,,5"], "--guidance expects comma-separated numbers >= 0")])
def test_sweep_refuses_bad_grids_in_one_line(flags, message, tmp_path, capsys):
    assert main(["sweep", "--stage", "reference", "--out", str(tmp_path / "sweep"), "--limit", "1", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hw6 sweep: error:") and message in err
    assert not (tmp_path / "sweep" / "sweep.json").exists()


@pytest.mark.filterwarnings("ignore:Matrix is singular")   # 3 images, 8-d features: a rank-2 covariance
def test_course_sweep_scores_fid_clip_t_and_clip_i(extractor_file, tiny_clip_dir, tmp_path, capsys):  # noqa: F811
    root = write_course_fixture(tmp_path / "course")
    truth = tmp_path / "gt"
    truth.mkdir()
    for i, name in enumerate(["0_main.png", "1_attack.png", "2_die.png"]):
        random_png(truth / name, i)
    assert main(["stats", str(root / "train"), "--out", str(tmp_path / "stats"), "--inception", str(extractor_file)]) == 0
    out = tmp_path / "sweep"
    assert main(["sweep", "--stage", "reference", "--test_json", str(root / "test.json"), "--stats", str(tmp_path / "stats"),
                 "--reference", str(truth), "--inception", str(extractor_file), "--clip", str(tiny_clip_dir),
                 "--limit", "3", "--steps", "2", "--guidance", "3,5", "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in rows] == [("ddim", 2, 3.0), ("ddim", 2, 5.0)]
    for row in rows:
        assert all(math.isfinite(row[key]) for key in ["fid", "clip_t", "clip_i"]) and row["fid"] > 0, row
    assert "| fid | clip_t | clip_i |" in capsys.readouterr().out
    # the scored folders are submissions of the first 3 entries: 256x256 PNGs named by image_name
    assert len(json.loads((out / "test.json").read_text())) == 3
    pngs = sorted((out / "ddim_2_g3").iterdir())
    assert [p.name for p in pngs] == ["0_main.png", "1_attack.png", "2_die.png"]
    assert all(Image.open(p).size == (256, 256) for p in pngs)
