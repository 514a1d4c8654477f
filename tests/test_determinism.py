"""The backward is bitwise repeatable, and the prefix reduction does not depend on its split."""
import pytest
import torch

from prefix_attn import triton_launch
from tests.helpers import Case, make_inputs


def _bwd(tensors, kwargs, dout, items_per_piece=None):
    t = {k: v.detach() for k, v in tensors.items()}
    out, lse = triton_launch.prefix_attn_fwd(**t, **kwargs)
    return triton_launch.prefix_attn_bwd(dout, None, **t, **kwargs, out=out, lse=lse,
                                         items_per_piece=items_per_piece)


@pytest.mark.parametrize("case", [Case(P=10, B=3, mask="left"), Case(P=20, T=3, B=5, prefix_lens=True)], ids=str)
def test_two_backward_runs_are_bitwise_equal(case):
    tensors, kwargs = make_inputs(case, requires_grad=False)
    dout = torch.randn_like(tensors["q"])
    first = _bwd(tensors, kwargs, dout)
    second = _bwd(tensors, kwargs, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", [Case(P=10, B=3, Lq=40, Lk=40), Case(P=20, T=3, B=5, prefix_lens=True)], ids=str)
def test_prefix_gradient_independent_of_split(case):
    """One piece per item, a few pieces, one piece per task: the same sums up to rounding."""
    tensors, kwargs = make_inputs(case, requires_grad=False)
    dout = torch.randn_like(tensors["q"])
    results = [_bwd(tensors, kwargs, dout, items_per_piece=n) for n in (1, 3, 1000)]
    for other in results[1:]:
        for a, b in zip(results[0][3:], other[3:]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
