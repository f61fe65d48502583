"""Run the numbered notebooks headless with papermill, in order (`hw6 run-notebooks -p PRESET smoke`).

Each notebook gets only the parameters its `parameters` cell declares; a parameter that no notebook
declares is an error (a typo would otherwise be ignored). Executed copies go to `out_dir`.
"""
from __future__ import annotations

import time
from pathlib import Path


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
    A failing cell raises RuntimeError naming the notebook and the cell (a cell past the timeout, the notebook);
    its executed copy keeps the traceback.
    """
    import papermill
    from nbclient.exceptions import CellTimeoutError
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
            raise RuntimeError(f"{path.name}: cell {err.cell_index} (execution count {err.exec_count}, "
                               f"{first_line!r}) raised {err.ename}: {err.evalue}; see {out / path.name}") from None
        except CellTimeoutError:
            raise RuntimeError(f"{path.name}: a cell ran past the {timeout:g} s limit; see {out / path.name}") from None
        print(f"{path.name}: ok in {time.time() - start:.0f}s")
        done.append(out / path.name)
    return done
