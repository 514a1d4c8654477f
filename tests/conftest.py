"""Test configuration. Without CUDA the real Triton kernels run on CPU tensors in the interpreter:
TRITON_INTERPRET must be set before any kernel module is imported, which is why it is set here."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One config per kernel: autotuning each test shape would compile every config (tests of the
# other configs force them one by one).
os.environ.setdefault("PREFIX_ATTN_AUTOTUNE", "0")

DEVICE = "cuda" if HAS_CUDA else "cpu"


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
