"""The course edition: exercises in the numbered notebooks, a student edition without their solutions, and grading.

The notebooks with exercises (01, 04, 05) are otter-grader master notebooks, in Otter Assign's format: a raw
`# ASSIGNMENT CONFIG` cell; per exercise a raw `# BEGIN QUESTION` cell, a code cell whose solution sits between
`# BEGIN SOLUTION` and `# END SOLUTION`, and test cells between `# BEGIN TESTS` and `# END TESTS` (`# HIDDEN` ones are
for grading only). Each exercise is a small function of its arguments, and its tests compare it with the library on
seeded random inputs. In notebooks/ the test cells run as plain code, so papermill and nbval check the solutions.

    assign("dist")    # `make student`, `hw6 assign`: `otter assign` on each of them, then
        dist/student/notebooks/        all the numbered notebooks as students get them: exercise bodies are `...`,
                                       each followed by `grader.check(name)`; the public tests are in the metadata
        dist/autograder/NN_name.zip    otter's autograder of each notebook, public and hidden tests
    grade_exercises(folder_or_paths, "dist/autograder")   # `otter run` per notebook, locally (no Docker)

The helpers at the end (`tiny_unet`, `one_thread`, `library_off`) are what the notebooks' tests use.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .config import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
CONFIG_MARK = "# ASSIGNMENT CONFIG"
# `otter assign MASTER RESULT` for each pair of arguments, in one process (otter's imports take seconds); the tests
# are not run on the solutions here: that would execute the whole notebook (training). papermill runs them instead.
OTTER_ASSIGN = ("import sys; from otter.assign import main\n"
                "for master, result in zip(sys.argv[1::2], sys.argv[2::2]):\n"
                "    main(master, result, no_pdfs=True, no_run_tests=True)")


# ------------------------------------------------------------------------------------------ the student edition
def master_notebooks(notebooks_dir=NOTEBOOK_DIR) -> list:
    """The numbered notebooks that hold exercises: those with a raw `# ASSIGNMENT CONFIG` cell."""
    import nbformat
    return [path for path in sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
            if any(cell.cell_type == "raw" and cell.source.lstrip().startswith(CONFIG_MARK)
                   for cell in nbformat.read(path, as_version=4).cells)]


def exercise_names(notebook) -> list:
    """The `name` of each `# BEGIN QUESTION` cell of a master notebook, in order."""
    import nbformat
    import yaml
    return [yaml.safe_load(cell.source.split("\n", 1)[1])["name"] for cell in nbformat.read(notebook, as_version=4).cells
            if cell.cell_type == "raw" and cell.source.startswith("# BEGIN QUESTION")]


def assign(out="dist", notebooks_dir=NOTEBOOK_DIR) -> Path:
    """Write the student edition and the autograders into `out` (replaced if there) with `otter assign`; returns out.

    The notebooks without exercises are copied as they are, so `out/student/notebooks` can stand in for notebooks/.
    """
    out, notebooks_dir = Path(out), Path(notebooks_dir)
    masters = master_notebooks(notebooks_dir)
    if not masters:
        raise FileNotFoundError(f"{notebooks_dir}: no notebook with a raw '{CONFIG_MARK}' cell")
    names = [name for master in masters for name in exercise_names(master)]
    if len(set(names)) < len(names):  # the scores of all notebooks go into one dict
        raise ValueError(f"exercise names must differ across notebooks: {sorted(names)}")
    student, autograder = out / "student" / "notebooks", out / "autograder"
    shutil.rmtree(out / "student", ignore_errors=True)
    shutil.rmtree(autograder, ignore_errors=True)
    student.mkdir(parents=True)
    autograder.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="hw6-assign-") as tmp:
        results = [Path(tmp) / master.stem for master in masters]
        pairs = [str(path) for pair in zip(masters, results) for path in pair]
        done = subprocess.run([sys.executable, "-c", OTTER_ASSIGN, *pairs], capture_output=True, text=True, cwd=tmp)
        if done.returncode != 0:
            raise RuntimeError(f"otter assign failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        for master, result in zip(masters, results):
            shutil.copy(result / "student" / master.name, student / master.name)
            zips = sorted((result / "autograder").glob("*.zip"))
            if len(zips) != 1:
                raise RuntimeError(f"otter assign {master.name}: expected one autograder zip, found {len(zips)}")
            shutil.copy(zips[0], autograder / f"{master.stem}.zip")
    for path in sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb")):
        if path not in masters:
            shutil.copy(path, student / path.name)
    return out


# --------------------------------------------------------------------------------------------------- grading
def exercise_points(autograder_zip) -> dict:
    """{exercise: points possible} of one autograder, as otter reads its test files."""
    from otter.nbmeta_config import NBMetadataConfig
    from otter.test_files import create_test_file
    points = {}
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(autograder_zip) as archive:
        for member in archive.namelist():
            if member.startswith("tests/") and member.endswith(".py"):
                test_file = create_test_file(archive.extract(member, tmp), NBMetadataConfig())
                points[test_file.name] = test_file.possible
    return points


def graded_program(notebook):
    """What grading runs of a student's notebook: its top-level function and class definitions, after the imports
    of the names they use.

    The exercises are functions of their arguments, so their tests need nothing else, and grading skips the cells
    that train a model or draw images for minutes (and imports that only those need). A cell that does not parse
    contributes nothing (its error shows when the notebook runs)."""
    import nbformat
    from IPython.core.inputtransformer2 import TransformerManager
    nb = nbformat.read(notebook, as_version=4) if isinstance(notebook, (str, Path)) else notebook
    imports, definitions = [], []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:  # magics (%matplotlib, !git) become plain Python first
            tree = ast.parse(TransformerManager().transform_cell(cell.source))
        except SyntaxError:
            continue
        imports += [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        definitions += [node for node in tree.body
                        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    used = {node.id for definition in definitions for node in ast.walk(definition) if isinstance(node, ast.Name)}
    imports = [node for node in imports if any(alias.name == "*" or (alias.asname or alias.name.split(".")[0]) in used
                                               for alias in node.names)]
    # a cell per statement: one that fails (an import missing here) leaves the others defined; the kernel is always
    # python3, the one grading runs in, whatever kernel the notebook was saved with
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(ast.unparse(node)) for node in imports + definitions],
                                    metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                             "language": "python"}})


def find_notebook(notebooks, stem: str) -> Path | None:
    if isinstance(notebooks, (str, Path)):
        path = Path(notebooks) / f"{stem}.ipynb"
        return path if path.is_file() else None
    return next((Path(p) for p in notebooks if Path(p).name == f"{stem}.ipynb"), None)


def grade_exercises(notebooks, autograder="dist/autograder", timeout: float = 600) -> dict:
    """Score a submission's exercises with otter-grader's own grader (`otter run`, local, no Docker).

    notebooks: a folder holding the submission's (executed or not) numbered notebooks, or a list of their paths.
    autograder: the folder `assign` wrote (`NN_name.zip` per notebook). Each notebook's imports and function
    definitions (`graded_program`) run in a fresh kernel against its public and hidden tests; the kernel imports
    the course's own hw6utils (PYTHONPATH is this checkout), never one a submission ships.
    Returns {exercise: {"score": earned, "possible": points}, ..., "total": {"score", "possible"}}; an exercise that
    could not be graded (its notebook missing, otter failing, past `timeout` seconds) scores 0 with an "error".
    """
    zips = sorted(Path(autograder).glob("[0-9][0-9]_*.zip"))
    if not zips:
        raise FileNotFoundError(f"{autograder}: no autograder NN_name.zip (write them with `hw6 assign`)")
    scores = {}
    for archive in zips:
        possible = exercise_points(archive)
        found = find_notebook(notebooks, archive.stem)
        if found is None:
            results, error = {}, f"{archive.stem}.ipynb not found"
        else:
            results, error = run_otter(found, archive, timeout)
        for name, points in possible.items():
            scores[name] = {"score": results.get(name, 0.0), "possible": points}
            if name not in results:
                scores[name]["error"] = error or "not graded"
    scores["total"] = {"score": round(sum(s["score"] for s in scores.values()), 5),
                       "possible": round(sum(s["possible"] for s in scores.values()), 5)}
    return scores


def run_otter(notebook: Path, archive: Path, timeout: float) -> tuple:
    """({exercise: points earned}, error or "") of `otter run` on the graded program of one notebook."""
    import nbformat
    with tempfile.TemporaryDirectory(prefix="hw6-exercises-") as tmp:
        program = Path(tmp) / "submission" / notebook.name
        program.parent.mkdir()
        nbformat.write(graded_program(notebook), program)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # the tests compare with the course's library
        try:
            done = subprocess.run([sys.executable, "-m", "otter", "run", str(program), "-a", str(archive.resolve()),
                                   "-o", tmp, "--no-logo"], cwd=tmp, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {}, f"grading {notebook.name} ran past {timeout:g} s"
        results = Path(tmp) / "results.json"
        if done.returncode != 0 or not results.is_file():
            last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            return {}, f"otter run {notebook.name} failed: {last}"
        tests = json.loads(results.read_text())["tests"]
    return {test["name"]: float(test["score"]) for test in tests if "max_score" in test}, ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hw6utils.exercises", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("assign", help="write the student edition and the autograders (otter assign)")
    make.add_argument("--out", default="dist", help="destination folder [dist]")
    grade = sub.add_parser("grade", help="score one submission's exercises (otter run); prints JSON")
    grade.add_argument("notebooks", nargs="+", help="a folder of the submission's notebooks, or the notebooks")
    grade.add_argument("--autograder", default="dist/autograder", help="folder of NN_name.zip [dist/autograder]")
    grade.add_argument("--timeout", type=float, default=600, help="seconds per notebook [600]")
    grade.add_argument("--out", default=None, help="also write the JSON to this file")
    grade.add_argument("--report", default=None, metavar="PREFIX",
                       help="print the JSON on one line after PREFIX instead (how hw6 grade reads it from its sandbox)")
    args = parser.parse_args(argv)
    if args.command == "assign":
        print(f"wrote {assign(args.out)}")
        return 0
    folder_or_paths = args.notebooks[0] if len(args.notebooks) == 1 and Path(args.notebooks[0]).is_dir() else args.notebooks
    scores = grade_exercises(folder_or_paths, args.autograder, args.timeout)
    text = json.dumps(scores, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(f"{args.report}{json.dumps(scores)}" if args.report else text)
    return 0


# ------------------------------------------------------------------------------ what the exercises' tests use
def tiny_unet(seed: int = 0):
    """A random-weight two-level UNet (4 and 8 channels, cross-attention over 8-d token states), as diffusers'
    own tests build one: a few milliseconds per call on 8x8 latents. The caller's random state is left as it was."""
    import torch
    from diffusers import UNet2DConditionModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(4, 8), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                    attention_head_dim=2, norm_num_groups=2).eval()


@contextlib.contextmanager
def one_thread():
    """Run the block on one CPU thread, then restore the count: the tests' tensors are tiny, and more threads only add
    overhead (on a busy 2-core machine, ten times the work and more)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def library_off(answer, owner, name: str):
    """Within the block, `owner.name` (a library function, or a method of a library class) raises AssertionError,
    also under any name the answer's notebook bound it to: an answer that only calls the library fails."""
    original, own = getattr(owner, name), name in vars(owner)

    def refuse(*args, **kwargs):
        raise AssertionError(f"{getattr(answer, '__name__', answer)} calls the library's {name}: write it out")
    # the names it is bound to: in the answer's notebook (from ... import ...) and in the library's other modules
    spaces = [getattr(answer, "__globals__", {})] + [vars(module) for key, module in list(sys.modules.items())
                                                     if key.startswith("hw6utils.") and module is not owner]
    aliases = [(space, key) for space in spaces for key, value in list(space.items()) if value is original]
    setattr(owner, name, refuse)
    for space, key in aliases:
        space[key] = refuse
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)
        for space, key in aliases:
            space[key] = original


if __name__ == "__main__":
    sys.exit(main())
