"""Test configuration. Without CUDA the real Triton kernels run on CPU tensors in the interpreter:
TRITON_INTERPRET must be set before any kernel module is imported, which is why it is set here."""
import os
import re
from typing import Optional

import numpy
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One config per kernel: autotuning each test shape would compile every config (tests of the
# other configs force them one by one).
os.environ.setdefault("PREFIX_ATTN_AUTOTUNE", "0")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _release(version: str) -> tuple:
    """(major, minor) of a version string such as "3.6.0" or "2.4.0rc1"."""
    return tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", version).groups())


def interpreter_release_conflict(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why the interpreter cannot run the kernels with these releases, or None.

    Triton 3.6's interpreter reads a kernel's computed scalars (loop bounds) with int() on 1-element
    arrays, which NumPy 2.4 refuses (only 0-d arrays convert); Triton 3.7 squeezes them first. Every
    interpreter test would fail with an InterpreterError that does not say so.
    """
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run with NumPy {numpy_version} (it converts "
                "1-element arrays with int(), which NumPy 2.4 refuses): install 'numpy<2.4' or Triton >= 3.7")
    return None


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") == "1":
        import triton  # after TRITON_INTERPRET is set

        conflict = interpreter_release_conflict(triton.__version__, numpy.__version__)
        if conflict is not None:
            raise pytest.UsageError(conflict)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
