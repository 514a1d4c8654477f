"""The op as torch.library custom ops: forward, backward, fake (meta) versions and autograd.

``prefix_attn::attention`` returns (out, lse, rng_state); its backward calls
``prefix_attn::attention_backward``. Both dispatch to the Triton launchers or the torch backend by
the ``backend`` string, so torch.compile sees two opaque ops and no graph break, and both backends
share this one autograd path.
"""
from typing import Optional

import torch
from torch import Tensor

from prefix_attn import torch_backend
from prefix_attn.dropout import draw_rng_state

_BACKENDS = {}


def _impl(backend: str):
    if backend not in _BACKENDS:
        if backend == "triton":
            from prefix_attn import triton_launch  # imports triton and the kernels on first use

            _BACKENDS[backend] = triton_launch
        else:
            _BACKENDS[backend] = torch_backend
    return _BACKENDS[backend]


@torch.library.custom_op("prefix_attn::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
    prefix_idx: Optional[Tensor], prefix_lens: Optional[Tensor], attention_mask: Optional[Tensor],
    causal: bool, softmax_scale: float, dropout_p: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    rng_state = draw_rng_state(q.device) if dropout_p > 0.0 else torch.empty(0, dtype=torch.int64, device=q.device)
    out, lse = _impl(backend).prefix_attn_fwd(
        q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal, softmax_scale, dropout_p,
        rng_state)
    return out, lse, rng_state


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
    dq, dk, dv, dpk, dpv = _impl(backend).prefix_attn_bwd(
        dout, dlse, q, k, v, out, lse, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask,
        causal, softmax_scale, dropout_p, rng_state)
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
    # A gradient for lse arrives as None when lse was not used: the kernels then skip it.
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
