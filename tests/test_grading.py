"""Batch grading: three small fake submissions (good, a failing cell, missing images) become three rows."""
import csv
import json
from pathlib import Path

import nbformat
import pytest
from PIL import Image

from hw6utils.grading import grade
from test_scoring import tiny_clip_dir, tiny_extractor  # noqa: F401  (the scorer's own stand-ins and fixture)

WRITE_IMAGES = """from pathlib import Path
from PIL import Image
Path(RESULTS).mkdir(exist_ok=True)
for i, name in enumerate(NAMES):
    Image.new("RGB", (256, 256), (40 * i, 100, 200)).save(Path(RESULTS) / name)"""


def fake_submission(root: Path, names: list, broken: bool = False) -> Path:
    (root / "notebooks").mkdir(parents=True)
    params = nbformat.v4.new_code_cell(f'RESULTS = "../results"\nNAMES = {names!r}', metadata={"tags": ["parameters"]})
    cells = [params, nbformat.v4.new_code_cell("1 / 0" if broken else "x = 1"), nbformat.v4.new_code_cell(WRITE_IMAGES)]
    notebook = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                              "language": "python"}})
    nbformat.write(notebook, root / "notebooks" / "01_generate.ipynb")
    return root


@pytest.mark.slow
def test_grade_three_submissions(tmp_path, monkeypatch, tiny_clip_dir):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    names = ["0_main.png", "1_hit.png", "2_die.png"]
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps({str(i): {"text_prompt": f"monster {i}", "image_name": n} for i, n in enumerate(names)}))
    subs = tmp_path / "submissions"
    fake_submission(subs / "alice", names)
    fake_submission(subs / "bob", names, broken=True)
    fake_submission(subs / "carol", names[:2])  # forgets one image
    fake_submission(subs / "dave", names, broken=True)  # ships good images, but its notebook fails on the rerun
    (subs / "dave" / "results").mkdir()
    for name in names:
        Image.new("RGB", (256, 256), (40, 100, 200)).save(subs / "dave" / "results" / name)
    (subs / "erin" / "results").mkdir(parents=True)  # no notebooks at all, only images
    for name in names:
        Image.new("RGB", (256, 256), (40, 100, 200)).save(subs / "erin" / "results" / name)
    fake_submission(subs / "frank", names)
    sleepy = nbformat.read(subs / "frank" / "notebooks" / "01_generate.ipynb", as_version=4)
    sleepy.cells.insert(1, nbformat.v4.new_code_cell("import time\ntime.sleep(30)"))
    nbformat.write(sleepy, subs / "frank" / "notebooks" / "01_generate.ipynb")
    extractor = tiny_extractor()
    from hw6utils.scoring import compute_stats, save_stats
    refs = []
    for i in range(6):
        refs.append(tmp_path / f"ref{i}.png")
        Image.new("RGB", (256, 256), (10 * i, 20, 30)).save(refs[-1])
    save_stats(tmp_path / "stats", *compute_stats(refs, extractor))
    rows = grade(subs, tmp_path / "grades.csv", test_json, tmp_path / "stats", extractor, str(tiny_clip_dir),
                 timeout=10)
    by_name = {row["submission"]: row for row in rows}
    assert by_name["alice"]["status"] == "ok" and by_name["alice"]["fid"] > 0
    assert by_name["bob"]["status"] == "notebook failed" and "01_generate.ipynb" in by_name["bob"]["failed_notebook"]
    assert "ZeroDivisionError" in by_name["bob"]["error"]
    assert by_name["carol"]["status"] == "bad images" and "missing: 2_die.png" in by_name["carol"]["error"]
    # shipped images never stand in for the rerun's: they are set aside, and a failed rerun scores nothing
    assert by_name["dave"]["status"] == "notebook failed" and "fid" not in by_name["dave"]
    assert len(list((subs / "dave" / "results_shipped").iterdir())) == 3
    assert by_name["erin"]["status"] == "error" and "no numbered notebooks" in by_name["erin"]["error"]
    assert by_name["frank"]["status"] == "notebook failed" and "ran past the 10 s limit" in by_name["frank"]["error"]
    assert by_name["frank"]["failed_notebook"] == "01_generate.ipynb"
    with open(tmp_path / "grades.csv") as f:
        assert [r["submission"] for r in csv.DictReader(f)] == ["alice", "bob", "carol", "dave", "erin", "frank"]
    board = (tmp_path / "grades_leaderboard.md").read_text().splitlines()
    assert board[2].startswith("| 1 | alice |") and len(board) == 8
    assert "<td>alice</td>" in (tmp_path / "grades_leaderboard.html").read_text()


def test_equal_fids_share_a_rank(tmp_path):
    from hw6utils.grading import write_leaderboard
    rows = [{"submission": s, "status": "ok", "error": "", "fid": f} for s, f in [("a", 50.0), ("b", 40.0), ("c", 40.0)]]
    write_leaderboard(rows + [{"submission": "d", "status": "bad images", "error": "x"}], tmp_path / "g")
    board = (tmp_path / "g_leaderboard.md").read_text().splitlines()[2:]
    assert [line.split(" | ")[:2] for line in board] == [["| 1", "b"], ["| 1", "c"], ["| 3", "a"], ["| -", "d"]]
