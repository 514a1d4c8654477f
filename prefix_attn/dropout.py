"""Attention dropout: the RNG state an op call draws, and the keep-mask it implies.

A call with dropout_p > 0 draws ``rng_state = [seed, offset]`` (int64, on the tensors' device)
from torch's generator. Decisions are 16-bit: score (b, h, i, c) (column c < P is prefix slot c,
column P + j is key j) is kept when its 16-bit draw is >= t = round(dropout_p * 65536), so the keep
probability is exactly 1 - t / 65536 and kept values are scaled by 1 / (1 - t / 65536) (unbiased;
the drop probability differs from dropout_p by at most 2**-17). Draws come eight per
Philox4x32-10 call (Triton's ``tl.randint4x``, key = seed) at counter
``offset + ((b * H + h) * Lq + i) * G + c' // 8``, where c' = c for prefix slots and c' = P8 + j
for keys, P8 = P rounded up to 8 and G = P8 / 8 + ceil(Lk / 8). The Triton kernels and the torch
backend both draw this mask, bit for bit, so the backward regenerates the forward's mask and the
two backends agree under dropout.
"""
import sys
from typing import Optional

import numpy as np
import torch

from prefix_attn import keep_mask_cpu

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57


def draw_rng_state(device: torch.device) -> torch.Tensor:
    """[seed, offset] int64 on ``device``, from torch's generator for that device.

    Seeded by ``torch.manual_seed``; graph-capture safe on CUDA (no host synchronisation).
    """
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def keep_threshold(dropout_p: float) -> int:
    """The 16-bit threshold the kernels compare draws against."""
    return min(round(dropout_p * 65536), 65535)


def keep_scale(dropout_p: float) -> float:
    """1 / keep probability: the factor that makes dropout unbiased for the quantised threshold."""
    return 1.0 / (1.0 - keep_threshold(dropout_p) / 65536)


def padded_prefix(n_prefix: int) -> int:
    """P rounded up to 8: where the keys' dropout columns start."""
    return (n_prefix + 7) // 8 * 8


def groups_per_row(n_prefix: int, n_keys: int) -> int:
    """Philox counters per score row (each gives eight columns)."""
    return padded_prefix(n_prefix) // 8 + (n_keys + 7) // 8


def philox4x32(counter: torch.Tensor, seed: int):
    """Philox4x32-10 of Triton's randint4x(seed, counter) for int64 counters >= 0, in int64.

    A round's 32 x 32 -> 64-bit products are int64 products that wrap: their low 64 bits are the unsigned
    product's, so bits 32..63 (an arithmetic shift, then a 32-bit mask) and bits 0..31 are exact. Every
    op of the rounds writes into one of six buffers allocated up front: 12 ops per round and no
    allocation (a fresh multi-MiB tensor per op cost more in page faults than the op itself).
    """
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    # Round 1 with c2 = c3 = 0: the product of c2 is 0.
    c2 = torch.bitwise_and(counter, _MASK32).mul_(_PHILOX_ROUND_A)  # the product of c0
    c3 = torch.bitwise_and(c2, _MASK32)
    c2.bitwise_right_shift_(32).bitwise_xor_(k1).bitwise_and_(_MASK32)
    c0 = torch.bitwise_right_shift(counter, 32).bitwise_xor_(k0)
    c1 = torch.zeros_like(counter)
    prod_a, prod_b = torch.empty_like(counter), torch.empty_like(counter)
    for _ in range(9):
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
        torch.mul(c2, _PHILOX_ROUND_B, out=prod_b)
        torch.mul(c0, _PHILOX_ROUND_A, out=prod_a)
        torch.bitwise_and(prod_b, _MASK32, out=c0)  # c0 is read: it becomes the new c1
        prod_b.bitwise_right_shift_(32).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_MASK32)  # the new c0
        torch.bitwise_and(prod_a, _MASK32, out=c2)  # c2 is read: it becomes the new c3
        prod_a.bitwise_right_shift_(32).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_MASK32)  # the new c2
        c0, c1, c2, c3, prod_b, prod_a = prod_b, c0, prod_a, c2, c1, c3
    return c0, c1, c2, c3


# Word order of NumPy views that split a wider unsigned integer into halves: (low, high) in memory.
_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)
_ROUND_FACTORS = np.array([[_PHILOX_ROUND_A], [_PHILOX_ROUND_B]], dtype=np.uint64)


def _philox4x32_numpy(counter: np.ndarray, seed: int) -> np.ndarray:
    """philox4x32 for uint64 NumPy counters: the words r0, r2, r1, r3 as one (4, n) uint32 array.

    The CPU path, where the cost is the count of NumPy calls (about a microsecond each at training shapes),
    not the arithmetic: three per round. The state is uint32 pairs (c0, c2) and (c1, c3); a round's two
    32 x 32 -> 64-bit products are one uint64 (2, n) product, whose high and low words are read through a
    uint32 view of it (no shift, no mask), reversed to swap the pairs. Products alternate between two
    buffers, since a round reads the previous round's low words after writing its own product.
    """
    n = counter.size
    words = counter.reshape(-1).view(np.uint32).reshape(n, 2)
    ca = np.zeros((2, n), dtype=np.uint32)  # (c0, c2): the counter's low word, 0
    cb = np.zeros((2, n), dtype=np.uint32)  # (c1, c3): its high word, 0
    ca[0], cb[0] = words[:, _LOW], words[:, _HIGH]
    # Round r's key (k0 + r * A, k1 + r * B) mod 2**32, as the (2, 1) column that XORs into (c0, c2): Python
    # ints, one NumPy call.
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    keys = np.array([((k0 + r * _PHILOX_KEY_A) & _MASK32, (k1 + r * _PHILOX_KEY_B) & _MASK32) for r in range(10)],
                    dtype=np.uint32)[:, :, None]
    products = [np.empty((2, n), dtype=np.uint64) for _ in range(2)]
    halves = [x.view(np.uint32).reshape(2, n, 2)[::-1] for x in products]  # (c2 * B, c0 * A) as (lo, hi)
    for r in range(10):
        np.multiply(ca, _ROUND_FACTORS, out=products[r % 2])  # (c0 * A, c2 * B)
        np.bitwise_xor(halves[r % 2][:, :, _HIGH], cb, out=ca)  # (hi(c2 * B) ^ c1, hi(c0 * A) ^ c3)
        ca ^= keys[r]  # the new (c0, c2)
        cb = halves[r % 2][:, :, _LOW]  # the new (c1, c3) = (lo(c2 * B), lo(c0 * A))
    return np.concatenate([ca, cb])  # r0, r2, r1, r3


# Philox counters per block of keep_mask_rows: the rounds' buffers (3 MiB) stay in cache; one pass over a
# 2.5x larger block or the whole call's counters at once measured 1.5-2.5x slower (torch path, 1 thread).
BLOCK_COUNTERS = 1 << 16


def keep_mask_rows(seed: int, offset: int, rows: torch.Tensor, n_prefix: int, n_keys: int,
                   dropout_p: float, use_numpy: Optional[bool] = None) -> torch.Tensor:
    """Keep-mask (len(rows), n_prefix + n_keys) bool of the flattened score rows ``rows``.

    use_numpy: draw with NumPy (the default for CPU tensors) or with torch ops (the default elsewhere);
    the same bits either way.
    """
    if use_numpy is None:
        use_numpy = rows.device.type == "cpu"
    n_groups = groups_per_row(n_prefix, n_keys)
    threshold = keep_threshold(dropout_p)
    n_rows = rows.numel()
    # (rows, groups, 2, 4): column order of csrc_triton.common.dropout_keep_tile's nested joins
    # join(join(join(r0 lo, r0 hi), join(r1 lo, r1 hi)), join(join(r2 lo, ...), ...)) flattened: per
    # counter the low 16 bits of r0, r2, r1, r3, then their high 16 bits. A word's high half is >= t
    # exactly when the word is >= t * 2**16.
    step = max(1, BLOCK_COUNTERS // n_groups)
    if use_numpy:
        keep = _keep_numpy(seed, offset, n_rows, n_groups, threshold, rows.cpu().numpy().astype(np.uint64)).to(
            rows.device)
    else:
        keep = torch.empty((n_rows, n_groups, 2, 4), dtype=torch.bool, device=rows.device)
        columns = torch.arange(offset, offset + n_groups, device=rows.device)
        rows = rows.to(torch.int64)
        for start in range(0, n_rows, step):
            block = slice(start, start + step)
            words = philox4x32(rows[block, None] * n_groups + columns, seed)
            for column, word in zip((0, 2, 1, 3), words):
                torch.ge(word, threshold << 16, out=keep[block, :, 1, column])
                torch.ge(word.bitwise_and_(0xFFFF), threshold, out=keep[block, :, 0, column])
    return _keep_columns(keep.view(n_rows, 8 * n_groups), n_prefix, n_keys)


def _keep_columns(keep: torch.Tensor, n_prefix: int, n_keys: int) -> torch.Tensor:
    """(rows, 8 * groups) drawn columns -> (rows, n_prefix + n_keys): the prefix's padding columns left out."""
    prefix8 = padded_prefix(n_prefix)
    if prefix8 == n_prefix:
        return keep[:, :n_prefix + n_keys]
    return torch.cat([keep[:, :n_prefix], keep[:, prefix8:prefix8 + n_keys]], dim=1)


def _keep_numpy(seed: int, offset: int, n_rows: int, n_groups: int, threshold: int,
                rows_np: Optional[np.ndarray] = None) -> torch.Tensor:
    """The NumPy draw of keep_mask_rows: (n_rows, groups, 2, 4) bool (a CPU tensor) for the n_rows uint64 row
    numbers rows_np, or, with rows_np None, for rows 0 .. n_rows - 1, whose counters are consecutive (one
    NumPy call per block: at small shapes the count of NumPy calls is the cost)."""
    if rows_np is not None:
        columns = np.arange(n_groups, dtype=np.uint64) + np.uint64(offset)
    step = max(1, BLOCK_COUNTERS // n_groups)
    keep_np = np.empty((n_rows, n_groups, 2, 4), dtype=np.bool_)
    for start in range(0, n_rows, step):
        block = slice(start, start + step)
        if rows_np is None:
            stop = min(start + step, n_rows)
            counter = np.arange(offset + start * n_groups, offset + stop * n_groups, dtype=np.uint64)
        else:
            counter = rows_np[block, None] * np.uint64(n_groups) + columns  # (rows, groups)
        # Each word's (low, high) 16-bit halves, as (half, word, rows, groups): one comparison for the block.
        halves = _philox4x32_numpy(counter, seed).view(np.uint16).reshape(4, -1, n_groups, 2)
        halves = halves[..., [_LOW, _HIGH]] if _LOW else halves
        np.greater_equal(halves.transpose(3, 0, 1, 2), np.uint16(threshold), out=keep_np[block].transpose(2, 3, 0, 1))
    return torch.from_numpy(keep_np)


def keep_mask_grid(seed: int, offset: int, n_heads_total: int, seqlen_q: int, rows: slice, n_prefix: int,
                   n_keys: int, dropout_p: float, device: torch.device) -> torch.Tensor:
    """Keep-mask (n_heads_total, len(rows), n_prefix + n_keys) of query rows ``rows`` of every (batch, head):
    keep_mask_rows of the flattened rows (b * H + h) * seqlen_q + i, i in rows (n_heads_total = B * H).

    On CPU the mask is drawn in C (prefix_attn/keep_mask_cpu.c), or, where that cannot be built, with NumPy
    (keep_mask_grid_numpy): the same bits.
    """
    c = rows.stop - rows.start
    if torch.device(device).type != "cpu":
        i = torch.arange(rows.start, rows.stop, device=device)
        flat = (torch.arange(n_heads_total, device=device)[:, None] * seqlen_q + i[None, :]).flatten()
        return keep_mask_rows(seed, offset, flat, n_prefix, n_keys, dropout_p).view(n_heads_total, c, -1)
    keep = keep_mask_cpu.keep_mask_grid(seed, offset, n_heads_total, seqlen_q, rows, n_prefix, n_keys,
                                        keep_threshold(dropout_p))
    if keep is not None:
        return keep
    return keep_mask_grid_numpy(seed, offset, n_heads_total, seqlen_q, rows, n_prefix, n_keys, dropout_p)


def keep_mask_grid_numpy(seed: int, offset: int, n_heads_total: int, seqlen_q: int, rows: slice, n_prefix: int,
                         n_keys: int, dropout_p: float) -> torch.Tensor:
    """keep_mask_grid of CPU tensors drawn with NumPy: where the C draw cannot be built."""
    c = rows.stop - rows.start
    n_groups = groups_per_row(n_prefix, n_keys)
    if c == seqlen_q:  # every row: flattened rows 0 .. n_heads_total * seqlen_q - 1
        keep = _keep_numpy(seed, offset, n_heads_total * seqlen_q, n_groups, keep_threshold(dropout_p))
    else:
        rows_np = (np.arange(n_heads_total, dtype=np.uint64)[:, None] * np.uint64(seqlen_q)
                   + np.arange(rows.start, rows.stop, dtype=np.uint64)).reshape(-1)
        keep = _keep_numpy(seed, offset, rows_np.size, n_groups, keep_threshold(dropout_p), rows_np)
    return _keep_columns(keep.view(-1, 8 * n_groups), n_prefix, n_keys).view(n_heads_total, c, -1)


def dropout_keep_mask(rng_state: torch.Tensor, batch: int, heads: int, seqlen_q: int, n_prefix: int,
                      seqlen_k: int, dropout_p: float) -> torch.Tensor:
    """The keep-mask (batch, heads, seqlen_q, n_prefix + seqlen_k) bool of an op call.

    Args:
        rng_state: the (2,) int64 [seed, offset] the call drew (``draw_rng_state`` after the same
            ``torch.manual_seed`` gives it again).
        n_prefix: P, the prefix slots of the call's prefix (the bank's P; 0 without a prefix).
    Column c < n_prefix is prefix slot c, column n_prefix + j is key j. Debugging and tests only:
    it materialises the whole mask.
    """
    seed, offset = (int(x) for x in rng_state.tolist())
    mask = keep_mask_grid(seed, offset, batch * heads, seqlen_q, slice(0, seqlen_q), n_prefix, seqlen_k, dropout_p,
                          rng_state.device)
    return mask.reshape(batch, heads, seqlen_q, n_prefix + seqlen_k)
