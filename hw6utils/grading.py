"""Batch grading for teachers: rerun each submission's notebooks in a sandbox, score its images, rank by FID.

A submission is a folder (e.g. an unzipped `hw6_<ID>/`, as `hw6 package` writes it) with its numbered notebooks
somewhere below it. Each rerun happens in a fresh working copy of the submission, made in a temporary folder, without
the images it shipped in `results/`: they are out of the rerun's reach, and the score comes from the rerun alone.
The rerun runs in a bubblewrap sandbox (`sandbox.py`), writes its PNGs to `RESULTS_DIR` (a parameter `hw6 grade`
injects: `<working copy>/results`) and imports the submission's own `hw6utils` when it ships one. Its executed
notebooks, images and scores are kept in `<grades>_runs/<submission>/`; the submission folder is never changed.
Each row is appended to the CSV as soon as it is graded; a broken or hostile submission becomes a row with its
error (or `contained: <what>`), never stops the batch. With an autograder (`hw6 assign`'s `dist/autograder`), the
exercises in the submission's notebooks are graded first, in the same sandbox (`exercises.grade_exercises`): one
column per exercise (`ex_<name>`, points earned) and `ex_total`, whatever the rerun then does.
"""
from __future__ import annotations

import csv
import html
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from .config import REPO_ROOT
from .notebooks import REPORT
from .sandbox import NO_SANDBOX_WARNING, Limits, Sandbox, check_available, run, wholly_hidden
from .scoring import check_submission, problem_summary, score

COLUMNS = ["submission", "status", "failed_notebook", "error", "run_time_s", "fid", "clip_t", "clip_i"]
SKIPPED = {".ipynb_checkpoints", "executed"}  # editor backups, and the copies an earlier grader executed in place
RUNNER = "import sys; sys.path.insert(0, sys.argv[1]); from hw6utils.notebooks import main; sys.exit(main(sys.argv[2:]))"
EXERCISES_RUNNER = ("import sys; sys.path.insert(0, sys.argv[1]); from hw6utils.exercises import main; "
                    "sys.exit(main(sys.argv[2:]))")
EXERCISES_REPORT = "hw6-exercises: "  # the line that carries the exercises' scores out of the sandbox
# what an error says -> the limit of the sandbox that stopped it
CONTAINED = [("MemoryError", "memory limit"), ("Cannot allocate memory", "memory limit"),
             ("can't allocate memory", "memory limit"), ("File too large", "file size limit"),
             ("Resource temporarily unavailable", "process limit"), ("can't start new thread", "process limit"),
             ("No space left on device", "/tmp size limit"), ("Read-only file system", "read-only file system"),
             ("Connection refused", "no network"), ("Network is unreachable", "no network"),
             ("Temporary failure in name resolution", "no network"), ("Name or service not known", "no network")]
FILE_ERRORS = {"OSError", "FileNotFoundError", "PermissionError", "NotADirectoryError", "IsADirectoryError"}
SCORING = threading.Lock()  # reruns run side by side (grade's jobs); the in-process scoring, one at a time


def grade_one(submission: Path, test_json, stats_dir, extractor, clip_model, reference_dir=None,
              parameters: dict | None = None, timeout: float | None = 600, images_subdir: str = "results",
              box: Sandbox | None = None, runs_dir=None, autograder=None) -> dict:
    """One row: rerun the notebooks (in order, parameters injected) in a sandboxed working copy, then check and score
    the images they wrote. box: the sandbox (default: course data from test_json and stats_dir readable, the rest as
    `grade` sets it); runs_dir: where `<submission>/` keeps the executed notebooks, the images and scores.json;
    autograder: a folder of otter autograders (`hw6 assign`): the exercises are graded before the rerun."""
    submission = Path(submission)
    box = box or course_sandbox(test_json, stats_dir, reference_dir, submission.parent, [],
                                readable=[autograder] if autograder else ())
    runs = Path(runs_dir or "grades_runs") / submission.name
    row = {"submission": submission.name, "status": "ok", "failed_notebook": "", "error": ""}
    start = time.time()
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="hw6-grade-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp) / submission.name
        try:
            copy_submission(submission, work, images_subdir)
            if autograder is not None:
                row.update(grade_exercises_in_box(work, autograder, runs, box))
            row.update(rerun(work, runs, parameters, timeout, images_subdir, box))
        except Exception as err:  # whatever a submission does, the batch goes on
            row.update(status="error", error=error_line(err))
        copy_regular_files(work / "executed", runs / "executed")
        if row["status"] == "ok":
            try:
                with SCORING:
                    row.update(score_rerun(work, runs, images_subdir, test_json, stats_dir, reference_dir, extractor,
                                           clip_model))
            except Exception as err:
                row.update(status="scoring failed", error=error_line(err))
    row["run_time_s"] = round(time.time() - start, 1)
    row.pop("num_images", None)
    return row


def rerun(work: Path, runs: Path, parameters, timeout, images_subdir: str, box: Sandbox) -> dict:
    """Run the notebooks of the working copy `work`; the row's status, failed_notebook and error."""
    notebooks = find_notebooks(work)
    if not notebooks:
        raise ValueError("no numbered notebooks (NN_*.ipynb) to rerun")
    parameters = {**(parameters or {}), "RESULTS_DIR": str(work / images_subdir)}
    outcome = run(runner_command(work, notebooks, parameters, timeout), work, box)
    (runs / "log.txt").write_text(outcome.output)
    row = read_outcome(outcome, box, runs / "log.txt")
    if "error" in row:  # the executed copies are kept in runs/, the working copy goes
        row["error"] = row["error"].replace(str(work / "executed"), str(runs / "executed"))
    return row


def exercise_columns(autograder) -> dict:
    """{column: points possible} of the exercises of an autograder folder: `ex_<name>` each (by notebook, then by
    name), and `ex_total`."""
    from .exercises import exercise_points
    zips = sorted(Path(autograder).glob("[0-9][0-9]_*.zip"))
    if not zips:
        raise FileNotFoundError(f"{autograder}: no autograder NN_name.zip (write them with `hw6 assign`)")
    columns = {f"ex_{name}": points for archive in zips for name, points in sorted(exercise_points(archive).items())}
    return {**columns, "ex_total": sum(columns.values())}


def grade_exercises_in_box(work: Path, autograder, runs: Path, box: Sandbox) -> dict:
    """The exercise columns of a row: `python -m hw6utils.exercises grade` (the grader's copy, otter's local grader)
    on the working copy's notebooks, in the sandbox; its JSON is kept as runs/exercises.json. The notebooks are
    looked for as the rerun finds them; none, or a grader that reports nothing, leaves the columns empty."""
    notebooks = find_notebooks(work)
    if not notebooks:
        return {}
    command = [sys.executable, "-I", "-c", EXERCISES_RUNNER, str(REPO_ROOT), "grade", *map(str, notebooks),
               "--autograder", str(Path(autograder).resolve()), "--timeout", str(box.limits.time_s),
               "--report", EXERCISES_REPORT]
    outcome = run(command, work, box)
    (runs / "exercises_log.txt").write_text(outcome.output)
    reports = [line[len(EXERCISES_REPORT):] for line in outcome.output.splitlines()
               if line.startswith(EXERCISES_REPORT)]
    try:
        scores = json.loads(reports[-1]) if outcome.returncode == 0 and reports else None
        columns = {f"ex_{name}": float(score["score"]) for name, score in scores.items()}
    except (ValueError, TypeError, KeyError, AttributeError):  # no report, or not one the grader writes
        return {"error": f"exercises not graded (exit status {outcome.returncode}); see {runs / 'exercises_log.txt'}"}
    (runs / "exercises.json").write_text(json.dumps(scores, indent=1) + "\n")
    return columns


def copy_submission(submission: Path, work: Path, images_subdir: str) -> None:
    """The working copy a rerun may write: the submission without its shipped images (nor what an earlier grader left
    in it: `<images>_shipped/`, `executed/`), links copied as links, special files (pipes, devices) left out."""
    left_out = {images_subdir, f"{images_subdir}_shipped", "executed"}

    def ignore(folder, names):
        relative = Path(folder).relative_to(submission)
        return {name for name in names if (relative / name).as_posix() in left_out or is_special(Path(folder) / name)}
    shutil.copytree(submission, work, symlinks=True, ignore=ignore)


def is_special(path: Path) -> bool:
    return not (path.is_symlink() or path.is_dir() or path.is_file())


def find_notebooks(work: Path) -> list:
    """The numbered notebooks (`NN_*.ipynb`) below `work`, in path order; links to folders are not followed."""
    found = []
    for folder, dirs, files in os.walk(work):
        dirs[:] = [d for d in dirs if d not in SKIPPED]
        found += [Path(folder) / name for name in files
                  if name.endswith(".ipynb") and name[:2].isdigit() and name[2:3] == "_"]
    return sorted(found)


def shipped_code(notebook_dir: Path, work: Path) -> Path | None:
    """The folder holding the submission's own `hw6utils/` (e.g. `code/`), looking up from its notebooks."""
    for folder in [notebook_dir, *notebook_dir.parents]:
        if (folder / "hw6utils" / "__init__.py").is_file():
            return folder
        if folder == work:
            return None
    return None


def runner_command(work: Path, notebooks: list, parameters: dict, timeout) -> list:
    """`hw6utils.notebooks.main` from the grader's own copy (python -I: not the submission's), its kernels importing
    the submission's hw6utils first, the grader's where it ships none."""
    folder = notebooks[0].parent
    own = shipped_code(folder, work)
    kernel_path = os.pathsep.join(([str(own)] if own else []) + [str(REPO_ROOT)])
    return [sys.executable, "-I", "-c", RUNNER, str(REPO_ROOT), *[p.name for p in notebooks], "--cwd", str(folder),
            "--out_dir", str(work / "executed"), "--parameters", json.dumps(parameters), "--kernel_path", kernel_path,
            *(["--timeout", str(timeout)] if timeout else [])]


def read_reports(output: str) -> list:
    """The runner's `hw6-runner: {json}` lines (a notebook may print such lines too: it only fools its own row)."""
    reports = []
    for line in output.splitlines():
        if line.startswith(REPORT):
            try:
                report = json.loads(line[len(REPORT):])
            except ValueError:
                continue
            if isinstance(report, dict):
                reports.append(report)
    return reports


def read_outcome(outcome, box: Sandbox, log: Path) -> dict:
    """status, failed_notebook and error from what the runner reported (a killed runner reports nothing)."""
    reports = read_reports(outcome.output)
    started = next((str(r["started"]) for r in reversed(reports) if "started" in r), "")
    failed = next((r for r in reversed(reports) if "failed" in r), None)
    if outcome.timed_out:
        return {"status": "contained: time limit", "failed_notebook": started,
                "error": f"{started}: still running at the {box.limits.time_s:g} s time limit for a submission; "
                         "stopped, with everything it started"}
    if failed is not None:
        error = str(failed.get("error", ""))
        what = containment(str(failed.get("reason", "")), error, box)
        return {"status": f"contained: {what}" if what else "notebook failed", "failed_notebook": str(failed["failed"]),
                "error": error}
    if outcome.returncode == 0 and reports and reports[-1].get("done") is True:
        return {}
    return {"status": "notebook failed", "failed_notebook": started,
            "error": f"{started}: the notebook runner was killed (exit status {outcome.returncode}); see {log}"}


def containment(reason: str, error: str, box: Sandbox) -> str:
    """What stopped a notebook, when the sandbox did ('' for an ordinary failure)."""
    if reason == "CellTimeoutError":
        return "time limit"
    if not box.enabled:
        return ""
    if reason in FILE_ERRORS:  # an error on a path that the sandbox keeps out
        hidden = next((what for path, what in wholly_hidden(box).items() if f"{path}" in error), "")
        if hidden:
            return f"no access to {hidden}"
    return next((what for said, what in CONTAINED if said in f"{reason}: {error}"), "")


def copy_regular_files(folder: Path, dest: Path, keep_folders: bool = False) -> None:
    """Copy the regular files of `folder` (not below it) to `dest`, and with keep_folders its subfolders as empty
    ones (so the image check names them); links and special files are left behind."""
    if folder.is_symlink() or not folder.is_dir():
        return
    dest.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            shutil.copyfile(entry.path, dest / entry.name, follow_symlinks=False)
        elif keep_folders and entry.is_dir(follow_symlinks=False):
            (dest / entry.name).mkdir()


def refused_images(work: Path, images_subdir: str) -> tuple:
    """('', '') when the rerun's image folder holds only regular files (and folders), else (what, why): a link, to
    the ground truth perhaps, is never followed, a pipe or device never opened."""
    folder = work
    for part in Path(images_subdir).parts:
        folder = folder / part
        if folder.is_symlink():
            why = f"{folder.relative_to(work)} is a symbolic link (to {os.readlink(folder)}); links are never followed"
            return f"symlink in {images_subdir}", why
    if not folder.is_dir():
        return "", ""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_symlink():
            why = f"{images_subdir}/{entry.name} is a symbolic link (to {os.readlink(entry.path)}); links are never followed"
            return f"symlink in {images_subdir}", why
        if not (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)):
            return f"special file in {images_subdir}", f"{images_subdir}/{entry.name} is not a regular file"
    return "", ""


def score_rerun(work: Path, runs: Path, images_subdir: str, test_json, stats_dir, reference_dir, extractor,
                clip_model) -> dict:
    """Check and score the rerun's images, from a copy of its regular files outside the working copy."""
    what, why = refused_images(work, images_subdir)
    if what:
        return {"status": f"contained: {what}", "error": why}
    images = runs / "results"
    copy_regular_files(work / images_subdir, images, keep_folders=True)
    problems = check_submission(images, test_json)
    if problems:
        return {"status": "bad images", "error": problem_summary(problems)}
    return score(images, test_json, stats_dir, reference_dir, extractor, clip_model, out_json=runs / "scores.json")


def error_line(err: Exception) -> str:
    """'<ExceptionType>: <first line of its message>' for a row of the grades."""
    message = str(err)
    return f"{type(err).__name__}: {message.splitlines()[0] if message else ''}"


def course_sandbox(test_json, stats_dir, reference_dir, submissions_dir, grade_files: list, limits=None,
                   gpu: bool = False, enabled: bool = True, readable=()) -> Sandbox:
    """The sandbox of `hw6 grade`: the public course data readable (test.json's folder when it is a course folder,
    train/ and train_info.json beside it; the FID statistics), the ground truth, the submissions, the grades and the
    teacher's home hidden."""
    test_json = Path(test_json).resolve()
    course = test_json.parent if any((test_json.parent / n).exists() for n in ["train", "train_info.json"]) else test_json
    hidden = {Path(submissions_dir).resolve(): "other submissions", Path.home().resolve(): "home"}
    hidden.update({Path(path).resolve(): "grades" for path in grade_files})
    if reference_dir is not None:
        hidden[Path(reference_dir).resolve()] = "ground truth"
    return Sandbox(readable=[course, Path(stats_dir).resolve(), *map(Path, readable)], hidden=hidden,
                   limits=limits or Limits(), gpu=gpu, enabled=enabled)


def read_grades(out_csv: Path) -> list:
    """The rows of an earlier grades CSV, numbers as numbers (a missing score left out, as grade_one leaves it)."""
    rows = []
    with out_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            for key in ["run_time_s", "fid", "clip_t", "clip_i", *[k for k in row if k.startswith("ex_")]]:
                if row.get(key):
                    row[key] = float(row[key])
                else:
                    row.pop(key, None)
            rows.append(row)
    return rows


def csv_header(out_csv: Path) -> list:
    with out_csv.open(newline="") as f:
        return next(csv.reader(f), [])


def start_grades(out_csv: Path, rows: list, columns: list) -> None:
    """Write the CSV's header and the rows kept from an earlier run (atomically: a crash leaves the old file)."""
    tmp = out_csv.with_name(out_csv.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out_csv)


def append_row(out_csv: Path, row: dict, columns: list) -> None:
    """Add one row and put it on disk now: a grader killed later loses no graded row."""
    with out_csv.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=columns, extrasaction="ignore").writerow(row)
        f.flush()
        os.fsync(f.fileno())


def grade(submissions_dir, out_csv, test_json, stats_dir, extractor, clip_model, reference_dir=None,
          parameters: dict | None = None, timeout: float | None = 600, images_subdir: str = "results",
          sandbox: bool = True, gpu: bool = False, limits: Limits | None = None, resume: bool = False,
          readable=(), autograder=None, jobs: int = 1) -> list:
    """Grade every folder in submissions_dir, each in a sandbox (sandbox=False: none); append each row to the CSV as
    it is graded (resume=True: keep its rows and skip those submissions); write a leaderboard (Markdown and HTML)
    beside it. gpu: bind the NVIDIA devices in; readable: more folders the notebooks may read; autograder: grade the
    exercises with these otter autograders (`hw6 assign`'s dist/autograder) too, a column each; jobs: submissions
    graded at once, each in its own sandbox (the CSV then lists them as they finish; the rows returned, by name)."""
    submissions = sorted(p for p in Path(submissions_dir).iterdir() if p.is_dir())
    if not submissions:
        raise ValueError(f"{submissions_dir}: no submission folders")
    if jobs < 1:
        raise ValueError(f"jobs: at least 1 submission at a time, got {jobs}")
    possible = exercise_columns(autograder) if autograder is not None else {}
    columns = COLUMNS + list(possible)
    out_csv = Path(out_csv).resolve()
    stem = out_csv.with_suffix("")
    runs_dir = stem.with_name(stem.name + "_runs")
    if sandbox:
        check_available(gpu)
    else:
        print(NO_SANDBOX_WARNING, file=sys.stderr)
    rows = read_grades(out_csv) if resume and out_csv.is_file() else []
    if rows and csv_header(out_csv) != columns:
        raise ValueError(f"{out_csv}: --resume: its columns {csv_header(out_csv)} are not this run's {columns} (resume "
                         "with the --autograder of the run it resumes, or none if it had none)")
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    start_grades(out_csv, rows, columns)
    runs_dir.mkdir(exist_ok=True)
    grade_files = [out_csv, runs_dir, f"{stem}_leaderboard.md", f"{stem}_leaderboard.html"]
    box = course_sandbox(test_json, stats_dir, reference_dir, submissions_dir, grade_files, limits, gpu, sandbox,
                         [*readable, *([autograder] if autograder is not None else [])])
    graded = {row["submission"] for row in rows}
    for name in sorted(graded & {p.name for p in submissions}):
        print(f"{name}: already graded (--resume)")

    def record(future):  # the CSV is written by this thread alone
        row = future.result()
        append_row(out_csv, row, columns)
        rows.append(row)
        print(f"{row['submission']}: {row['status']}" + (f", FID {row['fid']:.2f}" if "fid" in row else "")
              + (f", exercises {row['ex_total']:g}/{possible['ex_total']:g}" if "ex_total" in row else ""))

    todo = [p for p in submissions if p.name not in graded]
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads: each grade_one waits on its sandbox's processes
        pending = {pool.submit(grade_one, submission, test_json, stats_dir, extractor, clip_model, reference_dir,
                               parameters, timeout, images_subdir, box, runs_dir, autograder) for submission in todo}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    pending.discard(future)
                    record(future)
        except KeyboardInterrupt:  # the submissions being graded finish and keep their rows; the rest wait for --resume
            print(f"Ctrl-C: finishing the {sum(f.running() for f in pending)} submissions being graded", file=sys.stderr)
            pool.shutdown(wait=True, cancel_futures=True)
            for future in pending:
                if not future.cancelled():
                    record(future)
            raise
    rows.sort(key=lambda row: row["submission"])
    write_leaderboard(rows, stem, possible)
    return rows


def write_leaderboard(rows: list, stem: Path, exercises: dict | None = None) -> None:
    """<stem>_leaderboard.md and .html: scored submissions by FID (lower is better), then the rest; exercises:
    {column: points possible} of the exercise columns, shown after CLIP-I as `<name> (/<possible>)`."""
    exercises = exercises or {}
    ranked = sorted(rows, key=lambda r: (r.get("fid") is None, r.get("fid") or 0.0))

    def cell(row, key):
        value = row.get(key, "")
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    header = ["rank", "submission", "FID", "CLIP-T", "CLIP-I",
              *[f"{column[3:]} (/{points:g})" for column, points in exercises.items()], "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    body = []
    for row in ranked:  # equal FIDs share a rank (1, 1, 3)
        rank = 1 + sum(1 for other in rows if "fid" in other and "fid" in row and other["fid"] < row["fid"])
        values = [str(rank) if "fid" in row else "-", row["submission"], cell(row, "fid"), cell(row, "clip_t"),
                  cell(row, "clip_i"), *[f"{row[c]:g}" if c in row else "" for c in exercises],
                  row["status"] + (f" ({row['error'][:80]})" if row["error"] else "")]
        lines.append("| " + " | ".join(v.replace("|", "/") for v in values) + " |")
        body.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in values) + "</tr>")
    Path(f"{stem}_leaderboard.md").write_text("\n".join(lines) + "\n")
    Path(f"{stem}_leaderboard.html").write_text(
        "<table>\n<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>\n" + "\n".join(body) + "\n</table>\n")
