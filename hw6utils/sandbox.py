"""Run one submission's notebooks in a bubblewrap sandbox, for teachers' `hw6 grade`.

Inside a sandbox a submission sees the system's /usr and /etc, the Python environment, this project and the public
course data, all read-only; its own working copy, read-write; and a private /tmp of bounded size. Everything else is
absent: the ground truth, the other submissions, the grades, the teacher's home, the real /tmp. It has no network
(an empty network namespace of its own), its own process namespace (nothing it starts outlives it), and limits on
memory, processes and file size (util-linux's prlimit, applied inside). The grader kills it at the time limit.
Root's sandboxes each run as a user of their own, an unused uid (setpriv): the kernel never applies the process limit
to root, and counts it per user, so that as `nobody` every sandbox running at once (and every daemon of `nobody`)
would share one count.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import REPO_ROOT

GB = 2 ** 30
NOBODY = 65534           # the user of bubblewrap's start-up probe as root
FIRST_UID = 1_500_000_000  # root's sandboxes run as uids from here on: one no process and no account uses,
UIDS = 4096                # and no other sandbox of this machine holds (a lock on a file in lock_dir() says so)
OUTPUT_TAIL = 64 * 1024  # characters of a run's stdout and stderr kept for its log
FIX = "or pass --no-sandbox to grade without one (README, 'For the course', says what a submission can then do)"
NO_SANDBOX_WARNING = (
    "warning: --no-sandbox: each submission's notebooks run as you, with your files and network: they can read the "
    "ground truth (--reference), change other submissions, the grades and your home folder, reach the network, fill "
    "the disk, fork without bound and leave processes running; only the time limit holds (it kills the process "
    "group). Grade only submissions you trust this way.")


@dataclass
class Limits:
    time_s: float = 3600   # wall clock for a whole submission, all its notebooks
    memory_gb: float = 16  # per process: heap and private mappings (RLIMIT_DATA; GPU memory is not counted)
    processes: int = 1024  # processes and threads in the sandbox (RLIMIT_NPROC)
    file_gb: float = 8     # the largest file it may write (RLIMIT_FSIZE; the course UNet's optimizer state is ~2 GB)
    tmp_gb: float = 1      # its private /tmp, and /dev/shm (each a tmpfs of this size)


@dataclass
class Sandbox:
    readable: list = field(default_factory=list)  # read-only besides the Python environment and the project
    hidden: dict = field(default_factory=dict)    # path -> what it is; kept out even inside a readable folder
    limits: Limits = field(default_factory=Limits)
    gpu: bool = False                             # bind the NVIDIA device nodes in
    enabled: bool = True                          # False: --no-sandbox, only the time limit holds


@dataclass
class Outcome:
    returncode: int
    timed_out: bool  # killed at the time limit
    output: str      # the last OUTPUT_TAIL characters of its stdout and stderr


def is_root() -> bool:
    return os.geteuid() == 0


def unavailable_reason(gpu: bool = False) -> str:
    """'' when a sandbox can start here; else one line saying why and how to fix it."""
    if not sys.platform.startswith("linux"):
        return f"the grading sandbox needs Linux (bubblewrap): grade on a Linux machine, VM or container, {FIX}"
    if shutil.which("bwrap") is None:
        return ("the grading sandbox needs bubblewrap, and bwrap is not on PATH: apt-get install bubblewrap "
                f"(Debian/Ubuntu; dnf install bubblewrap on Fedora), {FIX}")
    tools = ["setpriv", "prlimit"] if is_root() else ["prlimit"]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"the grading sandbox needs {' and '.join(missing)} (util-linux): apt-get install util-linux, {FIX}"
    if gpu and not glob.glob("/dev/nvidia[0-9]*"):
        return "--gpu: no NVIDIA device (/dev/nvidia0 ...) on this machine; grade without --gpu"
    with tempfile.TemporaryDirectory(prefix="hw6-sandbox-probe-") as work:
        os.chmod(work, 0o755)
        box = Sandbox(limits=Limits(time_s=30), gpu=gpu)
        try:
            probe = subprocess.run(sandbox_command(["true"], Path(work), box), capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return f"bubblewrap did not start a sandbox within 30 s, {FIX}"
    if probe.returncode != 0:
        said = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        hint = ("allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04 and "
                "later kernel.apparmor_restrict_unprivileged_userns=0) or grade as root, ") if not is_root() else ""
        return f"bubblewrap cannot start a sandbox here ({said}): {hint}{FIX}"
    return ""


def check_available(gpu: bool = False) -> None:
    reason = unavailable_reason(gpu)
    if reason:
        raise RuntimeError(reason)


def python_paths() -> list:
    """The Python environment: the virtual environment and the installation it was made from."""
    return [Path(p).resolve() for p in {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}]


def hub_cache() -> Path | None:
    """Hugging Face's model cache, if there is one: the course presets load CLIP and the SD VAE from it."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    path = Path(constants.HF_HUB_CACHE)
    return path.resolve() if path.is_dir() else None


def inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def readable_paths(box: Sandbox) -> list:
    """The folders bound read-only besides the system's: the Python environment, this project, the model cache and
    box.readable, none inside another."""
    readable = []
    for path in python_paths() + [REPO_ROOT, hub_cache()] + [Path(p).resolve() for p in box.readable]:
        if path is not None and path.exists() and not any(inside(path, other) for other in readable):
            readable = [other for other in readable if not inside(other, path)] + [path]
    return readable


def wholly_hidden(box: Sandbox) -> dict:
    """The hidden paths with nothing readable inside them (a home folder may hold the Python installation)."""
    readable = readable_paths(box)
    return {path: what for path, what in box.hidden.items()
            if not any(inside(folder, Path(path).resolve()) for folder in readable)}


def mounts(work: Path, box: Sandbox) -> list:
    """(path, bwrap arguments) for every mount, a folder before anything mounted inside it: so a hidden path masks
    its readable folder, and the working copy and readable folders under /tmp come after the private /tmp."""
    ops, system = [], []
    for name in ["usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32"]:
        path = Path("/") / name
        if path.is_symlink():  # merged /usr: /bin -> usr/bin
            ops.append((path, ["--symlink", os.readlink(path), str(path)]))
        elif path.is_dir():
            ops.append((path, ["--ro-bind", str(path), str(path)]))
            system.append(path)
    tmp_size = str(int(box.limits.tmp_gb * GB))
    ops += [(Path("/proc"), ["--proc", "/proc"]), (Path("/dev"), ["--dev", "/dev"]),
            (Path("/dev/shm"), ["--perms", "1777", "--size", tmp_size, "--tmpfs", "/dev/shm"]),
            (Path("/tmp"), ["--perms", "1777", "--size", tmp_size, "--tmpfs", "/tmp"]),
            (Path("/tmp/home"), ["--perms", "0777", "--dir", "/tmp/home"])]
    readable = readable_paths(box)
    ops += [(path, ["--ro-bind", str(path), str(path)]) for path in readable
            if not any(inside(path, folder) for folder in system)]
    for path in map(Path, box.hidden):
        path = path.resolve()
        if path.exists() and any(inside(path, folder) for folder in readable + system):
            ops.append((path, ["--tmpfs", str(path)] if path.is_dir() else ["--ro-bind", "/dev/null", str(path)]))
    ops.append((work, ["--bind", str(work), str(work)]))
    if box.gpu:
        ops.append((Path("/sys"), ["--ro-bind", "/sys", "/sys"]))
        ops += [(Path(dev), ["--dev-bind", dev, dev]) for dev in sorted(glob.glob("/dev/nvidia*"))]
    ops.sort(key=lambda op: len(op[0].parts))  # stable: the order above within a depth
    return ops


def mount_args(ops: list) -> list:
    """bwrap arguments for the mounts, each preceded by its missing parent folders (bwrap would make them 0700,
    closed to the sandbox's user)."""
    args, made = [], {Path("/")}
    for path, op in ops:
        for parent in reversed(path.parents):
            if parent not in made and parent not in {p for p, _ in ops}:
                args += ["--perms", "0755", "--dir", str(parent)]
            made.add(parent)
        made.add(path)
        args += op
    return args


def sandbox_env(box: Sandbox) -> list:
    """The sandbox's whole environment (the teacher's is cleared): offline, a home in the private /tmp."""
    env = {"PATH": f"{Path(sys.prefix) / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp/home", "TMPDIR": "/tmp",
           "USER": "sandbox", "LOGNAME": "sandbox",  # root's sandbox uid has no account: getpass.getuser() reads these
           "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1"}
    if hub_cache() is not None:
        env["HF_HUB_CACHE"] = str(hub_cache())
    for name in ["CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS"]:
        if name in os.environ:
            env[name] = os.environ[name]
    return [arg for name, value in env.items() for arg in ["--setenv", name, value]]


def limit_command(limits: Limits, uid: int = NOBODY) -> list:
    """What runs first inside: root turns into `uid` (root is exempt from the process limit), then prlimit."""
    drop = [] if not is_root() else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                                     "--inh-caps=-all", "--bounding-set=-all", "--"]
    return drop + ["prlimit", f"--nproc={limits.processes}", f"--data={int(limits.memory_gb * GB)}",
                   f"--fsize={int(limits.file_gb * GB)}", "--core=0", "--"]


def sandbox_command(command: list, work: Path, box: Sandbox, uid: int = NOBODY) -> list:
    """The bwrap command line that runs `command` in `work`, contained as the module docstring says."""
    namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                  "--die-with-parent", "--new-session"]
    if not is_root():  # a user namespace: the process limit then counts the sandbox's processes alone
        namespaces += ["--unshare-user", "--cap-drop", "ALL"]
    return (["bwrap", *mount_args(mounts(work, box)), *namespaces, "--chdir", str(work), "--clearenv",
             *sandbox_env(box), "--", *limit_command(box.limits, uid), *command])


def prepare_working_copy(work: Path, uid: int | None) -> None:
    """Root's sandbox runs as `uid`, who must be able to write the working copy."""
    if uid is None:
        return
    for folder, dirs, files in os.walk(work):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.chown(name, uid, uid, follow_symlinks=False)


def running_uids() -> set:
    """The real uids of every process on the machine."""
    uids = set()
    for status in glob.glob("/proc/[0-9]*/status"):
        with contextlib.suppress(OSError):
            line = next(line for line in Path(status).read_text().splitlines() if line.startswith("Uid:"))
            uids.add(int(line.split()[1]))
    return uids


def has_account(uid: int) -> bool:
    import pwd
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def lock_dir() -> Path:
    """Root's folder of the sandboxes' uid locks: /run/hw6-sandbox (or in /tmp where /run cannot be written)."""
    folder = Path("/run/hw6-sandbox") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir()) / "hw6-sandbox"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise RuntimeError(f"{folder}: expected root's own folder (where the sandboxes' uids are handed out); "
                           "remove it and grade again")
    return folder


@contextlib.contextmanager
def sandbox_user():
    """As root, a uid for one sandbox, held (a lock on lock_dir()/<uid>) until it has ended; else None (a user
    namespace: the process limit then counts the sandbox's processes alone)."""
    from filelock import FileLock, Timeout
    if not is_root():
        yield None
        return
    folder = lock_dir()
    busy = running_uids()
    for uid in range(FIRST_UID, FIRST_UID + UIDS):
        if uid in busy or has_account(uid):
            continue
        lock = FileLock(folder / str(uid), timeout=0)  # an OS lock: let go of however this process ends
        try:
            lock.acquire()
        except Timeout:
            continue
        try:
            yield uid
        finally:
            lock.release()
        return
    raise RuntimeError(f"no free uid for a sandbox in {FIRST_UID}..{FIRST_UID + UIDS - 1}: {UIDS} sandboxes at once?")


def keep_tail(stream, kept: list) -> None:
    tail = b""
    for chunk in iter(lambda: stream.read1(65536), b""):
        tail = (tail + chunk)[-OUTPUT_TAIL:]
    kept.append(tail.decode(errors="replace"))


def wait_until_gone(pid: int | None, seconds: float = 10) -> None:
    """Wait for the sandbox's first process (its PID namespace's init) to end: the kernel ends every other process of
    the namespace before it."""
    deadline = time.time() + seconds
    while pid and time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)


def run(command: list, work: Path, box: Sandbox) -> Outcome:
    """Run `command` in the working copy `work`, in the sandbox (or, with box.enabled False, as a plain process
    group); kill it all at the time limit. Returns when nothing it started is left running (sandboxed)."""
    if not box.enabled:
        return run_process(command, work, box.limits.time_s)
    with sandbox_user() as uid:
        prepare_working_copy(work, uid)
        info_read, info_write = os.pipe()  # bwrap writes {"child-pid": N} there: the sandbox's first process
        argv = sandbox_command(command, work, box, uid)
        try:
            outcome = run_process([argv[0], "--info-fd", str(info_write), *argv[1:]], work, box.limits.time_s,
                                  info_write)
        finally:
            os.close(info_write)  # bwrap has ended: with our copy closed, the read below ends
            with os.fdopen(info_read) as info:
                text = info.read()
        wait_until_gone(json.loads(text).get("child-pid") if text.strip() else None)
    return outcome


def run_process(argv: list, work: Path, time_s: float, pass_fd: int | None = None) -> Outcome:
    """Run argv in its own process group, keep the tail of its output, SIGKILL the group at time_s."""
    proc = subprocess.Popen(argv, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, pass_fds=() if pass_fd is None else (pass_fd,))
    kept = []
    reader = threading.Thread(target=keep_tail, args=(proc.stdout, kept), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=time_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # sandboxed: bwrap, and with it (--die-with-parent) the whole sandbox
        proc.wait()
        timed_out = True
    reader.join(timeout=10)  # unsandboxed, a process that left the group may hold the pipe open: not waited for
    return Outcome(proc.returncode, timed_out, kept[0] if kept else "")
