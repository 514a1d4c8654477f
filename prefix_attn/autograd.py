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
    """The module with forward_unchecked / backward_unchecked for "triton" or "torch"."""
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


DOUBLE_BACKWARD_ERROR = (
    "prefix_attn_func(backend='triton') is differentiable once: its backward runs Triton kernels that are not "
    "differentiable themselves, so the gradient of its gradient (torch.autograd.grad(..., create_graph=True), then "
    "a loss on that gradient) is not supported. Use backend='torch' for double backward.")


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on the Triton backward's gradients, as a node of the graph that create_graph=True
    builds, linked to every tensor they depend on; its own backward raises. Without it a loss on
    those gradients would silently miss the op's second-order terms (once_differentiable, with a
    message that names the op)."""

    @staticmethod
    def forward(ctx, n_grads, *tensors):
        return tensors[:n_grads]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def refuse_double_backward(grads, depends_on):
    """``grads`` as they are, or, while autograd builds a graph of the backward (create_graph=True),
    outputs of a node that raises DOUBLE_BACKWARD_ERROR when a gradient flows from them to any of
    ``depends_on`` (the op's inputs, outputs and incoming gradients)."""
    if not torch.is_grad_enabled():
        return grads
    linked = [t for t in depends_on if t is not None and t.requires_grad]
    present = [g for g in grads if g is not None]
    if not linked or not present:
        return grads
    marked = iter(_RefuseDoubleBackward.apply(len(present), *present, *linked))
    return tuple(None if g is None else next(marked) for g in grads)


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
        if backend == "triton":  # the torch backend's backward is made of differentiable torch ops
            dq, dk, dv, dpk, dpv = refuse_double_backward(
                (dq, dk, dv, dpk, dpv), (q, k, v, prefix_k, prefix_v, out, lse, dout, dlse))
        return dq, dk, dv, dpk, dpv, None, None, None, None, None, None, None, None
