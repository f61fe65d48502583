"""Run the numbered notebooks headless with papermill, in order (`hw6 run-notebooks -p PRESET smoke`).

Each notebook gets only the parameters its `parameters` cell declares; a parameter that no notebook
declares is an error (a typo would otherwise be ignored). Executed copies go to `out_dir`.
`python -m hw6utils.notebooks` is what `hw6 grade` runs inside each submission's sandbox (see `main`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPORT = "hw6-runner: "  # the prefix of the lines `main` reports on, for the grader outside the sandbox


class NotebookFailed(RuntimeError):
    """A notebook stopped: `notebook` is its file name, `reason` what stopped it (the exception's type name)."""

    def __init__(self, notebook: str, reason: str, message: str):
        super().__init__(message)
        self.notebook, self.reason = notebook, reason


def notebook_paths(names=None, cwd="notebooks") -> list:
    """The notebooks to run: all `NN_*.ipynb` in cwd in order, or the given names ("01_data" or "01_data.ipynb")."""
    folder = Path(cwd)
    available = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if names is None:
        return available
    paths = [folder / (name if name.endswith(".ipynb") else f"{name}.ipynb") for name in names]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"no notebook {missing} in {folder}; available: {[p.name for p in available]}")
    return paths


def load_parameters(parameters) -> dict:
    """A dict as it is, or a YAML file of parameters (papermill's own `-f` format)."""
    if parameters is None or isinstance(parameters, dict):
        return dict(parameters or {})
    import yaml

    try:
        loaded = yaml.safe_load(Path(parameters).read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{parameters}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{parameters}: expected a YAML mapping of parameter names to values")
    return loaded


def run_notebooks(names=None, parameters=None, out_dir="outputs/notebooks", cwd="notebooks",
                  timeout: float | None = None, only_declared: bool = False) -> list:
    """Execute the notebooks one after the other (kernel python3, working directory cwd). Returns the output paths.

    parameters: dict or path of a YAML file. timeout: seconds per cell (None = no limit). only_declared: pass
    each notebook the parameters it declares and ignore the rest, instead of failing on an unknown one.
    A failing cell raises NotebookFailed (a RuntimeError) naming the notebook and the cell (a cell past the timeout,
    or a kernel that died: the notebook); its executed copy keeps the traceback.
    """
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    paths = notebook_paths(names, cwd)
    parameters = load_parameters(parameters)
    declared = {path: papermill.inspect_notebook(str(path)) for path in paths}
    unknown = sorted(set(parameters) - {name for params in declared.values() for name in params})
    if unknown and not only_declared:  # grading passes a common set that not every submission declares
        raise ValueError(f"parameter(s) {unknown} are declared by none of {[p.name for p in paths]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for path in paths:
        own = {k: v for k, v in parameters.items() if k in declared[path]}
        start = time.time()
        try:
            papermill.execute_notebook(str(path), str(out / path.name), parameters=own, kernel_name="python3",
                                       cwd=str(path.parent), progress_bar=False, execution_timeout=timeout)
        except PapermillExecutionError as err:
            first_line = err.source.strip().splitlines()[0] if err.source.strip() else ""
            raise NotebookFailed(path.name, err.ename, f"{path.name}: cell {err.cell_index} (execution count "
                                 f"{err.exec_count}, {first_line!r}) raised {err.ename}: {err.evalue}; "
                                 f"see {out / path.name}") from None
        except CellTimeoutError:
            raise NotebookFailed(path.name, "CellTimeoutError", f"{path.name}: a cell ran past the {timeout:g} s "
                                 f"limit; see {out / path.name}") from None
        except DeadKernelError:  # killed (by itself, or by a limit) or crashed
            raise NotebookFailed(path.name, "DeadKernelError", f"{path.name}: the kernel died (killed, or it "
                                 f"crashed); see {out / path.name}") from None
        print(f"{path.name}: ok in {time.time() - start:.0f}s")
        done.append(out / path.name)
    return done


def report(**fields) -> None:
    print(REPORT + json.dumps(fields), flush=True)


def main(argv=None) -> int:
    """Run the named notebooks in order, as `hw6 grade` does inside a sandbox, reporting each start and the end on
    `hw6-runner: {json}` lines (`started`, then `failed` with `reason` and `error`, or `done`). Exit status 1 on a failure.

    The kernels get `--kernel_path` as PYTHONPATH: the submission's own code first, so it imports its own hw6utils."""
    parser = argparse.ArgumentParser(prog="python -m hw6utils.notebooks", description=main.__doc__)
    parser.add_argument("names", nargs="+", help="notebooks to run, in order")
    parser.add_argument("--cwd", required=True, help="folder of the notebooks (their working directory)")
    parser.add_argument("--out_dir", required=True, help="executed copies")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per cell [no limit]")
    parser.add_argument("--parameters", default="{}", help="JSON object of parameters; each notebook gets those it declares")
    parser.add_argument("--kernel_path", default="", help="PYTHONPATH of the kernels")
    args = parser.parse_args(argv)
    if args.kernel_path:
        os.environ["PYTHONPATH"] = args.kernel_path  # the kernels inherit this process's environment
    for name in args.names:
        report(started=name)
        try:
            run_notebooks([name], json.loads(args.parameters), args.out_dir, args.cwd, args.timeout, only_declared=True)
        except NotebookFailed as err:
            report(failed=err.notebook, reason=err.reason, error=str(err))
            return 1
        except Exception as err:  # e.g. a notebook file that is not valid JSON
            first_line = str(err).splitlines()[0] if str(err) else ""
            report(failed=name, reason=type(err).__name__, error=f"{name}: {type(err).__name__}: {first_line}")
            return 1
    report(done=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
