"""The keep-mask's implementations (C and NumPy for CPU tensors, torch ops elsewhere) draw the Triton
kernels' bits, across Philox blocks, seeds above 2**32 and offsets near 2**62."""
import pytest
import torch

from prefix_attn import dropout, keep_mask_cpu
from prefix_attn.dropout import dropout_keep_mask, keep_mask_grid, keep_mask_grid_numpy, keep_mask_rows
from prefix_attn.triton_launch import dropout_keep_mask_triton

SHAPES = [(2, 3, 5, 10, 13), (1, 1, 7, 0, 9), (2, 2, 4, 33, 1), (1, 2, 3, 16, 64), (3, 2, 9, 5, 40)]


def _rows_mask(use_numpy, seed, offset, shape, p):
    B, H, Lq, P, Lk = shape
    rows = torch.arange(B * H * Lq)
    return keep_mask_rows(seed, offset, rows, P, Lk, p, use_numpy=use_numpy).reshape(B, H, Lq, P + Lk)


@pytest.mark.parametrize("shape", SHAPES)
def test_numpy_and_torch_paths_equal_the_kernel_mask(shape):
    B, H, Lq, P, Lk = shape
    for seed, offset in ((5, 0), (2**33 + 17, 12345), (2**62 - 3, 2**62 - 10**6)):
        rng = torch.tensor([seed, offset], dtype=torch.int64)
        kernel = dropout_keep_mask_triton(rng, B, H, Lq, P, Lk, 0.3)
        for use_numpy in (True, False):
            assert torch.equal(_rows_mask(use_numpy, seed, offset, shape, 0.3), kernel), (seed, use_numpy)
    assert torch.equal(dropout_keep_mask(rng, B, H, Lq, P, Lk, 0.3), kernel)  # the default path


@pytest.mark.parametrize("block", [1, 3, 8, 50])
def test_blocks_do_not_change_the_bits(monkeypatch, block):
    """keep_mask_rows draws in blocks of BLOCK_COUNTERS counters; a block boundary anywhere (one row per
    block, a partial last block) gives the same mask."""
    shape = (2, 2, 6, 11, 30)
    whole = {u: _rows_mask(u, 77, 991, shape, 0.5) for u in (True, False)}
    monkeypatch.setattr(dropout, "BLOCK_COUNTERS", block)
    for use_numpy in (True, False):
        assert torch.equal(_rows_mask(use_numpy, 77, 991, shape, 0.5), whole[use_numpy])
    assert torch.equal(whole[True], whole[False])


@pytest.mark.parametrize("p", [0.0, 1e-6, 0.1, 0.5, 0.999])
def test_thresholds(p):
    """The high-half comparison (word >= t * 2**16) and the low-half one agree with the kernels at
    every threshold, including t = 0 (keep all) and the largest."""
    B, H, Lq, P, Lk = 1, 2, 5, 8, 24
    rng = torch.tensor([123456789, 42], dtype=torch.int64)
    kernel = dropout_keep_mask_triton(rng, B, H, Lq, P, Lk, p)
    for use_numpy in (True, False):
        assert torch.equal(_rows_mask(use_numpy, 123456789, 42, (B, H, Lq, P, Lk), p), kernel)


def _c_grid(seed, offset, n_heads_total, seqlen_q, rows, n_prefix, n_keys, dropout_p):
    keep = keep_mask_cpu.keep_mask_grid(seed, offset, n_heads_total, seqlen_q, rows, n_prefix, n_keys,
                                        dropout.keep_threshold(dropout_p))
    if keep is None:
        pytest.skip(f"the C keep-mask could not be built here: {keep_mask_cpu.unavailable_reason()}")
    return keep


GRID_DRAWS = {"default": lambda *a: keep_mask_grid(*a, torch.device("cpu")), "c": _c_grid,
              "numpy": keep_mask_grid_numpy}


@pytest.mark.parametrize("draw", list(GRID_DRAWS))
@pytest.mark.parametrize("block", [None, 1, 17])  # rows per NumPy block: all, 1, 4 (42 rows: a partial last block)
@pytest.mark.parametrize("rows", [slice(0, 7), slice(2, 5)])
def test_grid_of_every_row_or_a_chunk_equals_the_kernel_mask(monkeypatch, rows, block, draw):
    """keep_mask_grid, the torch backend's draw (in C, or with NumPy where C cannot be built): every query row
    (consecutive counters) or a chunk of rows gives the kernels' bits, with offsets near 2**62 and, in NumPy,
    block boundaries anywhere (one row per block, a partial last block)."""
    if block is not None:
        monkeypatch.setattr(dropout, "BLOCK_COUNTERS", block)
    B, H, Lq, P, Lk = 2, 3, 7, 5, 19
    for seed, offset in ((5, 0), (2**62 - 3, 2**62 - 10**6)):
        kernel = dropout_keep_mask_triton(torch.tensor([seed, offset]), B, H, Lq, P, Lk, 0.3)
        grid = GRID_DRAWS[draw](seed, offset, B * H, Lq, rows, P, Lk, 0.3)
        assert torch.equal(grid, kernel.reshape(B * H, Lq, P + Lk)[:, rows]), (seed, rows)


@pytest.mark.parametrize("shape", SHAPES + [(2, 4, 70, 8, 160), (1, 1, 1, 0, 1)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.999])
def test_c_grid_equals_the_numpy_grid(shape, p):
    """More shapes than the interpreter can afford: the C draw against the NumPy one (itself checked against
    the kernel above), including more counters per (batch, head) than one C pass (64) and P = 0."""
    B, H, Lq, P, Lk = shape
    for seed, offset in ((7, 3), (2**61 + 5, 2**62 - 999)):
        for rows in (slice(0, Lq), slice(Lq // 3, Lq - Lq // 4)):
            c = _c_grid(seed, offset, B * H, Lq, rows, P, Lk, p)
            assert torch.equal(c, keep_mask_grid_numpy(seed, offset, B * H, Lq, rows, P, Lk, p)), (seed, rows)
