"""Batch grading for teachers: rerun each submission's notebooks in fresh kernels, score its images, rank by FID.

A submission is a folder (e.g. an unzipped `hw6_<ID>/`) with its notebooks somewhere below it and, once they
have run again, one PNG per test.json entry in `results/` (the images it shipped there are set aside first).
A broken submission becomes a row with its error; it never stops the batch.
"""
from __future__ import annotations

import csv
import html
import shutil
import time
from pathlib import Path

from .notebooks import run_notebooks
from .scoring import check_submission, problem_summary, score

COLUMNS = ["submission", "status", "failed_notebook", "error", "run_time_s", "fid", "clip_t", "clip_i"]


def grade_one(submission: Path, test_json, stats_dir, extractor, clip_model, reference_dir=None,
              parameters: dict | None = None, timeout: float | None = 600, images_subdir: str = "results") -> dict:
    """One row: rerun the notebooks (in order, parameters injected), then check and score the images they wrote.

    The score comes from the rerun alone: images shipped in `<images_subdir>/` are moved to
    `<images_subdir>_shipped/` first (kept for comparison), so a rerun that writes nothing scores nothing."""
    row = {"submission": submission.name, "status": "ok", "failed_notebook": "", "error": ""}
    start = time.time()
    skipped = {".ipynb_checkpoints", "executed"}  # editor backups, and the copies an earlier grading executed
    notebooks = [p for p in sorted(submission.rglob("[0-9][0-9]_*.ipynb"))
                 if not skipped & set(p.relative_to(submission).parts)]
    images = submission / images_subdir
    try:
        if not notebooks:
            raise ValueError("no numbered notebooks (NN_*.ipynb) to rerun")
        set_aside_shipped(images)
        run_notebooks([p.name for p in notebooks], parameters or {}, out_dir=submission / "executed",
                      cwd=notebooks[0].parent, timeout=timeout, only_declared=True)
    except RuntimeError as err:  # a failing cell: run_notebooks names the notebook and the cell
        message = str(err)
        row.update(status="notebook failed", failed_notebook=message.split(":", 1)[0], error=message)
    except Exception as err:  # whatever a submission does, the batch goes on
        row.update(status="error", error=error_line(err))
    if row["status"] == "ok":
        try:
            problems = check_submission(images, test_json)
            if problems:
                row.update(status="bad images", error=problem_summary(problems))
            else:
                row.update(score(images, test_json, stats_dir, reference_dir, extractor, clip_model,
                                 out_json=submission / "scores.json"))
        except Exception as err:
            row.update(status="scoring failed", error=error_line(err))
    row["run_time_s"] = round(time.time() - start, 1)
    row.pop("num_images", None)
    return row


def error_line(err: Exception) -> str:
    """'<ExceptionType>: <first line of its message>' for a row of the grades."""
    message = str(err)
    return f"{type(err).__name__}: {message.splitlines()[0] if message else ''}"


def set_aside_shipped(images: Path) -> None:
    """Move the submitted images to <images>_shipped/ (once: on a later grading run that folder exists already,
    and what `images` holds was written by the earlier rerun, so it goes)."""
    shipped = images.with_name(images.name + "_shipped")
    if not images.exists():
        return
    if shipped.exists():
        shutil.rmtree(images)
    else:
        images.rename(shipped)


def grade(submissions_dir, out_csv, test_json, stats_dir, extractor, clip_model, reference_dir=None,
          parameters: dict | None = None, timeout: float | None = 600, images_subdir: str = "results") -> list:
    """Grade every folder in submissions_dir; write the CSV and a leaderboard (Markdown and HTML) beside it."""
    submissions = sorted(p for p in Path(submissions_dir).iterdir() if p.is_dir())
    if not submissions:
        raise ValueError(f"{submissions_dir}: no submission folders")
    rows = []
    for submission in submissions:
        rows.append(grade_one(submission, test_json, stats_dir, extractor, clip_model, reference_dir, parameters,
                              timeout, images_subdir))
        print(f"{submission.name}: {rows[-1]['status']}" + (f", FID {rows[-1]['fid']:.2f}" if "fid" in rows[-1] else ""))
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_leaderboard(rows, out_csv.with_suffix(""))
    return rows


def write_leaderboard(rows: list, stem: Path) -> None:
    """<stem>_leaderboard.md and .html: scored submissions by FID (lower is better), then the rest."""
    ranked = sorted(rows, key=lambda r: (r.get("fid") is None, r.get("fid") or 0.0))

    def cell(row, key):
        value = row.get(key, "")
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    header = ["rank", "submission", "FID", "CLIP-T", "CLIP-I", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    body = []
    for row in ranked:  # equal FIDs share a rank (1, 1, 3)
        rank = 1 + sum(1 for other in rows if "fid" in other and "fid" in row and other["fid"] < row["fid"])
        values = [str(rank) if "fid" in row else "-", row["submission"], cell(row, "fid"), cell(row, "clip_t"),
                  cell(row, "clip_i"), row["status"] + (f" ({row['error'][:80]})" if row["error"] else "")]
        lines.append("| " + " | ".join(v.replace("|", "/") for v in values) + " |")
        body.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in values) + "</tr>")
    Path(f"{stem}_leaderboard.md").write_text("\n".join(lines) + "\n")
    Path(f"{stem}_leaderboard.html").write_text(
        "<table>\n<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>\n" + "\n".join(body) + "\n</table>\n")
