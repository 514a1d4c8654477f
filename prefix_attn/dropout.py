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
import torch

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


def _mulhilo32(const: int, x: torch.Tensor):
    # 32x32 -> 64-bit product in int64 arithmetic without overflow: split x in 16-bit halves.
    lo_part = const * (x & 0xFFFF)
    hi_part = const * (x >> 16)
    t = lo_part + ((hi_part & 0xFFFF) << 16)
    return (hi_part >> 16) + (t >> 32), t & _MASK32


def philox4x32(counter: torch.Tensor, seed: int):
    """Philox4x32-10 of Triton's randint4x(seed, counter) for int64 counters >= 0, in int64."""
    c0 = counter & _MASK32
    c1 = counter >> 32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def _join(a, b):
    return torch.stack([a, b], dim=-1)  # tl.join: stack along a new last axis


def keep_mask_rows(seed: int, offset: int, rows: torch.Tensor, n_prefix: int, n_keys: int,
                   dropout_p: float) -> torch.Tensor:
    """Keep-mask (len(rows), n_prefix + n_keys) bool of the flattened score rows ``rows``."""
    n_groups = groups_per_row(n_prefix, n_keys)
    counter = offset + rows.to(torch.int64)[:, None] * n_groups + torch.arange(n_groups, device=rows.device)
    r0, r1, r2, r3 = philox4x32(counter, seed)
    # The same nesting of joins as csrc_triton.common.dropout_keep_tile, so the same column order.
    w01 = _join(_join(r0 & 0xFFFF, r0 >> 16), _join(r1 & 0xFFFF, r1 >> 16))
    w23 = _join(_join(r2 & 0xFFFF, r2 >> 16), _join(r3 & 0xFFFF, r3 >> 16))
    bits = _join(w01, w23).reshape(rows.numel(), 8 * n_groups)
    keep = bits >= keep_threshold(dropout_p)
    prefix8 = padded_prefix(n_prefix)
    return torch.cat([keep[:, :n_prefix], keep[:, prefix8:prefix8 + n_keys]], dim=1)


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
    rows = torch.arange(batch * heads * seqlen_q, device=rng_state.device)
    mask = keep_mask_rows(seed, offset, rows, n_prefix, seqlen_k, dropout_p)
    return mask.reshape(batch, heads, seqlen_q, n_prefix + seqlen_k)
