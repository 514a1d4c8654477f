"""pytest-benchmark suite: the same ops as `python -m benchmarks`, one point each.

On GPU the timed function synchronises, so each round measures the op's GPU work; figures go to
extra_info and `--benchmark-json`. In CI (no GPU) they run once with --benchmark-disable as smoke
tests, on the providers a CPU can run; the others are skipped with the reason.
"""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def sync():
    def _sync():
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return _sync
