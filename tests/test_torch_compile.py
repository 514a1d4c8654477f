"""A function calling prefix_attn_func compiles with torch.compile(fullgraph=True): no graph break,
same outputs and gradients as eager."""
import pytest
import torch

from prefix_attn import prefix_attn_func
from tests.helpers import Case, make_inputs


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fullgraph_compile_forward_and_backward(backend):
    torch._dynamo.reset()
    case = Case(P=10, T=2, B=3, mask="left")
    tensors, kwargs = make_inputs(case)

    def layer(q, k, v, prefix_k, prefix_v):
        out, lse = prefix_attn_func(q * 1.0, k, v, prefix_k, prefix_v, **kwargs, return_lse=True, backend=backend)
        return (out.float() ** 2).sum() + lse.sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    loss_c = compiled(**tensors)
    grads_c = torch.autograd.grad(loss_c, list(tensors.values()))
    loss_e = layer(**tensors)
    grads_e = torch.autograd.grad(loss_e, list(tensors.values()))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_compile_with_dropout_is_deterministic_per_seed():
    torch._dynamo.reset()
    tensors, kwargs = make_inputs(Case(P=6), requires_grad=False)

    def layer(q, k, v, prefix_k, prefix_v):
        return prefix_attn_func(q, k, v, prefix_k, prefix_v, **kwargs, dropout_p=0.2, backend="torch")

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    a = compiled(**tensors)
    torch.manual_seed(3)
    b = layer(**tensors)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiled_views_of_the_outputs(backend):
    """Regression: every backend returns contiguous out and gradients, as the fake implementations
    promise; a compiled graph that views them (as GPT2Attention's reshape does) must run."""
    torch._dynamo.reset()
    case = Case(P=5, B=2, Lq=7, Lk=7)
    tensors, kwargs = make_inputs(case)

    def layer(q, k, v, prefix_k, prefix_v):
        out = prefix_attn_func(q, k, v, prefix_k, prefix_v, **kwargs, backend=backend)
        return out.view(case.B, case.Lq, case.H * case.D).sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    loss = compiled(**tensors)
    grads = torch.autograd.grad(loss, list(tensors.values()))
    torch.testing.assert_close(loss, layer(**tensors))
    for g, t in zip(grads, tensors.values()):
        assert g.is_contiguous() and g.shape == t.shape
