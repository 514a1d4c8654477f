"""The C draw of the dropout keep-mask for CPU tensors (keep_mask_cpu.c): built once per machine, then loaded.

The torch backend draws an op call's keep-mask on the host, once per layer call in training. In NumPy that is
about thirty array calls (three per Philox round), each a few microseconds of dispatch, and inside a training
step, with the caches full of the model's own work, the draw cost twice what it costs in a loop: at the
quick sweep's GPT-2 shape it was the largest part of the op's host time. The C draw is one call of a few
microseconds plus the arithmetic. It gives the same bits as the NumPy draw and the Triton kernels (tested).

Built and loaded by prefix_attn.c_library (once per machine, cached); when no compiler is found or the build
fails, the draw is NumPy's (the same bits, slower), with one warning that says why.
"""
import ctypes
from typing import Optional

import torch

from prefix_attn.c_library import CFunction

KEEP_MASK = CFunction(
    "keep_mask_cpu.c", "prefix_attn_keep_mask_grid",
    [ctypes.c_uint64, ctypes.c_uint64, *(ctypes.c_int64,) * 6, ctypes.c_uint32, ctypes.c_void_p], ctypes.c_int,
    what="the C dropout keep-mask for CPU tensors",
    instead="drawing it with NumPy instead (the same bits, more host time per call)")
SOURCE = KEEP_MASK.source


def unavailable_reason() -> Optional[str]:
    """Why the C draw could not be built or loaded (None when it was, or has not been tried)."""
    return KEEP_MASK.unavailable


def keep_mask_grid(seed: int, offset: int, n_heads_total: int, seqlen_q: int, rows: slice, n_prefix: int,
                   n_keys: int, threshold: int) -> Optional[torch.Tensor]:
    """dropout.keep_mask_grid for CPU tensors with the 16-bit ``threshold``, drawn in C; None when the C draw is
    unavailable (the caller draws with NumPy)."""
    function = KEEP_MASK.get()
    if function is None:
        return None
    keep = torch.empty((n_heads_total, rows.stop - rows.start, n_prefix + n_keys), dtype=torch.bool)
    if keep.numel() and function(seed, offset, n_heads_total, seqlen_q, rows.start, rows.stop, n_prefix, n_keys,
                                 threshold, keep.data_ptr()):
        raise MemoryError("prefix_attn: out of memory drawing the dropout keep-mask")
    return keep
