"""Attention dropout: the RNG state an op call draws, and the keep-mask it implies.

A call with dropout_p > 0 draws ``rng_state = [seed, offset]`` (int64, on the tensors' device)
from torch's generator. Element (b, h, i, c) of the scores, where column c < P is prefix slot c
and column P + j is key j, is kept when Philox4x32-10 (Triton's ``tl.randint4x``, key = seed)
at counter ``offset + ((b * H + h) * Lq + i) * G + c' // 4`` gives, in output ``c' % 4``, a
number whose top 31 bits are >= floor(dropout_p * 2**31). Here c' = c for prefix slots and
c' = P4 + j for keys, P4 = P rounded up to 4, G = P4 / 4 + ceil(Lk / 4). The Triton kernels and
the torch backend both draw this mask, bit for bit, so the backward regenerates the forward's
mask and the two backends agree under dropout.
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
    """The 31-bit integer threshold the kernels compare against."""
    return min(int(dropout_p * 2**31), 2**31 - 1)


def groups_per_row(n_prefix: int, n_keys: int) -> int:
    """Philox counters per score row (each gives four columns)."""
    return (n_prefix + 3) // 4 + (n_keys + 3) // 4


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


def keep_mask_rows(seed: int, offset: int, rows: torch.Tensor, n_prefix: int, n_keys: int,
                   dropout_p: float) -> torch.Tensor:
    """Keep-mask (len(rows), n_prefix + n_keys) bool of the flattened score rows ``rows``."""
    n_groups = groups_per_row(n_prefix, n_keys)
    counter = offset + rows.to(torch.int64)[:, None] * n_groups + torch.arange(n_groups, device=rows.device)
    bits = torch.stack(philox4x32(counter, seed), dim=-1).reshape(rows.numel(), 4 * n_groups)
    keep = (bits >> 1) >= keep_threshold(dropout_p)
    prefix4 = (n_prefix + 3) // 4 * 4
    return torch.cat([keep[:, :n_prefix], keep[:, prefix4:prefix4 + n_keys]], dim=1)


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
