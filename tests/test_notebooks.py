import ast
import time

import nbformat
import papermill
import pytest

from checkout import CHECKOUT
from hw6utils.notebooks import load_parameters, notebook_paths, run_notebooks

NOTEBOOK_DIR = CHECKOUT / "notebooks"
NOTEBOOKS = notebook_paths(cwd=NOTEBOOK_DIR)


def test_the_seven_notebooks_are_there():
    assert [path.name[:2] for path in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {i} has stored outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_one_parameters_cell_of_plain_literals(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters'"
    names = []
    for statement in ast.parse(tagged[0].source).body:  # papermill can only override NAME = literal
        assert isinstance(statement, ast.Assign), ast.unparse(statement)
        ast.literal_eval(statement.value)
        names.append(statement.targets[0].id)
    assert sorted(papermill.inspect_notebook(str(path))) == sorted(names)  # e.g. a '=' in a comment hides one


def test_parameters_come_from_yaml(tmp_path):
    path = tmp_path / "smoke.yaml"
    path.write_text("PRESET: smoke\nSEED: 3\n")
    assert load_parameters(path) == {"PRESET": "smoke", "SEED": 3}


def test_an_unknown_parameter_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="PRESTE"):
        run_notebooks(["01_data"], {"PRESTE": "smoke"}, out_dir=tmp_path, cwd=NOTEBOOK_DIR)


@pytest.mark.slow
def test_all_notebooks_run_headless_on_the_smoke_preset(shapes_dir, vae_dir, tmp_path, monkeypatch,
                                                        kernels_import_this_checkout):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the smoke preset's tensors are tiny: a second thread only waits
    parameters = {"PRESET": "smoke", "VAE": str(vae_dir), "DATA_DIR": str(shapes_dir),
                  "OUTPUT_DIR": str(tmp_path / "outputs"), "STAGE": "last", "MAX_STEPS": 4}  # 05-07 load what 04 trained
    start = time.time()
    done = run_notebooks(parameters=parameters, out_dir=tmp_path / "executed", cwd=NOTEBOOK_DIR, timeout=600)
    print(f"seven notebooks in {time.time() - start:.0f}s")
    assert [path.name for path in done] == [path.name for path in NOTEBOOKS]
    assert (tmp_path / "outputs" / "ckpt_last" / "unet_sch_14").is_dir()  # smoke's 4 steps, then 10 resumed


@pytest.mark.slow
def test_nbval_runs_the_notebooks_with_their_defaults(kernels_import_this_checkout):
    """nbval (lax): every cell runs in a fresh kernel with the default parameters (tiny, the shipped reference
    model), the asserts in the cells included. 04 trains for minutes with its defaults: the papermill smoke run above
    covers it. 07 is run with its defaults by tests/test_reference.py, which checks the scores it saves."""
    import subprocess
    import sys
    names = [str(path) for path in NOTEBOOKS if not path.name.startswith(("04", "07"))]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                             "--nbval-cell-timeout", "600", *names], cwd=NOTEBOOK_DIR.parent,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
