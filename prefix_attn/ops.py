"""The op as torch.library custom ops, for torch.compile.

``prefix_attn::attention`` returns (out, lse, rng_state); its backward calls
``prefix_attn::attention_backward``. torch.compile sees two opaque ops with fake (meta) versions:
no graph break. They run the same forward and backward as the eager autograd.Function
(``prefix_attn.autograd``), so compiled and eager calls give the same bits.
"""
from typing import Optional

import torch
from torch import Tensor

from prefix_attn import autograd
from prefix_attn.checks import check_attention_inputs


def _dims(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p):
    # Metadata only (the public function validated these inputs already while tracing).
    return check_attention_inputs(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p)


@torch.library.custom_op("prefix_attn::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
    prefix_idx: Optional[Tensor], prefix_lens: Optional[Tensor], attention_mask: Optional[Tensor],
    causal: bool, softmax_scale: float, dropout_p: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dims = _dims(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p)
    return autograd.forward(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal,
                            softmax_scale, dropout_p, backend, dims)


@attention.register_fake
def _attention_fake(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal, softmax_scale,
                    dropout_p, backend):
    B, Lq, H, D = q.shape
    out = q.new_empty((B, Lq, H, D))
    lse = q.new_empty((B, H, Lq), dtype=torch.float32)
    rng_state = q.new_empty((2 if dropout_p > 0.0 else 0,), dtype=torch.int64)
    return out, lse, rng_state


@torch.library.custom_op("prefix_attn::attention_backward", mutates_args=())
def attention_backward(
    dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor],
    prefix_v: Optional[Tensor], prefix_idx: Optional[Tensor], prefix_lens: Optional[Tensor],
    attention_mask: Optional[Tensor], out: Tensor, lse: Tensor, rng_state: Tensor,
    causal: bool, softmax_scale: float, dropout_p: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dims = _dims(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p)
    dq, dk, dv, dpk, dpv = autograd.backward(dout, dlse, q, k, v, out, lse, rng_state, prefix_k, prefix_v,
                                             prefix_idx, prefix_lens, attention_mask, causal, softmax_scale,
                                             dropout_p, backend, dims)
    if dpk is None:  # custom ops return tensors, not None
        dpk, dpv = q.new_empty((0,)), q.new_empty((0,))
    return dq, dk, dv, dpk, dpv


@attention_backward.register_fake
def _attention_backward_fake(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask,
                             out, lse, rng_state, causal, softmax_scale, dropout_p, backend):
    dpk = prefix_k.new_empty(prefix_k.shape) if prefix_k is not None else q.new_empty((0,))
    dpv = prefix_v.new_empty(prefix_v.shape) if prefix_v is not None else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dpk, dpv


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal, softmax_scale, dropout_p,
     backend) = inputs
    out, lse, rng_state = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, out, lse, rng_state)
    ctx.options = (causal, softmax_scale, dropout_p, backend)
    ctx.has_prefix = prefix_k is not None
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse, _drng):
    q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, out, lse, rng_state = ctx.saved_tensors
    causal, softmax_scale, dropout_p, backend = ctx.options
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dpk, dpv = attention_backward(
        dout, dlse, q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, out, lse, rng_state,
        causal, softmax_scale, dropout_p, backend)
    if not ctx.has_prefix:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, None, None, None, None, None, None, None


torch.library.register_autograd("prefix_attn::attention", _backward, setup_context=_setup_context)
