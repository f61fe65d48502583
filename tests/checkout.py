"""This checkout first on PYTHONPATH, so that notebook kernels and subprocesses import its hw6utils, also where it is
not pip-installed (the `kernels_import_this_checkout` fixture, and the env of subprocesses started by hand)."""
import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def pythonpath_with_checkout() -> str:
    return os.pathsep.join([str(CHECKOUT), os.environ.get("PYTHONPATH", "")])
