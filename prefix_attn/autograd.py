"""Autograd of the op: one forward, one backward and one autograd context for every caller.

Eager calls build an ``EagerPrefixAttnFunction`` node (an autograd.Function: the cheapest host path),
calls under torch.func transforms a ``PrefixAttnFunction`` node (functorch needs the forward and the
setup_context apart); while torch.compile traces, ``prefix_attn.ops`` exposes the op as two custom
ops whose autograd formula is registered with the same ``save_context`` and ``backward_from_context``:
the saved tensors, the options kept and the backward are written once. In the compiled graph the
backward runs as the opaque ``prefix_attn::attention_backward`` op (handed over by ops.py through the
context), eagerly as a direct call of the backend. Both draw the dropout RNG state the same way and
call the same backend functions, so they give the same bits.
"""
import torch

from prefix_attn import torch_backend
from prefix_attn.args import AttnArgs
from prefix_attn.checks import check_prefix_values
from prefix_attn.dropout import draw_rng_state

_BACKENDS = {}
_NO_RNG_STATE = {}  # device -> the empty int64 tensor that stands for "no dropout" (never written)


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


def forward(q, k, v, prefix_k, prefix_v, args: AttnArgs, need_lse: bool = True):
    """(out, lse, rng_state) for inputs already validated (``args.dims`` from check_attention_inputs);
    with need_lse=False (no autograd node, lse not returned) lse may be None."""
    check_prefix_values(args.prefix_idx, args.prefix_lens, args.dims)
    if args.dropout_p > 0.0:
        rng_state = draw_rng_state(q.device)
    else:
        rng_state = _NO_RNG_STATE.get(q.device)
        if rng_state is None:
            rng_state = _NO_RNG_STATE[q.device] = torch.empty(0, dtype=torch.int64, device=q.device)
    out, lse = backend_module(args.backend).forward_unchecked(q, k, v, prefix_k, prefix_v, args, rng_state, need_lse)
    return out, lse, rng_state


def backward(dout, dlse, q, k, v, out, lse, rng_state, prefix_k, prefix_v, args: AttnArgs):
    """(dq, dk, dv, dprefix_k, dprefix_v); the prefix gradients are None without a prefix."""
    return backend_module(args.backend).backward_unchecked(dout, dlse, q, k, v, out, lse, prefix_k, prefix_v, args,
                                                           rng_state)


def save_context(ctx, q, k, v, prefix_k, prefix_v, args: AttnArgs, out, lse, rng_state, backward_op=None) -> None:
    """What the backward needs, kept on an autograd context (the eager node's or the custom op's).

    backward_op: the custom op that runs the backward inside a compiled graph (None: call the
    backend directly).
    """
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, args.prefix_idx, args.prefix_lens, args.attention_mask,
                          out, lse, rng_state)
    ctx.options = args.options()
    ctx.backward_op = backward_op
    ctx.set_materialize_grads(False)  # an unused lse gives dlse = None: the kernels skip it


def backward_from_context(ctx, dout, dlse):
    """(dq, dk, dv, dprefix_k, dprefix_v) of a context filled by ``save_context``."""
    q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, out, lse, rng_state = ctx.saved_tensors
    args = AttnArgs.from_tensors_and_options(prefix_idx, prefix_lens, attention_mask, ctx.options)
    if dout is None:
        dout = torch.zeros_like(out)
    if ctx.backward_op is not None:
        dq, dk, dv, dpk, dpv = ctx.backward_op(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens,
                                               attention_mask, out, lse, rng_state, *args.options()[:4])
        if prefix_k is None:  # custom ops return tensors, not None
            dpk = dpv = None
    else:
        dq, dk, dv, dpk, dpv = backward(dout, dlse, q, k, v, out, lse, rng_state, prefix_k, prefix_v, args)
    if args.backend == "triton":  # the torch backend's backward is made of differentiable torch ops
        dq, dk, dv, dpk, dpv = refuse_double_backward(
            (dq, dk, dv, dpk, dpv), (q, k, v, prefix_k, prefix_v, out, lse, dout, dlse))
    return dq, dk, dv, dpk, dpv


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


def _node_backward(ctx, dout, dlse, _drng_state):
    return (*backward_from_context(ctx, dout, dlse), None)


class PrefixAttnFunction(torch.autograd.Function):
    """The node under torch.func transforms (grad, vjp, jacrev), which need the forward and setup_context
    apart: apply(q, k, v, prefix_k, prefix_v, args) -> (out, lse, rng_state)."""

    @staticmethod
    def forward(q, k, v, prefix_k, prefix_v, args: AttnArgs):
        return forward(q, k, v, prefix_k, prefix_v, args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        save_context(ctx, *inputs, *output)

    backward = staticmethod(_node_backward)


class EagerPrefixAttnFunction(torch.autograd.Function):
    """The node of plain eager calls, the same forward and backward with the context filled in the forward:
    a Function with a setup_context has its arguments bound by inspect.signature on every apply (in
    torch 2.15 by the C apply itself), about 15-25 us of host time per call."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, args: AttnArgs):
        out, lse, rng_state = forward(q, k, v, prefix_k, prefix_v, args)
        save_context(ctx, q, k, v, prefix_k, prefix_v, args, out, lse, rng_state)
        return out, lse, rng_state

    backward = staticmethod(_node_backward)
