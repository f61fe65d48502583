"""The grading sandbox (bubblewrap): hostile fake submissions are contained, a good one scores as it does without it."""
import math
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from hw6utils.cli import main
from hw6utils.grading import grade
from hw6utils.sandbox import Limits, Sandbox, mount_args, mounts, run
from test_grading import needs_sandbox, notebook_submission, processes_with, scorer_inputs
from test_scoring import tiny_clip_dir, tiny_extractor  # noqa: F401  (the scorer's stand-ins and fixture)
NAMES = ["0_main.png", "0_jump.png", "1_main.png", "1_hit.png"]
NOISE_IMAGES = """import numpy
from pathlib import Path
from PIL import Image
Path(RESULTS).mkdir(exist_ok=True)
for i, name in enumerate(NAMES):
    pixels = numpy.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=numpy.uint8)
    Image.fromarray(pixels).save(Path(RESULTS) / name)
NAMES = []"""  # varied images: a finite FID
LIMITS = Limits(time_s=30, memory_gb=2, processes=96, file_gb=0.02, tmp_gb=0.05)
FORK_BOMB = """import os, time
for _ in range(3000):  # bounded, so that a missing process limit cannot hurt the machine
    if os.fork() == 0:
        time.sleep(20)
        os._exit(0)"""
WRITES_ELSEWHERE = """errors = []
for path in [{other!r}, {grades!r}, {home!r}]:
    try:
        with open(path, "a") as f:
            f.write("pwned")
    except OSError as err:
        errors.append(str(err))
if errors:
    raise OSError("; ".join(errors))"""


def listener() -> tuple:
    """A TCP server on 127.0.0.1 that counts the connections it accepts: (port, accepted list)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        while True:
            connection, _ = server.accept()
            accepted.append(connection)
    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1], accepted


@pytest.mark.slow
@needs_sandbox
def test_hostile_submissions_are_contained(tmp_path, monkeypatch, tiny_clip_dir):
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.txt").write_text("teacher's")
    monkeypatch.setenv("HOME", str(home))
    test_json, stats = scorer_inputs(tmp_path / "course", NAMES)
    (tmp_path / "course" / "train_info.json").write_text("{}")  # a course folder: readable, ground truth inside it
    truth = tmp_path / "course" / "truth"
    truth.mkdir()
    for name in NAMES:
        Image.new("RGB", (256, 256), (200, 30, 30)).save(truth / name)
    port, accepted = listener()
    marker = f"sleep {random.randint(10**6, 10**7)}"  # its own: no process left by another run can match
    subs, out = tmp_path / "submissions", tmp_path / "grades" / "grades.csv"
    attacks = {
        "reads_truth": f"print(open({str(truth / NAMES[0])!r}, 'rb').read(8))",
        "links_truth": ("import os\nos.makedirs(RESULTS, exist_ok=True)\nfor name in NAMES:\n"
                        f"    os.symlink(os.path.join({str(truth)!r}, name), os.path.join(RESULTS, name))\nNAMES = []"),
        "writes_elsewhere": WRITES_ELSEWHERE.format(other=str(subs / "good" / "notebooks" / "01_generate.ipynb"),
                                                    grades=str(out), home=str(home / "secret.txt")),
        "connects": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)",
        "forks": FORK_BOMB,
        "eats_memory": "import numpy\nhog = numpy.zeros(8 * 2**30, dtype=numpy.uint8)",  # lazily: free where not limited
        "writes_big_file": "with open('big.bin', 'wb') as f:\n    for _ in range(64):\n        f.write(bytes(2**20))",
        "sleeps": f"import subprocess, time\nsubprocess.Popen({marker.split()!r})\ntime.sleep(3600)",
    }
    for name, source in attacks.items():
        notebook_submission(subs / name, source, NAMES)
    notebook_submission(subs / "good", NOISE_IMAGES, NAMES)
    out.parent.mkdir()
    out.write_text("")
    before = (subs / "good" / "notebooks" / "01_generate.ipynb").read_bytes()
    start = time.time()
    rows = grade(subs, out, test_json, stats, tiny_extractor(), str(tiny_clip_dir), reference_dir=truth, timeout=60,
                 limits=LIMITS, jobs=3)  # three sandboxes at once: each holds its own limits
    print(f"graded {len(rows)} submissions in the sandbox in {time.time() - start:.0f}s")
    by_name = {row["submission"]: row for row in rows}
    expected = {"reads_truth": "contained: no access to ground truth", "links_truth": "contained: symlink in results",
                "writes_elsewhere": "contained: no access to other submissions", "connects": "contained: no network",
                "forks": "contained: process limit", "eats_memory": "contained: memory limit",
                "writes_big_file": "contained: file size limit", "sleeps": "contained: time limit", "good": "ok"}
    assert {name: row["status"] for name, row in by_name.items()} == expected, rows
    assert all("fid" not in row for name, row in by_name.items() if name != "good")
    assert by_name["sleeps"]["failed_notebook"] == "01_generate.ipynb" and 30 <= by_name["sleeps"]["run_time_s"] < 45
    assert not processes_with(marker)  # the time limit ended the notebook and everything it started
    assert accepted == []
    assert (subs / "good" / "notebooks" / "01_generate.ipynb").read_bytes() == before
    assert (home / "secret.txt").read_text() == "teacher's" and "pwned" not in out.read_text()
    # the same good submission, graded without the sandbox, scores exactly the same
    alone = tmp_path / "alone"
    notebook_submission(alone / "good", NOISE_IMAGES, NAMES)
    plain = grade(alone, tmp_path / "plain.csv", test_json, stats, tiny_extractor(), str(tiny_clip_dir),
                  reference_dir=truth, timeout=60, sandbox=False)
    assert math.isfinite(by_name["good"]["fid"])
    assert {k: plain[0][k] for k in ["status", "fid", "clip_t", "clip_i"]} == \
        {k: by_name["good"][k] for k in ["status", "fid", "clip_t", "clip_i"]}
    print(f"good submission: {by_name['good']['run_time_s']} s sandboxed, {plain[0]['run_time_s']} s without")


@needs_sandbox
def test_the_sandbox_adds_under_a_second(tmp_path):
    """Starting and ending a sandbox around a process, against the same process alone (median of 5)."""
    work = tmp_path / "work"
    work.mkdir()
    command = [os.sys.executable, "-I", "-c", "pass"]

    def median_seconds(box):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            assert run(command, work, box).returncode == 0
            times.append(time.perf_counter() - start)
        return sorted(times)[2]
    plain, boxed = median_seconds(Sandbox(enabled=False)), median_seconds(Sandbox())
    print(f"a process alone {plain * 1000:.0f} ms, in the sandbox {boxed * 1000:.0f} ms: "
          f"overhead {(boxed - plain) * 1000:.0f} ms")
    assert boxed - plain < 1.0


def test_a_hidden_folder_inside_a_readable_one_is_masked_after_it(tmp_path):
    course, work = tmp_path / "course", tmp_path / "work"
    (course / "truth").mkdir(parents=True)
    (course / "grades.csv").write_text("")
    work.mkdir()
    box = Sandbox(readable=[course], hidden={course / "truth": "ground truth", course / "grades.csv": "grades",
                                             tmp_path / "elsewhere": "other submissions"})
    args = mount_args(mounts(work, box))
    position = {(args[i], args[i + 1]): i for i in range(len(args) - 1)}
    assert position[("--ro-bind", str(course))] < position[("--tmpfs", str(course / "truth"))]
    assert position[("--ro-bind", "/dev/null")] > position[("--ro-bind", str(course))]
    assert position[("--tmpfs", "/tmp")] < position[("--ro-bind", str(course))] < position[("--bind", str(work))]
    assert str(tmp_path / "elsewhere") not in args  # not inside anything readable: absent anyway


def test_grade_stops_in_one_line_where_no_sandbox_can_start(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    (tmp_path / "subs" / "alice").mkdir(parents=True)
    args = ["grade", str(tmp_path / "subs"), "--out", str(tmp_path / "g.csv"), "--test-json", str(tmp_path / "t.json"),
            "--stats", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "apt-get install bubblewrap" in err and "--no-sandbox" in err, err
    assert not (tmp_path / "g.csv").exists()


def test_no_sandbox_says_what_a_submission_can_then_do(tmp_path, capsys):
    (tmp_path / "subs" / "alice").mkdir(parents=True)  # no notebooks: a row with its error, quickly
    test_json, stats = scorer_inputs(tmp_path / "course", NAMES)
    rows = grade(tmp_path / "subs", tmp_path / "g.csv", test_json, stats, None, "", sandbox=False)
    assert rows[0]["status"] == "error" and "no numbered notebooks" in rows[0]["error"]
    err = capsys.readouterr().err
    for can in ["read the ground truth", "other submissions", "your home folder", "network", "only the time limit holds"]:
        assert can in err, err
    assert Path(tmp_path / "g.csv").is_file()


FILL = """import os, time
made = 0
try:
    for _ in range(64):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        made += 1
except OSError:
    pass
with open('count', 'w') as f:
    f.write(str(made))
os.replace('count', 'full')
time.sleep(60)"""
SPAWN = """import os
children = []
for _ in range(6):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
print('forked', len(children))"""


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0, reason="as another user each sandbox is a user namespace of its own")
def test_sandboxes_at_once_have_a_process_count_each(tmp_path):
    """Root's sandboxes each run as a uid of their own: one holding every process its limit allows leaves the next
    one, started beside it, all of its own (as one shared user, `nobody`, the second could not fork at all)."""
    full, other = tmp_path / "full", tmp_path / "other"
    full.mkdir()
    other.mkdir()
    box = Sandbox(limits=Limits(time_s=10, processes=16))
    outcomes = []
    holder = threading.Thread(target=lambda: outcomes.append(run([os.sys.executable, "-c", FILL], full, box)))
    holder.start()
    deadline = time.time() + 20
    while not (full / "full").is_file() and time.time() < deadline:
        time.sleep(0.1)
    assert 0 < int((full / "full").read_text()) < 16  # it reached its limit and holds it
    beside = run([os.sys.executable, "-c", SPAWN], other, box)
    assert beside.returncode == 0 and "forked 6" in beside.output, beside.output
    holder.join()
    assert outcomes[0].timed_out  # the holder was still there, holding its processes, until its time limit


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's sandboxes are handed a uid")
def test_a_sandbox_uid_is_one_no_process_and_no_other_sandbox_has(monkeypatch):
    from hw6utils import sandbox
    monkeypatch.setattr(sandbox, "running_uids", lambda: {sandbox.FIRST_UID})  # as if a process ran as the first
    with sandbox.sandbox_user() as first, sandbox.sandbox_user() as second:
        assert sandbox.FIRST_UID < first < second < sandbox.FIRST_UID + sandbox.UIDS
    with sandbox.sandbox_user() as again:  # both let go
        assert again == first


@needs_sandbox
def test_a_submission_has_a_user_name_and_a_home(tmp_path):
    """Root's sandbox uid has no account: what asks for the user's name (torch.compile's cache folder) or home
    still gets one."""
    code = "import getpass, os; print(getpass.getuser(), os.path.expanduser('~'))"
    outcome = run([os.sys.executable, "-c", code], tmp_path, Sandbox(limits=Limits(time_s=30)))
    assert outcome.returncode == 0 and outcome.output.split() == ["sandbox", "/tmp/home"], outcome.output
