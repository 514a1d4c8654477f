"""A decoding step of the torch backend in C for small fp32 CPU calls (decode_cpu.c): one call per layer.

Through PyTorch's fused CPU attention a decoding layer call is two kernel calls (own keys, prefix slots), two
batch-stride-0 prefix views and four merge ops, each a dispatched op of a few microseconds: at the quick sweep's
tiny shapes (B 2, H 4, D 16, P 8) a layer call took 81-83 us on the 2-core CPU (torch 2.11, 2 threads), where SDPA
over PEFT's concatenated cache takes 13-15 us, which left the patched model's generate() at 0.98x PEFT's there.
The C step computes the same softmax over [visible prefix slots; own keys] in one call of a few microseconds plus
the arithmetic, and the layer call takes 23-26 us; it runs single threaded, so prefix_attn.torch_backend calls it
only below a measured size, ``DECODE_C_MAX_MACS``.

Built and loaded by prefix_attn.c_library (once per machine, cached); when no compiler is found or the build
fails, decoding goes through the fused kernel (the same result up to rounding), with one warning that says why.
"""
import ctypes
from typing import Optional

import torch

from prefix_attn.c_library import CFunction

_INT, _POINTER = ctypes.c_int64, ctypes.c_void_p
DECODE = CFunction(
    "decode_cpu.c", "prefix_attn_decode_f32",
    [_POINTER, _INT, _INT,  # q
     _POINTER, _INT, _INT, _INT, _POINTER, _INT, _INT, _INT,  # k, v
     _POINTER, _INT, _INT, _POINTER, _INT, _INT,  # the task's prefix keys and values
     _POINTER, _INT, _INT,  # key_ok
     *(_INT,) * 6, ctypes.c_float, _POINTER, _POINTER], ctypes.c_int,
    what="the C decoding step for small CPU calls",
    instead="decoding through PyTorch's fused CPU attention instead (the same result, more host time per call)",
    libraries=("-lm",))
_FLOAT32_BYTES = 4


def decode(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, prefix_k: Optional[torch.Tensor],
           prefix_v: Optional[torch.Tensor], task: int, n_slots: int, key_ok: Optional[torch.Tensor], scale: float,
           is_bank: bool, need_lse: bool) -> Optional[tuple]:
    """Attention of each row's single query over its task's first n_slots prefix slots and its visible own keys.

    Args:
        qt: (B, H, 1, D) float32 CPU; kt, vt: (B, Hkv, Lk, D); prefix_k, prefix_v: (P, Hkv, D), or a bank
            (T, P, Hkv, D) of which ``task`` is read, or None with n_slots 0; key_ok: (B, Lk) bool or None (every
            key visible); innermost (head_dim) strides 1, else None is returned.
    Returns:
        (out (B, 1, H, D) contiguous, lse (B, H, 1) natural log or None without need_lse), -inf lse and out 0
        for a row that sees no key; None when the C function is unavailable or a stride does not fit.
    """
    function = DECODE.get()
    if function is None:
        return None
    B, H, _, D = qt.shape
    q_stride, k_stride, v_stride = qt.stride(), kt.stride(), vt.stride()
    if q_stride[3] != 1 or k_stride[3] != 1 or v_stride[3] != 1:
        return None
    pk_pointer = pv_pointer = None
    pk_stride = pv_stride = (0, 0, 1)
    if n_slots:
        pk_stride, pv_stride = prefix_k.stride()[-3:], prefix_v.stride()[-3:]
        if pk_stride[2] != 1 or pv_stride[2] != 1:
            return None
        pk_pointer = prefix_k.data_ptr() + (task * prefix_k.stride(0) * _FLOAT32_BYTES if is_bank else 0)
        pv_pointer = prefix_v.data_ptr() + (task * prefix_v.stride(0) * _FLOAT32_BYTES if is_bank else 0)
    ok_pointer, ok_stride = (None, (0, 0)) if key_ok is None else (key_ok.data_ptr(), key_ok.stride())
    out = torch.empty((B, 1, H, D), dtype=torch.float32)
    lse = torch.empty((B, H, 1), dtype=torch.float32) if need_lse else None
    if function(qt.data_ptr(), q_stride[0], q_stride[1],
                kt.data_ptr(), k_stride[0], k_stride[1], k_stride[2], vt.data_ptr(), v_stride[0], v_stride[1],
                v_stride[2], pk_pointer, pk_stride[0], pk_stride[1], pv_pointer, pv_stride[0], pv_stride[1],
                ok_pointer, ok_stride[0], ok_stride[1], B, H, kt.shape[1], D, kt.shape[2], n_slots, scale,
                out.data_ptr(), None if lse is None else lse.data_ptr()):
        raise MemoryError("prefix_attn: out of memory in the C decoding step")
    return out, lse
