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


def check_records(benchmark, tensors, promised):
    """What a smoke test checks after ``benchmark(...)``: every tensor it produced is finite, the
    extra_info holds each promised record (a finite positive number where it is a figure), and,
    when timing is on (without --benchmark-disable), the timing stats are finite and positive."""
    import math

    for i, t in enumerate(tensors):
        assert t is not None, f"output {i} is missing"
        assert torch.isfinite(t).all(), f"output {i} holds NaN or inf"
    missing = set(promised) - set(benchmark.extra_info)
    assert not missing, f"extra_info lacks {sorted(missing)}"
    for name in promised:
        value = benchmark.extra_info[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value) and value > 0, f"extra_info {name}={value}"
    if benchmark.enabled:
        stats = benchmark.stats.stats
        for name in ("min", "median", "mean"):
            assert math.isfinite(getattr(stats, name)) and getattr(stats, name) > 0, f"{name} = {getattr(stats, name)}"
