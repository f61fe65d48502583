"""This checkout first on PYTHONPATH, so that notebook kernels and subprocesses import its hw6utils, also where it is
not pip-installed (the `kernels_import_this_checkout` fixture, and the env of subprocesses started by hand). CHECKOUT is
the root of this checkout, for the tests that read its files."""
import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def pythonpath_with_checkout() -> str:
    # no empty entry when PYTHONPATH is unset: an empty entry puts the current folder on the path
    return os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
