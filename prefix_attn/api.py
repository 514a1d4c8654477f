"""The public op: prefix_attn_func."""
import dataclasses
from typing import Optional, Union

import torch

from prefix_attn import ops, torch_backend
from prefix_attn.args import AttnArgs
from prefix_attn.autograd import EagerPrefixAttnFunction, PrefixAttnFunction
from prefix_attn.autograd import forward as attention_forward
from prefix_attn.backend import backend_override, resolve_backend
from prefix_attn.checks import check_attention_inputs, check_prefix_values, check_row_offsets_fit_int32, default_scale

# Up to torch 2.14 torch.autograd.Function.apply is a Python wrapper (functorch checks) around the C apply;
# outside functorch transforms the C apply alone does the same work (from 2.15 on the two are one).
_c_apply = getattr(torch._C._FunctionBase, "__dict__", {}).get("apply")
_apply_eager = (_c_apply.__get__(None, EagerPrefixAttnFunction) if _c_apply is not None
                else EagerPrefixAttnFunction.apply)


# Calls whose arguments were validated: signature -> (AttnDims, backend). A training step calls the op once per
# layer with tensors of the same shapes, strides, dtypes and devices: they are checked once.
_VALIDATED: dict = {}
_MAX_VALIDATED = 1024


def _tensor_signature(x):
    return None if x is None else (type(x), x.shape, x.stride(), x.dtype, x.device)


def _check_call(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p, softmax_scale,
                backend: str):
    dims = check_attention_inputs(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask,
                                  dropout_p, softmax_scale)
    chosen = resolve_backend(backend, q.device)
    if chosen == "triton":
        check_row_offsets_fit_int32(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    return dims, chosen


def _validate(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p, softmax_scale,
              backend: str):
    """(dims, backend) after every metadata check of the call; checked once per call signature (the
    types, shapes, strides, dtypes and devices of the tensors, the scalars' types and values and the
    backend asked for), since no check reads anything else. Index values are checked apart
    (checks.check_prefix_values)."""
    try:
        signature = (backend, type(dropout_p), dropout_p, type(softmax_scale), softmax_scale,
                     *map(_tensor_signature, (q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask)))
        found = _VALIDATED.get(signature)
    except (AttributeError, TypeError):  # not a tensor: the checks below say which argument
        signature = found = None
    if found is not None and found[1] == resolve_backend(backend, q.device):  # "auto" may follow the env var
        return found
    dims, chosen = _check_call(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p,
                               softmax_scale, backend)
    if signature is not None:
        if len(_VALIDATED) >= _MAX_VALIDATED:
            _VALIDATED.clear()
        _VALIDATED[signature] = (dims, chosen)
    return dims, chosen


def _needs_graph(q, k, v, prefix_k, prefix_v) -> bool:
    if not torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
        return torch.is_grad_enabled()
    return q.requires_grad or k.requires_grad or v.requires_grad or (
        prefix_k is not None and (prefix_k.requires_grad or prefix_v.requires_grad))


def prefix_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: Optional[torch.Tensor] = None,
    prefix_v: Optional[torch.Tensor] = None,
    *,
    prefix_idx: Optional[torch.Tensor] = None,
    prefix_lens: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    deterministic: bool = True,
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Attention over [shared prefix slots; the sequence's own keys], without building the concatenation.

    Every query attends to the P prefix key/value slots of its task (prefix tuning's per-layer
    prefix, shared by the batch) and to its own sequence's keys. Neither the batch-expanded prefix
    nor [prefix; keys] is ever materialised, forward or backward; the gradient of the prefix is
    reduced over the batch (per task for a bank) inside the op, and the gradients of k, v and the
    prefix over each group of query heads. (Exceptions, CPU tensors and the torch backend only, each
    within one call and below what SDPA over the concatenation holds: its backward takes the prefix
    gradient per batch row, (B, kv_heads, P, head_dim) for K and V, and sums it at once; with dropout,
    a shared prefix and equal heads, each GEMM runs over [prefix; keys] or [prefix; values], built for
    that GEMM and dropped after it.)

    Args:
        q: (batch, seqlen_q, heads, head_dim). Query i sits at key position seqlen_k - seqlen_q + i
            (bottom-right alignment: training, prefill and decoding with a cache alike).
        k, v: (batch, seqlen_k, kv_heads, head_dim), seqlen_q <= seqlen_k. kv_heads divides heads
            (grouped heads, GQA; MQA with kv_heads = 1): query head h reads KV head
            h // (heads // kv_heads), as in FlashAttention. The KV heads are never repeated in memory.
        prefix_k, prefix_v: None (plain attention), (P, kv_heads, head_dim) shared by the batch, or a
            bank (T, P, kv_heads, head_dim) of T task prefixes.
        prefix_idx: (batch,) integer, each sequence's task in the bank (required with a bank).
        prefix_lens: (T,) integer, optional: task t uses only its first prefix_lens[t] slots
            ((1,) for a shared prefix).
        attention_mask: (batch, seqlen_k) bool or integer 0/1: which of the sequence's keys may
            be attended (left or right padding, holes). Prefix slots are visible to every query.
        causal: mask key j > seqlen_k - seqlen_q + i for query i. Never applied to prefix slots.
        softmax_scale: defaults to 1 / sqrt(head_dim); |softmax_scale| * log2(e) must be finite in
            float32 (the kernels' factor), ValueError otherwise.
        dropout_p: attention dropout on the probabilities (as GPT-2 applies it in training). The
            mask is drawn from torch's generator (seeded by torch.manual_seed) and regenerated
            bit for bit in backward; see prefix_attn.dropout.
        deterministic: gradients are bitwise equal run after run. The prefix reduction has no
            atomics in either mode, so False gives the same deterministic path.
        return_lse: also return lse.
        backend: "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "torch" (pure
            PyTorch, differentiable, for CPU), or "auto" (triton on CUDA, torch otherwise;
            $PREFIX_ATTN_BACKEND overrides it).

    Returns:
        out (batch, seqlen_q, heads, head_dim) in q's dtype; with return_lse=True also
        lse (batch, heads, seqlen_q) float32, natural log. A row that sees nothing (all keys masked,
        no prefix) gives zeros and lse = -inf, never NaN, forward or backward.

    dtypes float16, bfloat16, float32; head_dim 16..128 (any, e.g. 40, 80, 96); any strides.
    Differentiable in q, k, v, prefix_k and prefix_v; twice (double backward) with backend="torch",
    once with "triton" (differentiating its gradients raises RuntimeError). Bad input raises
    ValueError or TypeError naming the argument.
    """
    if torch.compiler.is_compiling():  # traced once: no cache
        dims, chosen = _check_call(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p,
                                   softmax_scale, backend)
    else:
        dims, chosen = _validate(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p,
                                 softmax_scale, backend)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if not dims.has_prefix:  # P = 0 is plain attention
        prefix_k = prefix_v = prefix_idx = prefix_lens = None
    args = AttnArgs(prefix_idx, prefix_lens, attention_mask, bool(causal), default_scale(dims.head_dim, softmax_scale),
                    float(dropout_p), chosen, dims)
    if torch.compiler.is_compiling():
        # Opaque custom ops for the compiled graph; eager calls take the cheaper autograd.Function.
        out, lse, _ = ops.attention(q, k, v, prefix_k, prefix_v, *ops.flat(args))
    elif not _needs_graph(q, k, v, prefix_k, prefix_v):
        # Nothing to differentiate (decoding, evaluation): no autograd node to build.
        out, lse, _ = attention_forward(q, k, v, prefix_k, prefix_v, args, need_lse=return_lse)
    else:
        apply = PrefixAttnFunction.apply if torch._C._are_functorch_transforms_active() else _apply_eager
        out, lse, _ = apply(q, k, v, prefix_k, prefix_v, args)
    return (out, lse) if return_lse else out


# Heads-first calls on CPU tensors found fit for the torch backend: signature -> [dims, softmax scale, whether the
# fused CPU path runs them], or False for a call that goes through prefix_attn_func (another backend). A signature
# holds what the checks read, and no more: no strides (only the Triton launchers' int32 offset check reads them)
# and, of seqlen_k, only how it compares (Lq <= Lk, Lk > 0, the mask's length): a decoding loop, whose keys grow
# by one each step, stays on one entry (each step's first layer call would otherwise run every check, 40-80 us
# on the 2-core CPU, torch 2.11).
_CPU_CALLS: dict = {}


def _op_layout(x):
    """A heads-first (B, heads, L, D) tensor as the op's (B, L, heads, D) view; anything else as it is, for the
    checks to name."""
    return x.transpose(1, 2) if isinstance(x, torch.Tensor) and x.dim() == 4 else x


def _metadata(x):
    # is_cpu, not device: every tensor of the call must be on q's device, the CPU here, and reading x.device
    # builds a torch.device (about 3 K instructions, most of a signature's cost with four of them).
    return None if x is None else (type(x), x.shape, x.dtype, x.is_cpu)


def _cpu_call(q, k, v, prefix_k, prefix_v, prefix_idx, attention_mask, softmax_scale, dropout_p):
    """(dims, scale, fused) of a checked heads-first call that the torch backend runs (fused: on its fused CPU
    path, given no dropout and no autograd node), or None."""
    try:
        seqlen_q, seqlen_k = q.shape[2], k.shape[2]
        signature = (backend_override(), type(softmax_scale), softmax_scale, type(dropout_p), dropout_p,
                     q.shape, q.dtype, type(k), k.dtype, k.is_cpu, k.shape[:2], k.shape[3:], seqlen_q <= seqlen_k,
                     seqlen_k > 0, type(v), v.dtype, v.is_cpu, v.shape == k.shape,
                     _metadata(prefix_k), _metadata(prefix_v), _metadata(prefix_idx),
                     None if attention_mask is None else (type(attention_mask), attention_mask.dtype,
                                                          attention_mask.is_cpu, attention_mask.dim(),
                                                          attention_mask.shape == (q.shape[0], seqlen_k)))
        found = _CPU_CALLS.get(signature)
    except (AttributeError, TypeError, IndexError):  # not a 4-D tensor: the checks below say which argument
        signature = found = None
    if found is None:
        dims, chosen = _check_call(*map(_op_layout, (q, k, v)), prefix_k, prefix_v, prefix_idx, None, attention_mask,
                                   dropout_p, softmax_scale, "auto")
        found = chosen == "torch" and [dims, default_scale(dims.head_dim, softmax_scale),
                                       torch_backend.uses_fused_cpu_kernel(q, dims, dropout_p)]
        if signature is not None:
            if len(_CPU_CALLS) >= _MAX_VALIDATED:
                _CPU_CALLS.clear()
            _CPU_CALLS[signature] = found
        return tuple(found) if found else None
    if not found:
        return None
    dims, scale, fused = found
    if dims.seqlen_k != seqlen_k:
        # The entry keeps the latest sizes, so that the step's other layer calls find them as they are (threads
        # may overwrite each other's: any of them is the right template; the sizes returned are this call's).
        dims = found[0] = dataclasses.replace(dims, seqlen_k=seqlen_k)
    return dims, scale, fused


def causal_attention_heads_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: Optional[torch.Tensor],
                                 prefix_v: Optional[torch.Tensor], prefix_idx: Optional[torch.Tensor],
                                 attention_mask: Optional[torch.Tensor], softmax_scale: Optional[float],
                                 dropout_p: float) -> torch.Tensor:
    """``prefix_attn_func`` (causal, backend "auto") for heads-first tensors, as transformers' attention layers
    hold them: the integrations' entry.

    Args:
        q: (batch, heads, seqlen_q, head_dim); k, v: (batch, kv_heads, seqlen_k, head_dim): the transposes of
            prefix_attn_func's q, k, v (any strides).
        prefix_k, prefix_v, prefix_idx, attention_mask, softmax_scale, dropout_p: as for prefix_attn_func.
    Returns:
        out (batch, seqlen_q, heads, head_dim), what prefix_attn_func(q.transpose(1, 2), k.transpose(1, 2),
        v.transpose(1, 2), ...) returns, bit for bit.

    Calls on CPU tensors that the torch backend runs skip the public function's layers: the same checks run
    once per signature (without strides, which only the Triton launchers read), then the same autograd node
    or, without one, the backend, with the tensors as they are (``AttnArgs.heads_first``): the op's layout
    would cost three transposes here, their three inverses in the backend and, in training, an autograd node
    per transpose, where a tiny decoding layer call costs about 50 us in all (torch 2.11). A call that builds
    no autograd node on the fused CPU path (decoding and evaluation) goes to that path directly. Every other
    call (CUDA, torch.compile, torch.func transforms, another backend) goes through prefix_attn_func.
    """
    if (type(q) is torch.Tensor and q.is_cpu and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()):
        found = _cpu_call(q, k, v, prefix_k, prefix_v, prefix_idx, attention_mask, softmax_scale, dropout_p)
        if found is not None:
            dims, scale, fused = found
            if not dims.has_prefix:  # P = 0 is plain attention
                prefix_k = prefix_v = prefix_idx = None
            # heads_first: the backend's paths take the tensors as they are (no transposes to take here and undo
            # there, nor their autograd nodes), and give their gradients in that layout.
            args = AttnArgs(prefix_idx, None, attention_mask, True, scale, float(dropout_p), "torch", dims, True)
            if _needs_graph(q, k, v, prefix_k, prefix_v):
                return _apply_eager(q, k, v, prefix_k, prefix_v, args)[0]
            if not fused:
                return attention_forward(q, k, v, prefix_k, prefix_v, args, need_lse=False)[0]
            if prefix_idx is not None:
                check_prefix_values(prefix_idx, None, dims)
            return torch_backend.forward_heads_first(q, k, v, prefix_k, prefix_v, args, need_lse=False)[0]
    return prefix_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), prefix_k, prefix_v,
                            prefix_idx=prefix_idx, attention_mask=attention_mask, causal=True,
                            softmax_scale=softmax_scale, dropout_p=dropout_p, backend="auto")
