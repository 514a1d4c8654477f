"""The C keep-mask's build (prefix_attn.c_library, which builds decode_cpu.c the same way): cached per machine,
rebuilt for a changed source, and, where it cannot be built, NumPy's draw (the same bits) after one warning that
says why."""
import subprocess
import warnings

import pytest
import torch

from prefix_attn import c_library, decode_cpu, dropout, keep_mask_cpu

ARGS = (11, 2**40 + 3, 6, 9, slice(0, 9), 5, 13)  # seed, offset, B * H, Lq, rows, P, Lk


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """keep_mask_cpu as in a new process, with an empty cache folder."""
    monkeypatch.setenv("PREFIX_ATTN_CACHE_DIR", str(tmp_path))
    keep_mask_cpu.KEEP_MASK.reset()
    yield tmp_path
    keep_mask_cpu.KEEP_MASK.reset()  # the next test loads the build in the usual cache again


def _draw():
    return keep_mask_cpu.keep_mask_grid(*ARGS, dropout.keep_threshold(0.2))


def _numpy():
    return dropout.keep_mask_grid_numpy(*ARGS, 0.2)


def test_builds_once_then_loads_the_cached_library(fresh, monkeypatch):
    if c_library.find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert torch.equal(_draw(), _numpy())
    built = list(fresh.glob("keep_mask_cpu-*.so"))
    assert len(built) == 1 and not list(fresh.glob("*.partial"))

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again although the cache holds the build")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    keep_mask_cpu.KEEP_MASK.reset()
    assert torch.equal(_draw(), _numpy())


def test_the_library_name_follows_the_source_and_the_compiler():
    names = {c_library.library_path("keep_mask_cpu", cc, src, flags)
             for cc in ("/usr/bin/cc", "/usr/bin/clang") for src in (b"a", b"b") for flags in (("-O3",), ("-O2",))}
    assert len(names) == 8


@pytest.mark.parametrize("compiler", ["missing", "fails"])
def test_without_a_build_the_numpy_draw_gives_the_same_bits(fresh, monkeypatch, compiler):
    if compiler == "missing":
        monkeypatch.setattr(c_library, "find_compiler", lambda: None)
        reason = "no C compiler found"
    else:
        monkeypatch.setattr(c_library, "find_compiler", lambda: "/bin/false")
        reason = "/bin/false exited with 1"
    with pytest.warns(RuntimeWarning, match="drawing it with NumPy instead") as caught:
        assert _draw() is None
    assert reason in str(caught[0].message) and reason in keep_mask_cpu.unavailable_reason()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not one per call
        mask = dropout.keep_mask_grid(*ARGS, 0.2, torch.device("cpu"))
    assert torch.equal(mask, _numpy())
    assert not list(fresh.glob("*.so*"))  # no half-written library left behind


def test_the_op_gives_the_same_output_and_gradients_either_way(fresh, monkeypatch):
    """The torch backend's dropout path, end to end: C and NumPy draws are interchangeable."""
    if c_library.find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    from prefix_attn import prefix_attn_func

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 11, 3, 16, generator=gen, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(6, 3, 16, generator=gen, requires_grad=True) for _ in range(2))
    results = []
    for use_c in (True, False):
        if not use_c:
            monkeypatch.setattr(keep_mask_cpu, "keep_mask_grid", lambda *args: None)
        torch.manual_seed(3)
        out = prefix_attn_func(q, k, v, pk, pv, dropout_p=0.3, backend="torch")
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, pk, pv))
        results.append((out, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("function", [keep_mask_cpu.KEEP_MASK, decode_cpu.DECODE], ids=lambda f: f.source.name)
def test_the_c_source_ships_in_the_package(function):
    """A wheel install has the sources to build (without them every CPU dropout call would take the slower NumPy
    draw, and every small CPU decoding call the fused kernel's slower route): pyproject.toml's package data names
    them, and they lie in the package."""
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    shipped = config["tool"]["setuptools"]["package-data"]["prefix_attn"]
    assert function.source.name in shipped and function.source.parent.name == "prefix_attn"
    assert function.source.is_file()
