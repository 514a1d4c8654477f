"""The torch backend's key masks: causal triangles, and the masks derived from a CPU attention_mask (B, Lk),
computed once per mask, not per layer call.

transformers hands every attention layer of a forward the same attention_mask tensor, and the masks the CPU paths
derive from it are the same in every layer, forward and backward: which keys are visible, the fused kernel's
additive mask with the query rows that see no own key, the dropout path's bias row. Derived in every layer call
they were 13 of the 24 dispatched ops of a padded decoding layer call, whose backend forward took 155 us against 46
us without padding (B 2, H 4, D 16, P 8, 20 keys, torch 2.11, one thread); 55 us now. They are kept for the latest
mask seen, keyed on the tensor itself (held, so that its identity cannot pass to a new tensor) and its version
counter (an in-place write makes a new version; an inference tensor has none, and its values are compared). Derived
under inference mode they are inference tensors, which later calls outside it only read (no autograd graph saves
them). Masks of other kinds (tensor subclasses, functorch wrappers, masks seen while torch.compile traces) are
derived per call and never read on the host. What is kept lives until another mask comes: the mask and at most a
(B, 1, Lq, Lk) additive mask in q's dtype (a padded call with 1 < Lq < Lk: a chunked prefill, a speculative step;
the others keep (B, 1, 1, Lk), and the dropout path (B, P + Lk) fp32).
"""
import functools
from typing import Callable, Optional

import numpy as np
import torch

# (mask, its _stamp, {what: derived}) of the latest plain CPU mask.
_latest: tuple = (None, -1, {})


def host_array(x: torch.Tensor) -> np.ndarray:
    """The values of an integer or bool CPU tensor as a NumPy array: its own memory, read without a
    dispatched op. A tensor with no storage of its own (a functorch wrapper, under torch.func.grad) is
    read through tolist()."""
    try:
        return x.numpy()
    except RuntimeError:
        return np.asarray(x.tolist())


def _is_plain_cpu_mask(attention_mask: torch.Tensor) -> bool:
    return (type(attention_mask) is torch.Tensor and attention_mask.is_cpu and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active())


def lets_every_key_through(attention_mask: torch.Tensor) -> bool:
    """Whether a (B, Lk) mask is known on the host to hide no key: True only for a plain CPU tensor of
    nonzeros, read through NumPy (no device to wait for, no dispatched op). Masks on a device (reading one
    would be a host sync), tensor subclasses and masks seen while torch.compile traces are not read: False."""
    if type(attention_mask) is not torch.Tensor or not attention_mask.is_cpu or torch.compiler.is_compiling():
        return False
    values = host_array(attention_mask)
    return np.count_nonzero(values) == values.size  # count_nonzero: no ufunc reduction machinery


def _stamp(attention_mask: torch.Tensor):
    """What changes when the mask's values may have: its version counter; for an inference tensor, which has
    none, its values (a mask buffer refilled in place under inference mode is a new mask)."""
    return host_array(attention_mask).tobytes() if attention_mask.is_inference() else attention_mask._version


def _derived(attention_mask: torch.Tensor, what: tuple, compute: Callable[[], object]):
    """compute(), kept for the latest plain CPU mask under the key ``what``."""
    global _latest
    mask, stamp, table = _latest
    if mask is not attention_mask or stamp != _stamp(mask):
        if not _is_plain_cpu_mask(attention_mask):
            return compute()
        table = {}
        _latest = (attention_mask, _stamp(attention_mask), table)
    if what not in table:  # a derived mask may be None (nothing to mask)
        table[what] = compute()
    return table[what]


def visible_keys(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, Lk) bool of the keys the mask lets through, or None when it lets every key through (a plain CPU
    mask is read on the host; a mask of ones then costs no masking at all)."""
    if attention_mask is None:
        return None
    return _derived(attention_mask, ("visible",),
                    lambda: None if lets_every_key_through(attention_mask) else attention_mask != 0)


@functools.lru_cache(maxsize=16)
def causal_hidden(start: int, stop: int, seqlen_q: int, seqlen_k: int, device: torch.device) -> torch.Tensor:
    """(stop - start, Lk) bool, read-only: key j hidden from query row i (start <= i < stop) iff j > i + Lk - Lq,
    an upper triangle. Cached: every layer call of a step asks for the same one."""
    return torch.ones((stop - start, seqlen_k), dtype=torch.bool, device=device).triu_(start + seqlen_k - seqlen_q + 1)


@functools.lru_cache(maxsize=16)
def _bottom_right_causal(seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """(1, 1, Lq, Lk) bool: key j visible to query i iff j <= i + Lk - Lq (cached: a loop asks for the same few
    shapes in every layer call; CPU only, read-only)."""
    return ~causal_hidden(0, seqlen_q, seqlen_q, seqlen_k, torch.device("cpu"))[None, None]


@functools.lru_cache(maxsize=16)
def _bottom_right_causal_bias(seqlen_q: int, seqlen_k: int, dtype: torch.dtype) -> torch.Tensor:
    """_bottom_right_causal as the kernel's additive mask in dtype (cached, read-only)."""
    return torch.where(_bottom_right_causal(seqlen_q, seqlen_k), 0.0, float("-inf")).to(dtype)


@functools.lru_cache(maxsize=16)
def causal_bias(seqlen_q: int, seqlen_k: int, n_prefix: int) -> torch.Tensor:
    """(Lq, P + Lk) fp32, read-only: -inf on the keys causal masking hides from each query row, else 0 (every
    prefix column). Cached: every layer call of a step asks for the same one."""
    hidden = torch.nn.functional.pad(causal_hidden(0, seqlen_q, seqlen_q, seqlen_k, torch.device("cpu")), (n_prefix, 0))
    return torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))


def own_key_mask(attention_mask: Optional[torch.Tensor], causal: bool, seqlen_q: int, seqlen_k: int,
                 dtype: torch.dtype):
    """The fused CPU kernel's masking of the own keys: (is_causal, additive mask (B or 1, 1, Lq, Lk) in dtype or
    None, (B, 1, Lq) bool of the query rows that see no own key, or None when every row sees one).

    The kernel's is_causal is top-left aligned, which is ours (bottom-right) when Lq == Lk; with Lq < Lk the
    causal part goes into the mask, unless one query row sees every key (Lq = 1, decoding). The kernel gives a
    row that sees no key lse 0: the caller sets such rows' lse to -inf.
    """
    top_left = causal and seqlen_q == seqlen_k
    key_ok = visible_keys(attention_mask)
    if key_ok is None:
        if not causal or top_left or seqlen_q == 1:
            return top_left, None, None
        # Bottom-right causal alone leaves every query its own key.
        return top_left, _bottom_right_causal_bias(seqlen_q, seqlen_k, dtype), None
    return _derived(attention_mask, ("own", causal, seqlen_q, seqlen_k, dtype),
                    lambda: _own_key_mask(attention_mask, key_ok, causal, top_left, seqlen_q, seqlen_k, dtype))


def _own_key_mask(attention_mask, key_ok, causal, top_left, seqlen_q, seqlen_k, dtype):
    visible = key_ok[:, None, None, :]  # (B, 1, 1, Lk)
    if causal and not top_left and seqlen_q > 1:
        visible = _bottom_right_causal(seqlen_q, seqlen_k) & visible
    mask = torch.where(visible, 0.0, float("-inf")).to(dtype)
    # A row sees an own key iff an unmasked key lies at or before its causal limit.
    seen = key_ok.cumsum(-1) > 0 if causal else key_ok.any(-1, keepdim=True).expand(-1, seqlen_k)
    hidden_rows = ~seen[:, seqlen_k - seqlen_q:][:, None, :]  # (B, 1, Lq)
    if _is_plain_cpu_mask(attention_mask) and not host_array(hidden_rows).any():
        hidden_rows = None  # read once per mask: a left-padded decoding batch has none
    return top_left, mask, hidden_rows


def dropout_bias(attention_mask: Optional[torch.Tensor], n_prefix: int) -> Optional[torch.Tensor]:
    """(B, P + Lk) fp32 added to the scores over [prefix; keys] by the CPU dropout path: -inf on the keys the
    mask hides, 0 on the rest and on every prefix slot; None when the mask hides no key."""
    key_ok = visible_keys(attention_mask)
    if key_ok is None:
        return None
    return _derived(attention_mask, ("dropout", n_prefix),
                    lambda: torch.nn.functional.pad(torch.where(key_ok, 0.0, float("-inf")), (n_prefix, 0)))
