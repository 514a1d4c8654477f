"""Autograd of the op, shared by the eager path and the torch.library custom op.

Eager calls go through ``PrefixAttnFunction`` (a plain autograd.Function: the cheapest host path);
while torch.compile traces, ``prefix_attn.ops`` exposes the same forward and backward as custom
ops so that the graph has no break. Both draw the dropout RNG state the same way and call the same
backend functions, so they give the same bits.
"""
import torch

from prefix_attn import torch_backend
from prefix_attn.checks import check_prefix_values
from prefix_attn.dropout import draw_rng_state

_BACKENDS = {}


def backend_module(backend: str):
    """The module with prefix_attn_fwd / prefix_attn_bwd for "triton" or "torch"."""
    module = _BACKENDS.get(backend)
    if module is None:
        if backend == "triton":
            from prefix_attn import triton_launch  # imports triton and the kernels on first use

            module = triton_launch
        else:
            module = torch_backend
        _BACKENDS[backend] = module
    return module


def forward(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal, softmax_scale,
            dropout_p, backend, dims):
    """(out, lse, rng_state) for inputs already validated (``dims`` from check_attention_inputs)."""
    check_prefix_values(prefix_idx, prefix_lens, dims)
    if dropout_p > 0.0:
        rng_state = draw_rng_state(q.device)
    else:
        rng_state = torch.empty(0, dtype=torch.int64, device=q.device)
    out, lse = backend_module(backend).forward_unchecked(
        q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal, softmax_scale, dropout_p,
        rng_state, dims)
    return out, lse, rng_state


def backward(dout, dlse, q, k, v, out, lse, rng_state, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask,
             causal, softmax_scale, dropout_p, backend, dims):
    """(dq, dk, dv, dprefix_k, dprefix_v); the prefix gradients are None without a prefix."""
    return backend_module(backend).backward_unchecked(
        dout, dlse, q, k, v, out, lse, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal,
        softmax_scale, dropout_p, rng_state, dims)


class PrefixAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal, softmax_scale,
                dropout_p, backend, dims):
        out, lse, rng_state = forward(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal,
                                      softmax_scale, dropout_p, backend, dims)
        ctx.save_for_backward(q, k, v, out, lse, rng_state, prefix_k, prefix_v, prefix_idx, prefix_lens,
                              attention_mask)
        ctx.options = (causal, softmax_scale, dropout_p, backend, dims)
        ctx.set_materialize_grads(False)  # an unused lse gives dlse = None: the kernels skip it
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, rng_state, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask = ctx.saved_tensors
        causal, softmax_scale, dropout_p, backend, dims = ctx.options
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dpk, dpv = backward(dout, dlse, q, k, v, out, lse, rng_state, prefix_k, prefix_v, prefix_idx,
                                        prefix_lens, attention_mask, causal, softmax_scale, dropout_p, backend, dims)
        return dq, dk, dv, dpk, dpv, None, None, None, None, None, None, None, None
