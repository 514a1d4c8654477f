"""The op as torch.library custom ops, for torch.compile.

``prefix_attn::attention`` returns (out, lse, rng_state); its backward calls
``prefix_attn::attention_backward``. torch.compile sees two opaque ops with fake (meta) versions:
no graph break. Their arguments are the fields of ``AttnArgs`` flat (a custom op's schema takes
tensors and scalars only); the autograd formula is the eager node's own (``save_context`` and
``backward_from_context`` of prefix_attn.autograd), so compiled and eager calls give the same bits.
"""
from typing import Optional

import torch
from torch import Tensor

from prefix_attn import autograd
from prefix_attn.args import AttnArgs
from prefix_attn.checks import check_attention_inputs


def _args(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal, softmax_scale, dropout_p,
          backend) -> AttnArgs:
    # Metadata only (the public function validated these inputs already while tracing).
    dims = check_attention_inputs(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p)
    return AttnArgs(prefix_idx, prefix_lens, attention_mask, causal, softmax_scale, dropout_p, backend, dims)


def flat(args: AttnArgs) -> tuple:
    """The custom op's arguments after (q, k, v, prefix_k, prefix_v)."""
    return (args.prefix_idx, args.prefix_lens, args.attention_mask, args.causal, args.softmax_scale, args.dropout_p,
            args.backend)


@torch.library.custom_op("prefix_attn::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
    prefix_idx: Optional[Tensor], prefix_lens: Optional[Tensor], attention_mask: Optional[Tensor],
    causal: bool, softmax_scale: float, dropout_p: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    args = _args(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal, softmax_scale,
                 dropout_p, backend)
    return autograd.forward(q, k, v, prefix_k, prefix_v, args)


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
    args = _args(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal, softmax_scale,
                 dropout_p, backend)
    dq, dk, dv, dpk, dpv = autograd.backward(dout, dlse, q, k, v, out, lse, rng_state, prefix_k, prefix_v, args)
    if dpk is None:  # custom ops return tensors, not None
        dpk, dpv = q.new_empty((0,)), q.new_empty((0,))
    # Contiguous, as the fake promises (a backend may return gradient views, e.g. the CPU dropout path's).
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dpk, dpv


@attention_backward.register_fake
def _attention_backward_fake(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask,
                             out, lse, rng_state, causal, softmax_scale, dropout_p, backend):
    dpk = prefix_k.new_empty(prefix_k.shape) if prefix_k is not None else q.new_empty((0,))
    dpv = prefix_v.new_empty(prefix_v.shape) if prefix_v is not None else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dpk, dpv


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v = inputs[:5]
    args = _args(*inputs)
    autograd.save_context(ctx, q, k, v, prefix_k, prefix_v, args, *output, backward_op=attention_backward)


def _backward(ctx, dout, dlse, _drng_state):
    return (*autograd.backward_from_context(ctx, dout, dlse), *(None,) * 7)


torch.library.register_autograd("prefix_attn::attention", _backward, setup_context=_setup_context)
