"""Input checks shared by the public op, the launchers and the reference.

Every error names the argument at fault. ``check_attention_inputs`` reads only metadata (shapes,
dtypes, devices), so it also runs while torch.compile traces; ``check_prefix_values`` reads the
integer tensors' values and runs where the op really executes.
"""
import math
import os
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634
FLOAT32_MAX = 3.4028234663852886e38
# The kernels scale scores by softmax_scale * log2(e) in float32 (the torch backend by softmax_scale):
# past this bound that factor is inf and every output NaN whatever the inputs. Below it, scores
# |softmax_scale * q.k| still overflow for large enough q.k; that depends on the data and is not checked.
MAX_SOFTMAX_SCALE = FLOAT32_MAX / LOG2E


@dataclass(frozen=True)
class AttnDims:
    """Sizes of one call: q (B, Lq, H, D), k/v (B, Lk, Hkv, D), prefix (T, P, Hkv, D); H % Hkv == 0
    and query head h reads KV head h // (H // Hkv) (grouped heads, as FlashAttention)."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    head_dim: int
    num_tasks: int  # 0 without a prefix, 1 for a shared (P, Hkv, D) prefix, T for a bank
    prefix_len: int  # P (0 without a prefix)
    is_bank: bool
    kv_heads: int  # Hkv

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without grouping)."""
        return self.heads // self.kv_heads

    @property
    def has_prefix(self) -> bool:
        return self.prefix_len > 0


def _dtype_names(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_float(name, x, allowed):
    _check_tensor(name, x)
    if x.dtype not in allowed:
        raise TypeError(f"{name} has dtype {x.dtype}; supported dtypes are {_dtype_names(allowed)}")


def _check_integer(name, x):
    _check_tensor(name, x)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")


def check_attention_inputs(
    q, k, v, prefix_k=None, prefix_v=None, prefix_idx=None, prefix_lens=None, attention_mask=None,
    dropout_p=0.0, softmax_scale=None, allowed_dtypes=SUPPORTED_DTYPES,
) -> AttnDims:
    """Validate one call's arguments against the contract; return its sizes.

    Raises TypeError for a wrong type or dtype and ValueError for a wrong shape, device or value.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(name, x, allowed_dtypes)
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, head_dim), got shape {tuple(x.shape)}")
    B, Lq, H, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    for name, x in (("k", k),):
        if x.shape[0] != B:
            raise ValueError(f"{name} has batch {x.shape[0]} but q has batch {B}")
        if x.shape[2] == 0 or H % x.shape[2] != 0:
            raise ValueError(f"{name} has {x.shape[2]} heads but q has {H}: the query heads must be a multiple "
                             f"of the key/value heads (grouped heads, H % Hkv == 0)")
        if x.shape[3] != D:
            raise ValueError(f"{name} has head_dim {x.shape[3]} but q has {D}")
    if Lq > Lk:
        raise ValueError(f"q has seqlen {Lq} > k seqlen {Lk}: queries must be the last Lq of the Lk positions")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {D} of q is not supported: it must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}: mixed dtypes are not supported")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")

    num_tasks, prefix_len, is_bank = 0, 0, False
    if (prefix_k is None) != (prefix_v is None):
        given = "prefix_k" if prefix_v is None else "prefix_v"
        missing = "prefix_v" if prefix_v is None else "prefix_k"
        raise ValueError(f"{given} was given without {missing}: pass both or neither")
    if prefix_k is not None:
        for name, x in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            _check_float(name, x, allowed_dtypes)
            if x.dim() not in (3, 4):
                raise ValueError(f"{name} must be (P, heads, head_dim) or a bank (T, P, heads, head_dim), "
                                 f"got shape {tuple(x.shape)}")
            if x.dtype != q.dtype:
                raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}: mixed dtypes are not supported")
            if x.device != q.device:
                raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(f"prefix_k and prefix_v must have the same shape, got {tuple(prefix_k.shape)} "
                             f"and {tuple(prefix_v.shape)}")
        if prefix_k.shape[-2] != Hkv:
            raise ValueError(f"prefix_k has {prefix_k.shape[-2]} heads but k has {Hkv}: the prefix has the "
                             f"key/value heads")
        if prefix_k.shape[-1] != D:
            raise ValueError(f"prefix_k has head_dim {prefix_k.shape[-1]} but q has {D}")
        is_bank = prefix_k.dim() == 4
        num_tasks = prefix_k.shape[0] if is_bank else 1
        prefix_len = prefix_k.shape[-3]
        if is_bank and prefix_idx is None:
            raise ValueError("prefix_k is a bank (T, P, heads, head_dim): prefix_idx (batch,) must name each "
                             "sequence's task")
        if is_bank and num_tasks == 0:
            raise ValueError("prefix_k is a bank with 0 tasks")
    if prefix_idx is not None:
        if prefix_k is None or not is_bank:
            raise ValueError("prefix_idx needs a prefix bank: prefix_k of shape (T, P, heads, head_dim)")
        _check_integer("prefix_idx", prefix_idx)
        if prefix_idx.shape != (B,):
            raise ValueError(f"prefix_idx must have shape (batch,) = ({B},), got {tuple(prefix_idx.shape)}")
        if prefix_idx.device != q.device:
            raise ValueError(f"prefix_idx is on {prefix_idx.device} but q is on {q.device}")
    if prefix_lens is not None:
        if prefix_k is None:
            raise ValueError("prefix_lens was given without prefix_k/prefix_v")
        _check_integer("prefix_lens", prefix_lens)
        if prefix_lens.shape != (num_tasks,):
            raise ValueError(f"prefix_lens must have shape (T,) = ({num_tasks},), got {tuple(prefix_lens.shape)}")
        if prefix_lens.device != q.device:
            raise ValueError(f"prefix_lens is on {prefix_lens.device} but q is on {q.device}")
    if attention_mask is not None:
        _check_tensor("attention_mask", attention_mask)
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(f"attention_mask must be bool or an integer 0/1 tensor, got dtype "
                            f"{attention_mask.dtype} (additive float masks are not supported)")
        if attention_mask.shape != (B, Lk):
            raise ValueError(f"attention_mask must have shape (batch, seqlen_k) = ({B}, {Lk}), "
                             f"got {tuple(attention_mask.shape)}")
        if attention_mask.device != q.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but q is on {q.device}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
        if abs(softmax_scale) * LOG2E > FLOAT32_MAX:
            raise ValueError(
                f"softmax_scale {softmax_scale} overflows float32 in the kernels, which multiply the scores by "
                f"softmax_scale * log2(e) in float32: |softmax_scale| must be at most {MAX_SOFTMAX_SCALE:.6g}")
    return AttnDims(B, Lq, Lk, H, D, num_tasks, prefix_len, is_bank, Hkv)


def check_triton_device(device: torch.device) -> None:
    """The Triton kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got tensors on {device}); for CPU tensors set "
            "TRITON_INTERPRET=1 before importing prefix_attn, or use backend='torch'")


def graph_capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# Index tensors whose values were range-checked: id -> (weak reference, version counter, bound).
_CHECKED_VALUES: dict = {}


def version_counter(x: torch.Tensor):
    """x._version (bumped by every in-place change), or None for an inference-mode tensor."""
    try:
        return x._version
    except RuntimeError:  # an inference-mode tensor has no version counter: it is checked every time
        return None


def _values_checked(x: torch.Tensor, bound: int) -> bool:
    entry = _CHECKED_VALUES.get(id(x))
    return entry is not None and entry[0]() is x and entry[2] == bound and entry[1] == version_counter(x) is not None


def _mark_values_checked(x: torch.Tensor, bound: int) -> None:
    version = version_counter(x)
    if version is None:
        return
    key = id(x)
    _CHECKED_VALUES[key] = (weakref.ref(x, lambda _ref, key=key: _CHECKED_VALUES.pop(key, None)), version, bound)


def check_index_values(name: str, x: Optional[torch.Tensor], hi: int, what: str) -> None:
    """ValueError unless every value of the integer tensor ``x`` lies in [0, hi].

    Reads one boolean (one host sync on CUDA), once per tensor: a tensor checked before and not
    modified in place since (its version counter) is not read again. The integrations pass the same
    prefix_idx to every layer, so a model forward reads it once, not once per layer. Skipped while a
    CUDA graph is captured, where reading values is not allowed (the eager warm-up that capture
    requires checked the same tensors).
    """
    if x is None or x.numel() == 0 or _values_checked(x, hi) or graph_capturing(x.device):
        return
    lo_val, hi_val = torch.aminmax(x)
    if bool((lo_val < 0) | (hi_val > hi)):
        raise ValueError(f"{name} has values in [{int(lo_val)}, {int(hi_val)}], outside {what}")
    _mark_values_checked(x, hi)


def check_prefix_values(prefix_idx: Optional[torch.Tensor], prefix_lens: Optional[torch.Tensor],
                        dims: AttnDims) -> None:
    """Range checks of prefix_idx (tasks of the bank) and prefix_lens (0..P slots); see
    ``check_index_values``: at most one host sync per tensor, none for a tensor already checked."""
    if prefix_idx is not None:
        check_index_values("prefix_idx", prefix_idx, dims.num_tasks - 1,
                           f"tasks 0..{dims.num_tasks - 1} of the bank")
    if prefix_lens is not None:
        check_index_values("prefix_lens", prefix_lens, dims.prefix_len,
                           f"0..P = 0..{dims.prefix_len} prefix slots")


def default_scale(head_dim: int, softmax_scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def check_row_offsets_fit_int32(**tensors) -> None:
    """The kernels index within one (batch, head) row in int32: check that this cannot overflow."""
    eager = not torch.compiler.is_compiling()
    for name, x in tensors.items():
        if x is None:
            continue
        if eager and x.untyped_storage().nbytes() < 2**31:  # every offset in the storage fits: fast path
            continue
        (n1, n2, n3), (s1, s2, s3) = x.shape[-3:], x.stride()[-3:]
        if n1 == 0 or n2 == 0 or n3 == 0:
            continue
        span = (n1 - 1) * abs(s1) + (n2 - 1) * abs(s2) + (n3 - 1) * abs(s3)
        if span >= 2**31:
            raise ValueError(f"{name} spans {span} elements within one batch entry, more than int32 offsets "
                             f"allow; split the call along the sequence")
