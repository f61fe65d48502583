"""Batch grading: small fake submissions become one row each; a packaged zip grades end to end."""
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nbformat
import pytest
from PIL import Image

from checkout import CHECKOUT, pythonpath_with_checkout
from course_fixture import write_course_fixture
from hw6utils.grading import grade
from hw6utils.sandbox import unavailable_reason
from hw6utils.scoring import compute_stats, save_stats
from test_scoring import extractor_file, random_png, tiny_clip_dir, tiny_extractor  # noqa: F401  (stand-ins, fixtures)

WHY_NOT = unavailable_reason()  # hw6 grade sandboxes each submission (bubblewrap): these tests skip without one
needs_sandbox = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)

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


def notebook_submission(root: Path, source: str, names: list) -> Path:
    """A submission whose one notebook runs `source` (parameters RESULTS and NAMES, as fake_submission's)."""
    fake_submission(root, names)
    path = root / "notebooks" / "01_generate.ipynb"
    notebook = nbformat.read(path, as_version=4)
    notebook.cells[1].source = source
    nbformat.write(notebook, path)
    return root


def scorer_inputs(root: Path, names: list) -> tuple:
    """(test.json, FID statistics folder) for `names`, the statistics from twelve noise images."""
    root.mkdir(parents=True, exist_ok=True)
    test_json = root / "test.json"
    test_json.write_text(json.dumps({str(i): {"text_prompt": f"monster {i}", "image_name": n} for i, n in enumerate(names)}))
    refs = []
    for i in range(12):
        refs.append(root / "refs" / f"{i}.png")
        refs[-1].parent.mkdir(exist_ok=True)
        random_png(refs[-1], 100 + i)
    return test_json, save_stats(root / "stats", *compute_stats(refs, tiny_extractor()))


def read_rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def hw6(*args) -> list:
    """The `hw6` command line, run with this checkout's hw6utils."""
    return [sys.executable, "-m", "hw6utils.cli", *map(str, args)]


def with_checkout_env() -> dict:
    return {**os.environ, "PYTHONPATH": pythonpath_with_checkout()}


@pytest.mark.slow
@needs_sandbox
def test_grade_three_submissions(tmp_path, tiny_clip_dir, kernels_import_this_checkout):
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
    # ships good images and copies them back, from wherever an earlier grader set them aside, as its "rerun"
    copy_back = ("import shutil\nfrom pathlib import Path\n"
                 "shipped = next(p for p in [Path('../results_shipped'), Path('../results')] if p.is_dir())\n"
                 "shutil.copytree(shipped, Path(RESULTS).with_name('rerun'))\nshutil.rmtree(RESULTS, ignore_errors=True)\n"
                 "Path(RESULTS).with_name('rerun').rename(RESULTS)\nNAMES = []")
    notebook_submission(subs / "gina", copy_back, names)
    (subs / "gina" / "results").mkdir()
    for name in names:
        Image.new("RGB", (256, 256), (40, 100, 200)).save(subs / "gina" / "results" / name)
    (subs / "hank" / "notebooks").mkdir(parents=True)
    (subs / "hank" / "notebooks" / "01_generate.ipynb").write_text("not a notebook")
    extractor = tiny_extractor()
    from hw6utils.scoring import compute_stats, save_stats
    refs = []
    for i in range(6):
        refs.append(tmp_path / f"ref{i}.png")
        Image.new("RGB", (256, 256), (10 * i, 20, 30)).save(refs[-1])
    save_stats(tmp_path / "stats", *compute_stats(refs, extractor))
    shipped_before = {path: path.read_bytes() for path in subs.rglob("*") if path.is_file()}
    rows = grade(subs, tmp_path / "grades.csv", test_json, tmp_path / "stats", extractor, str(tiny_clip_dir),
                 timeout=10, jobs=3)  # three sandboxes at once: each row as if graded alone
    assert [row["submission"] for row in rows] == sorted(p.name for p in subs.iterdir())
    by_name = {row["submission"]: row for row in rows}
    assert by_name["alice"]["status"] == "ok" and by_name["alice"]["fid"] > 0
    assert by_name["bob"]["status"] == "notebook failed" and "01_generate.ipynb" in by_name["bob"]["failed_notebook"]
    assert "ZeroDivisionError" in by_name["bob"]["error"]
    assert by_name["carol"]["status"] == "bad images" and "missing: 2_die.png" in by_name["carol"]["error"]
    # shipped images never stand in for the rerun's: they are out of its reach, and a failed rerun scores nothing
    assert by_name["dave"]["status"] == "notebook failed" and "fid" not in by_name["dave"]
    assert by_name["erin"]["status"] == "error" and "no numbered notebooks" in by_name["erin"]["error"]
    assert by_name["frank"]["status"] == "contained: time limit" and "ran past the 10 s limit" in by_name["frank"]["error"]
    assert by_name["frank"]["failed_notebook"] == "01_generate.ipynb"
    assert by_name["gina"]["status"] == "notebook failed" and "fid" not in by_name["gina"], by_name["gina"]
    assert by_name["hank"]["status"] == "notebook failed" and by_name["hank"]["failed_notebook"] == "01_generate.ipynb"
    # the submissions are left as they came; the rerun's notebooks and images are kept beside the grades
    assert {path: path.read_bytes() for path in subs.rglob("*") if path.is_file()} == shipped_before
    assert (tmp_path / "grades_runs" / "alice" / "executed" / "01_generate.ipynb").is_file()
    assert sorted(p.name for p in (tmp_path / "grades_runs" / "alice" / "results").iterdir()) == sorted(names)
    with open(tmp_path / "grades.csv") as f:  # in the order they finished
        assert sorted(r["submission"] for r in csv.DictReader(f)) == sorted(by_name)
    board = (tmp_path / "grades_leaderboard.md").read_text().splitlines()
    assert board[2].startswith("| 1 | alice |") and len(board) == 10
    assert "<td>alice</td>" in (tmp_path / "grades_leaderboard.html").read_text()


def test_jobs_below_one_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "submissions" / "alice").mkdir(parents=True)
    with pytest.raises(ValueError, match="jobs: at least 1"):
        grade(tmp_path / "submissions", tmp_path / "grades.csv", tmp_path / "test.json", tmp_path, None, None,
              sandbox=False, jobs=0)
    assert not (tmp_path / "grades.csv").exists()


def test_equal_fids_share_a_rank(tmp_path):
    from hw6utils.grading import write_leaderboard
    rows = [{"submission": s, "status": "ok", "error": "", "fid": f} for s, f in [("a", 50.0), ("b", 40.0), ("c", 40.0)]]
    write_leaderboard(rows + [{"submission": "d", "status": "bad images", "error": "x"}], tmp_path / "g")
    board = (tmp_path / "g_leaderboard.md").read_text().splitlines()[2:]
    assert [line.split(" | ")[:2] for line in board] == [["| 1", "b"], ["| 1", "c"], ["| 3", "a"], ["| -", "d"]]


OTTER_TEST = """from otter.test_files import test_case

OK_FORMAT = False
name = "{name}"
points = 2

@test_case(hidden=False)
def test_public(x):
    assert x

@test_case(hidden=True)
def test_hidden(x):
    assert x
"""


def fake_autograder(folder: Path) -> Path:
    """Two otter autograder zips as `hw6 assign` names them, their tests in otter's exception format."""
    pytest.importorskip("otter")
    folder.mkdir(parents=True)
    for stem, names in [("01_data", ["caption"]), ("04_training", ["training_loss", "forward_process"])]:
        with zipfile.ZipFile(folder / f"{stem}.zip", "w") as archive:
            for name in names:
                archive.writestr(f"tests/{name}.py", OTTER_TEST.format(name=name))
    return folder


def test_exercise_columns_come_from_the_autograders_and_show_on_the_leaderboard(tmp_path):
    from hw6utils.grading import exercise_columns, write_leaderboard
    columns = exercise_columns(fake_autograder(tmp_path / "autograder"))
    assert columns == {"ex_caption": 2, "ex_forward_process": 2, "ex_training_loss": 2, "ex_total": 6}
    rows = [{"submission": "a", "status": "ok", "error": "", "fid": 50.0, "ex_caption": 2.0, "ex_forward_process": 1.0,
             "ex_training_loss": 0.0, "ex_total": 3.0},
            {"submission": "b", "status": "notebook failed", "error": "x"}]  # no exercise graded: empty cells
    write_leaderboard(rows, tmp_path / "g", columns)
    board = (tmp_path / "g_leaderboard.md").read_text().splitlines()
    assert board[0] == ("| rank | submission | FID | CLIP-T | CLIP-I | caption (/2) | forward_process (/2) | "
                        "training_loss (/2) | total (/6) | status |")
    assert board[2] == "| 1 | a | 50.0000 |  |  | 2 | 1 | 0 | 3 | ok |"
    assert board[3] == "| - | b |  |  |  |  |  |  |  | notebook failed (x) |"
    with pytest.raises(FileNotFoundError, match="no autograder NN_name.zip"):
        exercise_columns(tmp_path)


def test_resume_refuses_grades_with_other_exercise_columns(tmp_path):
    from hw6utils.grading import COLUMNS
    subs = tmp_path / "submissions"
    fake_submission(subs / "alice", ["0_main.png"])
    grades = tmp_path / "grades.csv"
    grades.write_text(",".join(COLUMNS) + "\nbob,ok,,,1.0,50.0,0.2,0.3\n")  # graded without exercises
    before = grades.read_bytes()
    with pytest.raises(ValueError, match="--resume: its columns .* are not this run's"):
        grade(subs, grades, tmp_path / "test.json", tmp_path, None, None, sandbox=False, resume=True,
              autograder=fake_autograder(tmp_path / "autograder"))
    assert grades.read_bytes() == before


@pytest.mark.slow
@needs_sandbox
def test_a_submission_that_kills_the_grader_or_its_kernel_loses_no_row(tmp_path, extractor_file, tiny_clip_dir):
    names = ["0_main.png", "1_hit.png"]
    test_json, stats = scorer_inputs(tmp_path / "course", names)
    subs = tmp_path / "submissions"
    fake_submission(subs / "alice", names)
    notebook_submission(subs / "bob", "import os\nos.kill(os.getppid(), 9)", names)  # whatever ran it
    notebook_submission(subs / "carol", "import os\nos.kill(os.getpid(), 9)", names)  # its own kernel
    fake_submission(subs / "dave", names)
    result = subprocess.run(hw6("grade", subs, "--out", tmp_path / "grades.csv", "--test-json", test_json, "--stats", stats,
                                "--inception", extractor_file, "--clip", tiny_clip_dir, "--timeout", 60),
                            capture_output=True, text=True, env=with_checkout_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {row["submission"]: row for row in read_rows(tmp_path / "grades.csv")}
    assert list(rows) == ["alice", "bob", "carol", "dave"]
    assert rows["alice"]["status"] == rows["dave"]["status"] == "ok"
    for name in ["bob", "carol"]:
        assert rows[name]["status"] == "notebook failed" and rows[name]["failed_notebook"] == "01_generate.ipynb", rows[name]
    assert "kernel died" in rows["carol"]["error"]


def processes_with(marker: str) -> list:
    """Command lines of the running processes that contain `marker` (zombies left out: they are gone)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z" and "pytest" not in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.slow
@needs_sandbox
def test_rows_are_written_as_graded_and_resume_skips_them(tmp_path, extractor_file, tiny_clip_dir):
    names = ["0_main.png", "1_hit.png"]
    test_json, stats = scorer_inputs(tmp_path / "course", names)
    subs = tmp_path / "submissions"
    fake_submission(subs / "alice", names)
    marker = f"sleep {random.randint(10**6, 10**7)}"  # its own: no process left by another run can match
    sleeper = f"import subprocess, time\nsubprocess.Popen({marker.split()!r})\ntime.sleep(3600)"
    notebook_submission(subs / "zed", sleeper, names)
    out = tmp_path / "grades.csv"
    command = hw6("grade", subs, "--out", out, "--test-json", test_json, "--stats", stats, "--inception", extractor_file,
                  "--clip", tiny_clip_dir, "--timeout", 600)
    grader = subprocess.Popen(command, env=with_checkout_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (out.is_file() and read_rows(out)) and time.time() < deadline and grader.poll() is None:
        time.sleep(0.5)
    while not processes_with(marker) and time.time() < deadline:  # zed's notebook is running
        time.sleep(0.5)
    grader.send_signal(signal.SIGKILL)
    grader.wait()
    first = read_rows(out)
    assert [row["submission"] for row in first] == ["alice"] and first[0]["status"] == "ok"
    deadline = time.time() + 10  # killing the grader ends the submission's whole process tree
    while processes_with(marker) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes_with(marker)
    result = subprocess.run(command + ["--resume", "--time-limit", "5"], capture_output=True, text=True,
                            env=with_checkout_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "alice: already graded" in result.stdout
    second = read_rows(out)
    assert second[0] == first[0] and [row["submission"] for row in second] == ["alice", "zed"]
    assert second[1]["status"] == "contained: time limit" and second[1]["failed_notebook"] == "01_generate.ipynb"
    assert not processes_with(marker)
    assert "| 1 | alice |" in (tmp_path / "grades_leaderboard.md").read_text()


@pytest.mark.slow
@needs_sandbox
def test_ctrl_c_with_jobs_lets_the_running_submissions_finish_and_resume_grades_the_rest(tmp_path, extractor_file,
                                                                                        tiny_clip_dir):
    names = ["0_main.png", "1_hit.png"]
    test_json, stats = scorer_inputs(tmp_path / "course", names)
    subs = tmp_path / "submissions"
    markers = {}
    for name in ["amy", "ben"]:  # each still running when Ctrl-C comes, then done a few seconds later
        markers[name] = f"sleep {random.randint(10**6, 10**7)}"
        notebook_submission(subs / name, f"import subprocess, time\nsubprocess.Popen({markers[name].split()!r})\n"
                            "time.sleep(8)", names)
    fake_submission(subs / "cat", names)  # waits for a free job: Ctrl-C comes first
    out = tmp_path / "grades.csv"
    command = hw6("grade", subs, "--out", out, "--test-json", test_json, "--stats", stats, "--inception", extractor_file,
                  "--clip", tiny_clip_dir, "--jobs", 2)
    # Ctrl-C's default action, even where this suite runs in a background job (which starts with SIGINT ignored)
    grader = subprocess.Popen(command, env=with_checkout_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while not all(processes_with(m) for m in markers.values()) and time.time() < deadline and grader.poll() is None:
        time.sleep(0.2)
    assert grader.poll() is None and all(processes_with(m) for m in markers.values()), "the two did not run at once"
    grader.send_signal(signal.SIGINT)
    stdout, stderr = grader.communicate(timeout=120)
    assert grader.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "Ctrl-C: finishing the 2 submissions being graded" in stderr
    assert "the rows graded are in the CSV (grade the rest with --resume)" in stderr
    rows = {row["submission"]: row for row in read_rows(out)}
    assert sorted(rows) == ["amy", "ben"] and all(row["status"] == "ok" for row in rows.values()), rows
    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=with_checkout_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "amy: already graded" in result.stdout and "ben: already graded" in result.stdout
    assert sorted(row["submission"] for row in read_rows(out)) == ["amy", "ben", "cat"]
    assert read_rows(out)[2]["status"] == "ok"


UPSCALING_GENERATE = """

from PIL import Image as _Image

_generate_at_model_size = generate


def generate(cfg, device="cpu", out_dir=None, progress=True):  # this student's change: PNGs at the course's 256 px
    out = _generate_at_model_size(cfg, device, out_dir, progress)
    for path in out.glob("*.png"):
        _Image.open(path).convert("RGB").resize((256, 256)).save(path)
    return out
"""


def student_project(root: Path) -> Path:
    """A student's copy of this project whose `generate` writes 256 px PNGs (the shapes models draw 64 px)."""
    for folder in ["hw6utils", "notebooks", "data/reference"]:
        shutil.copytree(CHECKOUT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    for name in ["README.md", "pyproject.toml", "Makefile", "environment.yml"]:
        shutil.copy(CHECKOUT / name, root / name)
    with open(root / "hw6utils" / "sampling.py", "a") as f:
        f.write(UPSCALING_GENERATE)
    return root


@pytest.mark.slow
@needs_sandbox
def test_a_packaged_zip_is_graded_end_to_end(tmp_path, tiny_clip_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the smoke preset's tensors are tiny (the sandbox passes it on)
    course = write_course_fixture(tmp_path / "course")
    student = student_project(tmp_path / "student")
    env = {**os.environ, "PYTHONPATH": str(student)}
    # the student: smoke-train their own code, draw the test prompts, package
    train_and_draw = ("from hw6utils.config import get_preset\nfrom hw6utils.sampling import generate\n"
                      "from hw6utils.training import train\n"
                      f"cfg = get_preset('smoke', data_dir={str(course)!r}, output_dir='outputs', stage='last')\n"
                      "train(cfg)\ngenerate(cfg, out_dir='png', progress=False)")
    subprocess.run([sys.executable, "-c", train_and_draw], cwd=student, env=env, check=True)
    subprocess.run(hw6("package", "--student-id", "b12345", "--images", "png", "--test-json", course / "test.json",
                       "--out", tmp_path / "zips"), cwd=student, env=env, check=True)
    with zipfile.ZipFile(tmp_path / "zips" / "hw6_b12345.zip") as archive:
        archive.extractall(tmp_path / "submissions")
    # the teacher: rerun the zip's notebooks on the smoke preset and score what they draw
    refs = sorted((course / "train").glob("*.png"))[:12]
    stats = save_stats(tmp_path / "stats", *compute_stats(refs, tiny_extractor()))
    parameters = {"PRESET": "smoke", "DATA_DIR": str(course), "STAGE": "last", "MAX_STEPS": 2, "RESUME_STEPS": 2,
                  "NUM_INFERENCE_STEPS": 2, "NUM_EXAMPLES": 2, "NUM_IMAGES": 2, "BATCH": 1, "NUM_SEEDS": 1,
                  "GUIDANCE_SCALES": [2.0], "NUM_SNAPSHOTS": 2, "COUNT": 1}  # the smallest run of every notebook
    start = time.time()
    rows = grade(tmp_path / "submissions", tmp_path / "grades.csv", course / "test.json", stats, tiny_extractor(),
                 str(tiny_clip_dir), parameters=parameters, timeout=600)
    print(f"graded the packaged zip in {time.time() - start:.0f}s")
    assert rows[0]["submission"] == "hw6_b12345" and rows[0]["status"] == "ok", rows[0]
    assert rows[0]["fid"] > 0
    rerun = tmp_path / "grades_runs" / "hw6_b12345" / "results"
    with Image.open(rerun / "0_main.png") as image:  # drawn by the student's own generate, not the grader's (64 px)
        assert image.size == (256, 256)
    assert (tmp_path / "grades_runs" / "hw6_b12345" / "executed" / "05_sampling.ipynb").is_file()


def test_the_image_check_follows_no_link(tmp_path):
    """A link in an image folder (to ground truth, say) is named as a problem, never opened; `hw6 score` relies on it."""
    from hw6utils.scoring import check_submission
    names = ["0_main.png", "1_hit.png"]
    test_json, _ = scorer_inputs(tmp_path / "course", names)
    truth, images = tmp_path / "truth", tmp_path / "images"
    truth.mkdir()
    images.mkdir()
    Image.new("RGB", (256, 256), "white").save(truth / "0_main.png")
    Image.new("RGB", (256, 256), "white").save(images / "1_hit.png")
    (images / "0_main.png").symlink_to(truth / "0_main.png")
    assert check_submission(images, test_json) == ["not a regular file: 0_main.png is a symbolic link"]
    (tmp_path / "linked").symlink_to(truth, target_is_directory=True)
    assert check_submission(tmp_path / "linked", test_json) == [f"{tmp_path / 'linked'}: not a folder (a symbolic link)"]
