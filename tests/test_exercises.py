"""The course edition: the exercises in the notebooks (otter-grader's format), the student edition `hw6 assign` writes,
and grading with otter. The slow tests share one `otter assign` run (the `dist` fixture)."""
import csv
import json
import re
import shutil
import zipfile
from pathlib import Path

import nbformat
import pytest
import torch

from checkout import CHECKOUT, pythonpath_with_checkout
from hw6utils import cli, exercises
from hw6utils.grading import COLUMNS, grade
from hw6utils.notebooks import run_notebooks
from hw6utils.sandbox import unavailable_reason

WHY_NOT = unavailable_reason()  # hw6 grade sandboxes each submission (bubblewrap)
NOTEBOOK_DIR = CHECKOUT / "notebooks"
MASTERS = exercises.master_notebooks(NOTEBOOK_DIR)
EXERCISES = {"01_data.ipynb": ["caption"], "04_training.ipynb": ["forward_process", "training_loss", "optimizer_step"],
             "05_sampling.ipynb": ["guidance", "ddim_step"]}
# planted mistakes, (notebook, exercise, solution text, wrong text): each makes every test of its exercise fail
MISTAKES = [("05_sampling.ipynb", "guidance", "noise_uncond + guidance_scale * (noise_text",  # a sign flip
             "noise_uncond - guidance_scale * (noise_text"),
            ("04_training.ipynb", "forward_process", "alpha_bar_t.sqrt() * latents + (1 - alpha_bar_t).sqrt() * noise",
             "alpha_bar_t * latents + (1 - alpha_bar_t) * noise")]  # no square roots
MORE_MISTAKES = [  # caught by at least one test, public or hidden
    ("caption", "[i].strip(), entry", "[i], entry"),
    ("caption", 'if action else description', 'if True else description'),
    ("forward_process", "+ (1 - alpha_bar_t).sqrt() * noise", "- (1 - alpha_bar_t).sqrt() * noise"),
    ("training_loss", "where(drop[:, None, None], null_emb, text_emb)", "where(drop[:, None, None], text_emb, null_emb)"),
    ("training_loss", "alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])",
     "alphas_cumprod[timesteps - 1] / (1 - alphas_cumprod[timesteps - 1])"),
    ("training_loss", "torch.clamp(snr, max=snr_gamma) / snr", "1"),
    ("optimizer_step", "torch.nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)", "pass"),
    ("optimizer_step", "optimizer.zero_grad(set_to_none=True)", "pass"),
    ("optimizer_step", "ema_param.mul_(ema_decay).add_(param, alpha=1 - ema_decay)",
     "ema_param.mul_(1 - ema_decay).add_(param, alpha=ema_decay)"),
    ("guidance", "cat([null_emb.expand_as(text_emb), text_emb])", "cat([text_emb, null_emb.expand_as(text_emb)])"),
    ("ddim_step", "t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps", "t - 1"),
    ("ddim_step", "else scheduler.final_alpha_cumprod", "else scheduler.alphas_cumprod[0]"),
    ("ddim_step", "alpha_bar_prev = scheduler.alphas_cumprod[t_prev]", "alpha_bar_prev = scheduler.alphas_cumprod[t]"),
    ("ddim_step", "return alpha_bar_prev",  # the library's own step: refused by a hidden test
     "return scheduler.step(noise_pred, t, latents).prev_sample\n    return alpha_bar_prev"),
]


def questions(path) -> dict:
    """{exercise: {"solution": source, "tests": [(hidden, source)]}} of a master notebook, read in otter's format."""
    found, current, block = {}, None, None
    for cell in nbformat.read(path, as_version=4).cells:
        first = cell.source.split("\n", 1)[0].strip() if cell.cell_type == "raw" else None
        if first == "# BEGIN QUESTION":
            current = found.setdefault(re.search(r"name:\s*(\w+)", cell.source)[1], {"solution": None, "tests": []})
        elif first in ("# BEGIN SOLUTION", "# BEGIN TESTS"):
            block = first
        elif first in ("# END SOLUTION", "# END TESTS"):
            block = None
        elif cell.cell_type == "code" and block == "# BEGIN SOLUTION":
            current["solution"] = cell.source
        elif cell.cell_type == "code" and block == "# BEGIN TESTS":
            current["tests"].append((cell.source.startswith("# HIDDEN"), cell.source))
    return found


def solution_lines(source: str) -> list:
    """The lines between `# BEGIN SOLUTION` and `# END SOLUTION`."""
    return re.search(r"# BEGIN SOLUTION\n(.*?)\n\s*# END SOLUTION", source, flags=re.S)[1].splitlines()


def answered(source: str) -> str:
    """A solution cell as a student who got it right would leave it: without otter's markers."""
    return "\n".join(line for line in source.splitlines() if not line.strip().endswith("SOLUTION"))


def run_tests(solution: str, tests: list) -> list:
    """True/False per test cell, run as papermill runs them in notebooks/: the solution cell, then each test cell."""
    env = {"torch": torch}
    exec(solution, env)
    results = []
    for _, test in tests:
        try:
            exec(test, env)
            results.append(True)
        except Exception:  # noqa: BLE001 - a failing test cell, whatever it raised
            results.append(False)
    return results


def test_the_notebooks_hold_six_exercises_in_otter_format():
    assert {path.name: list(questions(path)) for path in MASTERS} == EXERCISES
    for path in MASTERS:
        for name, question in questions(path).items():
            lines = [line for line in solution_lines(question["solution"]) if line.strip()]
            assert 1 <= len(lines) <= 10, f"{name}: {len(lines)} solution lines"
            hidden = [is_hidden for is_hidden, _ in question["tests"]]
            assert any(hidden) and not all(hidden), f"{name}: needs public and hidden tests"
        assert exercises.exercise_names(path) == list(questions(path))


@pytest.mark.parametrize("name", [name for names in EXERCISES.values() for name in names])
def test_the_tests_pass_the_solution_and_fail_planted_mistakes(name):
    question = next(questions(path)[name] for path in MASTERS if name in questions(path))
    solution = answered(question["solution"])
    assert all(run_tests(solution, question["tests"]))
    mistakes = [(right, wrong) for n, right, wrong in MORE_MISTAKES if n == name]
    mistakes += [(right, wrong) for _, n, right, wrong in MISTAKES if n == name]
    assert len(mistakes) >= 2
    for right, wrong in mistakes:
        assert right in solution
        assert not all(run_tests(solution.replace(right, wrong), question["tests"])), wrong


def test_graded_program_keeps_the_definitions_and_the_imports_they_use():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%matplotlib inline\nimport math\nimport torch\nfrom json import dumps, loads as read"),
        nbformat.v4.new_code_cell("history = train(cfg)\nx = 1"),
        nbformat.v4.new_code_cell("def half(v):\n    return math.sqrt(v) / 2 + len(read('[]'))\n\nhalf(4)"),
        nbformat.v4.new_code_cell("def broken(:\n    pass"),
        nbformat.v4.new_markdown_cell("def in_markdown(): pass"),
    ])
    program = exercises.graded_program(nb)
    assert [cell.source for cell in program.cells] == [
        "import math", "from json import dumps, loads as read", "def half(v):\n    return math.sqrt(v) / 2 + len(read('[]'))"]
    assert program.metadata.kernelspec.name == "python3"
    env = {}
    for cell in program.cells:
        exec(cell.source, env)
    assert env["half"](16) == 2


def test_library_off_refuses_the_library_under_its_other_names():
    import hw6utils.data
    notebook = {}  # an answer that calls the library under the name a notebook's import gave it
    exec("from hw6utils.data import make_caption\ndef answer(entry):\n    return make_caption(entry, '')", notebook)
    original = hw6utils.data.make_caption
    with exercises.library_off(notebook["answer"], hw6utils.data, "make_caption"):
        with pytest.raises(AssertionError, match="answer calls the library's make_caption"):
            notebook["answer"]("A cat.")
        with pytest.raises(AssertionError):
            hw6utils.data.make_caption("A cat.", "")
    assert notebook["answer"]("A cat.") == "A cat."
    assert hw6utils.data.make_caption is original and notebook["make_caption"] is original


def test_diffusion_loss_uses_the_draws_of_its_batch():
    from hw6utils.config import get_preset
    from hw6utils.training import diffusion_loss, make_noise_scheduler, noise_draws
    cfg = get_preset("smoke", cond_drop_prob=0.5, mixed_precision="no", text_mask=False)
    unet, scheduler = exercises.tiny_unet(), make_noise_scheduler(cfg)
    calls = []

    def recording_unet(noisy_latents, timesteps, encoder_hidden_states):
        calls.append((noisy_latents, timesteps, encoder_hidden_states))
        return unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states)
    recording_unet.config = unet.config
    latents, text_emb, null_emb = torch.randn(6, 4, 8, 8), torch.randn(6, 5, 8), torch.randn(1, 5, 8)
    drop, noise, timesteps = noise_draws(cfg, latents.shape, torch.Generator().manual_seed(0))
    batch = {"latents": latents, "text": {"emb": text_emb}, "drop": drop, "noise": noise, "timesteps": timesteps}
    with exercises.one_thread(), torch.no_grad():
        diffusion_loss(recording_unet, scheduler, batch, {"emb": null_emb}, cfg)
    (noisy_latents, used_timesteps, used_emb), = calls
    assert torch.equal(used_timesteps, timesteps)
    assert torch.equal(noisy_latents, scheduler.add_noise(latents, noise, timesteps))
    assert 0 < drop.sum() < len(drop)
    assert torch.equal(used_emb, torch.where(drop[:, None, None], null_emb, text_emb))


def test_hw6_assign_writes_into_out(monkeypatch, tmp_path):
    written = []
    monkeypatch.setattr(exercises, "assign", lambda out: written.append(out) or Path(out))
    assert cli.main(["assign", "--out", str(tmp_path / "edition")]) == 0
    assert written == [str(tmp_path / "edition")]


# ----------------------------------------------------------------------------------------- slow: otter itself
@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """One `otter assign` run of the notebooks, shared by the tests below."""
    return exercises.assign(tmp_path_factory.mktemp("course") / "dist", NOTEBOOK_DIR)


def texts(path: Path, data: bytes | None = None):
    """(name, text) of a file of dist: a notebook's sources and metadata strings, each member of a zip."""
    data = path.read_bytes() if data is None else data
    if path.suffix == ".zip":
        import io
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.namelist():
                yield from texts(path / member, archive.read(member))
    elif path.suffix == ".ipynb":
        def strings(value):
            if isinstance(value, dict):
                return [s for v in value.values() for s in strings(v)]
            if isinstance(value, list):
                return [s for v in value for s in strings(v)]
            return [value] if isinstance(value, str) else []
        yield path, "\n".join(strings(json.loads(data)))
    else:
        yield path, data.decode("utf-8", errors="replace")


@pytest.mark.slow
def test_assign_writes_the_student_edition_and_the_autograders(dist):
    student = dist / "student" / "notebooks"
    notebooks = sorted(path.name for path in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert sorted(path.name for path in student.glob("*.ipynb")) == notebooks
    assert sorted(path.name for path in (dist / "autograder").iterdir()) == [n.replace("ipynb", "zip") for n in EXERCISES]
    for name, names in EXERCISES.items():
        nb = nbformat.read(student / name, as_version=4)
        assert nb.cells[0].source.endswith(f'grader = otter.Notebook("{name}")')
        checks = [cell.source for cell in nb.cells if cell.source.startswith("grader.check")]
        assert checks == [f'grader.check("{n}")' for n in names]
        assert sorted(nb.metadata.otter.tests) == sorted(names)  # the public tests travel inside the notebook
        assert "hidden=True" not in json.dumps(nb.metadata.otter.tests)
        autograder = dist / "autograder" / name.replace("ipynb", "zip")
        assert exercises.exercise_points(autograder) == dict.fromkeys(names, 3)
        with zipfile.ZipFile(autograder) as archive:
            tests = [archive.read(member).decode() for member in archive.namelist() if member.startswith("tests/")]
        assert all("hidden=True" in test and "hidden=False" in test for test in tests) and len(tests) == len(names)


@pytest.mark.slow
def test_no_solution_line_is_anywhere_in_dist(dist):
    def normal(line):  # without spaces and comments, one kind of quotes
        return re.sub(r"\s", "", re.sub(r"\s+#.*$", "", line)).replace("'", '"')
    # a line the notebooks also show outside a solution (`with torch.no_grad():` in a test) gives nothing away
    elsewhere = {normal(line) for path in MASTERS for cell in nbformat.read(path, as_version=4).cells
                 for line in re.sub(r"# BEGIN SOLUTION\n.*?# END SOLUTION", "", cell.source, flags=re.S).splitlines()}
    solutions = {normal(line): name for path in MASTERS for name, q in questions(path).items()
                 for line in solution_lines(q["solution"]) if len(normal(line)) >= 8 and normal(line) not in elsewhere}
    assert len(solutions) >= 20
    files = [path for path in dist.rglob("*") if path.is_file()]
    assert len(files) == 10
    for path in files:
        for where, text in texts(path):
            leaked = [solutions[normal(line)] for line in text.splitlines() if normal(line) in solutions]
            assert not leaked, f"{where}: solution lines of {leaked}"


@pytest.fixture(scope="module")
def executed_student_edition(dist, shapes_dir, vae_dir, tmp_path_factory):
    """The student edition's notebooks with exercises, run top to bottom with papermill on the smoke preset (as
    tests/test_notebooks.py runs notebooks/): 05 samples from what 04 trained."""
    out = tmp_path_factory.mktemp("student_run")
    parameters = {"PRESET": "smoke", "VAE": str(vae_dir), "DATA_DIR": str(shapes_dir),
                  "OUTPUT_DIR": str(out / "outputs"), "STAGE": "last", "MAX_STEPS": 4}
    with pytest.MonkeyPatch.context() as patch:  # the kernels import this checkout's hw6utils
        patch.setenv("PYTHONPATH", pythonpath_with_checkout())
        patch.setenv("OMP_NUM_THREADS", "1")  # the smoke preset's tensors are tiny: 2-4x faster on 2 shared cores
        return run_notebooks(list(EXERCISES), parameters, out / "executed", dist / "student" / "notebooks",
                             timeout=600)


@pytest.mark.slow
def test_the_student_edition_runs_and_its_checks_fail_cleanly(executed_student_edition):
    for path in executed_student_edition:
        nb = nbformat.read(path, as_version=4)
        checks = [cell for cell in nb.cells if cell.source.startswith("grader.check")]
        assert len(checks) == len(EXERCISES[path.name])
        for cell in checks:
            shown = "".join(output.get("data", {}).get("text/plain", "") for output in cell.outputs)
            assert "failed" in shown and "passed" not in shown, shown
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


def submission(student: Path, out: Path, mistakes=()) -> Path:
    """A copy of the student edition's notebooks with every answer filled in, except for the planted mistakes."""
    out.mkdir(parents=True)
    for name in EXERCISES:
        nb = nbformat.read(student / name, as_version=4)
        master = {cell.get("id"): cell for cell in nbformat.read(NOTEBOOK_DIR / name, as_version=4).cells}
        for cell in nb.cells:
            if "otter_answer_cell" in cell.metadata.get("tags", []):
                cell.source = answered(master[cell.id].source)
                for notebook, _, right, wrong in mistakes:
                    cell.source = cell.source.replace(right, wrong) if notebook == name else cell.source
        nbformat.write(nb, out / name)
    return out


@pytest.mark.slow
@pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)
def test_hw6_grade_scores_each_exercise_of_three_submissions_in_the_sandbox(dist, tmp_path):
    student, autograder = dist / "student" / "notebooks", dist / "autograder"
    subs = tmp_path / "submissions"
    submission(student, subs / "right" / "notebooks")
    submission(student, subs / "wrong" / "notebooks", MISTAKES)
    shutil.copytree(student, subs / "blank" / "notebooks")  # the student edition as handed out
    test_json = tmp_path / "course" / "test.json"
    (tmp_path / "course" / "stats").mkdir(parents=True)
    test_json.write_text(json.dumps({"0": {"text_prompt": "A red circle.", "image_name": "0_main.png"}}))
    # the reruns stop at their first cell (no such preset): the exercises are graded whatever the rerun does
    rows = grade(subs, tmp_path / "grades.csv", test_json, tmp_path / "course" / "stats", None, None,
                 parameters={"PRESET": "no_such_preset"}, timeout=120, autograder=autograder, jobs=3)
    assert [row["status"] for row in rows] == ["notebook failed"] * 3
    full = {f"ex_{name}": 3.0 for names in EXERCISES.values() for name in sorted(names)}  # by notebook, then name
    expected = {"right": {**full, "ex_total": 18.0},
                "wrong": {**full, "ex_guidance": 0.0, "ex_forward_process": 0.0, "ex_total": 12.0},
                "blank": {**dict.fromkeys(full, 0.0), "ex_total": 0.0}}
    with open(tmp_path / "grades.csv", newline="") as f:
        table = {row["submission"]: row for row in csv.DictReader(f)}
    assert list(next(iter(table.values()))) == COLUMNS + list(full) + ["ex_total"]
    for name, scores in expected.items():
        assert {key: float(value) for key, value in table[name].items() if key.startswith("ex_")} == scores, name
    assert json.loads((tmp_path / "grades_runs" / "wrong" / "exercises.json").read_text())["guidance"] == \
        {"score": 0.0, "possible": 3}
    board = (tmp_path / "grades_leaderboard.md").read_text().splitlines()
    assert board[0].startswith("| rank | submission | FID | CLIP-T | CLIP-I | caption (/3) | forward_process (/3) | "
                               "optimizer_step (/3) |")
    assert "ex_total" not in board[0] and "| total (/18) | status |" in board[0]
    assert "| right | | | | 3 | 3 | 3 | 3 | 3 | 3 | 18 |" in "\n".join(board).replace("  ", " ")
