"""The Colab cell: every notebook's first code cell installs the project inside Colab and is a no-op elsewhere.

The cell is run by a real IPython shell in a fresh subprocess, once as it is (outside Colab: nothing may run) and
once with a stand-in `google.colab` module, where its shell commands and magics are recorded instead of run. The
recorded `%pip install` is then checked the way pip itself would: `pip install --dry-run` on this checkout (what the
`git clone` would fetch), offline, so a bad option, a path that is not the clone, or a project pip cannot build or
whose requirements do not resolve fails here instead of in Colab.
"""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement

from checkout import CHECKOUT

NOTEBOOKS = sorted((CHECKOUT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
COLAB_TORCH = ["2.6.0+cu124", "2.8.0+cu126", "2.9.0+cu128"]  # GPU builds Colab has shipped: pip must keep them

# Runs in the subprocess: argv[1] is the cell's source, argv[2] "plain" or "colab". Prints one JSON line.
RUNNER = r"""
import json, os, sys, types
from IPython.core.interactiveshell import InteractiveShell

source, mode = sys.argv[1], sys.argv[2]
shell = InteractiveShell.instance()
calls = []
shell.system = lambda cmd: calls.append(["system", cmd])
shell.getoutput = lambda cmd, *a, **k: calls.append(["system", cmd]) or []
shell.run_line_magic = lambda name, line, *a, **k: calls.append(["%" + name, line])
shell.run_cell_magic = lambda name, line, cell, *a, **k: calls.append(["%%" + name, line])
shell.run_cell("pass")  # warm-up: the shell's own lazy imports are not the cell's
if mode == "colab":
    sys.modules["google"] = sys.modules.get("google") or types.ModuleType("google")
    sys.modules["google.colab"] = types.ModuleType("google.colab")
modules, path, cwd = set(sys.modules), list(sys.path), os.getcwd()
result = shell.run_cell(source)
print(json.dumps({"ok": result.success, "error": repr(result.error_before_exec or result.error_in_exec),
                  "calls": calls, "new_modules": sorted(set(sys.modules) - modules),
                  "path_changed": sys.path != path, "cwd_changed": os.getcwd() != cwd}))
"""


def first_code_cell(path: Path) -> str:
    return next(cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code")


def run_cell(source: str, mode: str, cwd: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", RUNNER, source, mode], cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def colab_commands(calls: list) -> dict:
    """The recorded Colab calls -> clone url and folder, pip arguments, the folder it changes to."""
    kinds = [name for name, _ in calls]
    assert kinds == ["system", "%pip", "%cd"], f"expected git clone, %pip install, %cd; got {calls}"
    clone = shlex.split(calls[0][1])
    assert clone[:2] == ["git", "clone"], calls[0]
    url, dest = [arg for arg in clone[2:] if not arg.startswith("-")]
    pip_args = shlex.split(calls[1][1])
    assert pip_args[0] == "install", calls[1]
    return {"url": url, "dest": dest, "pip_args": pip_args[1:], "cd": calls[2][1]}


def pip_dry_run(pip_args: list, dest: str, checkout: Path, report: Path) -> subprocess.CompletedProcess:
    """`pip install --dry-run` of the cell's arguments, with the clone folder replaced by `checkout`, offline."""
    args = [str(checkout) + arg[len(dest):] if arg == dest or arg.startswith(dest + "/") else arg for arg in pip_args]
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                           "--disable-pip-version-check", "--report", str(report), *args],
                          capture_output=True, text=True, timeout=300)


def check_install(commands: dict, notebook: Path, checkout: Path, report: Path) -> dict:
    """Everything the Colab cell relies on, against `checkout` standing for the clone. Returns pip's report."""
    dest = commands["dest"].rstrip("/")
    installs = [arg for arg in commands["pip_args"] if not arg.startswith("-")]
    assert installs == [dest], f"the cell must install the clone {dest} and nothing else (torch stays Colab's): " \
                               f"{commands['pip_args']}"
    assert commands["cd"].rstrip("/") == f"{dest}/notebooks", commands["cd"]
    assert (checkout / "notebooks" / notebook.name).is_file(), f"{notebook.name} is not in the clone's notebooks/"
    result = pip_dry_run(commands["pip_args"], dest, checkout, report)
    assert result.returncode == 0, f"pip rejects the Colab install: {result.stderr[-3000:]}"
    installed = json.loads(report.read_text())["install"]
    names = [item["metadata"]["name"] for item in installed]
    assert names == ["hw6utils"], f"pip would install {names} (only the project: its dependencies are there)"
    return installed[0]["metadata"]


def test_every_notebook_has_the_colab_cell():
    assert len(NOTEBOOKS) == 7
    sources = {first_code_cell(path) for path in NOTEBOOKS}
    assert len(sources) == 1, "the notebooks' first code cells differ"
    assert '"google.colab" in sys.modules' in sources.pop()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_cell_does_nothing_outside_colab(path, tmp_path):
    run = run_cell(first_code_cell(path), "plain", tmp_path)
    assert run["ok"], run["error"]
    assert run["calls"] == [], f"ran outside Colab: {run['calls']}"
    assert not [name for name in run["new_modules"] if name.split(".")[0] in {"pip", "setuptools", "google"}], \
        run["new_modules"]
    assert not run["path_changed"] and not run["cwd_changed"]
    assert list(tmp_path.iterdir()) == [], "the cell wrote files outside Colab"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_cell_installs_this_project_with_colabs_torch(path, tmp_path):
    run = run_cell(first_code_cell(path), "colab", tmp_path)
    assert run["ok"], run["error"]
    commands = colab_commands(run["calls"])
    # the Colab badge opens the notebook from the repository the cell clones
    badge = re.search(r"colab\.research\.google\.com/github/([^/\s]+/[^/\s]+)/blob/[^/\s]+/([^\s)]+)",
                      nbformat.read(path, as_version=4).cells[0].source)
    assert badge, f"{path.name}: no Colab badge in the first cell"
    assert commands["url"].removesuffix(".git") == f"https://github.com/{badge.group(1)}", commands["url"]
    assert badge.group(2) == f"notebooks/{path.name}", badge.group(2)
    metadata = check_install(commands, path, CHECKOUT, tmp_path / "report.json")
    torch = [Requirement(r) for r in metadata["requires_dist"] if Requirement(r).name == "torch"]
    assert torch and all(torch[0].specifier.contains(v, prereleases=True) for v in COLAB_TORCH), \
        f"the project's {torch} would replace Colab's GPU torch {COLAB_TORCH}"


def test_the_install_check_can_fail(tmp_path):
    """The checks above reject a pip command that misses the clone, and a project pip cannot resolve."""
    good = {"url": "https://github.com/OWNER/hw6-diffusion", "dest": "/content/hw6-diffusion",
            "pip_args": ["-q", "-e", "/content/hw6-diffusion"], "cd": "/content/hw6-diffusion/notebooks"}
    notebook = NOTEBOOKS[0]
    with pytest.raises(AssertionError, match="install the clone"):
        check_install({**good, "pip_args": ["-q", "-e", "/content/hw6"]}, notebook, CHECKOUT, tmp_path / "r1.json")
    with pytest.raises(AssertionError, match="torch stays"):
        check_install({**good, "pip_args": ["-q", "-e", "/content/hw6-diffusion", "torch==2.13.0"]}, notebook, CHECKOUT,
                      tmp_path / "r2.json")
    with pytest.raises(AssertionError, match="pip rejects"):
        check_install({**good, "pip_args": ["-q", "--editabel", "/content/hw6-diffusion"]}, notebook, CHECKOUT,
                      tmp_path / "r3.json")
    broken = tmp_path / "clone"  # a clone whose project needs a package that does not exist
    (broken / "notebooks").mkdir(parents=True)
    (broken / "notebooks" / notebook.name).write_text("{}")
    (broken / "pyproject.toml").write_text((CHECKOUT / "pyproject.toml").read_text().replace(
        '"scipy>=1.10",', '"scipy>=1.10", "hw6-no-such-package>=1",'))
    (broken / "hw6utils").mkdir()
    (broken / "hw6utils" / "__init__.py").write_text("")
    (broken / "README.md").write_text("")
    with pytest.raises(AssertionError, match="pip rejects"):
        check_install(good, notebook, broken, tmp_path / "r4.json")
