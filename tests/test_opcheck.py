"""torch.library.opcheck of the custom ops torch.compile sees (prefix_attn::attention and its backward):
schema, fake (meta) functions against real outputs (shapes, dtypes, strides), autograd registration and
AOT dispatch, on both backends (Triton in the interpreter on CPU), with and without a prefix, a bank,
padding and the decode path. Dropout is left out: opcheck compares runs that would draw different masks."""
import pytest
import torch

from prefix_attn import ops
from tests.conftest import DEVICE

B, L, H, D, P, T = 2, 9, 2, 16, 5, 3


def _inputs(case: str):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(True)

    lq = 1 if case == "decode" else L
    q, k, v = rand(B, lq, H, D), rand(B, L, H, D), rand(B, L, H, D)
    mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    mask[0, :2] = False
    if case == "plain":
        return q, k, v, None, None, None, None, None
    if case == "bank":
        return (q, k, v, rand(T, P, H, D), rand(T, P, H, D), torch.tensor([2, 0], device=DEVICE),
                torch.tensor([5, 3, 1], device=DEVICE), mask)
    return q, k, v, rand(P, H, D), rand(P, H, D), None, None, mask


CASES = ["plain", "shared", "bank", "decode"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_attention(backend, case):
    """Regression: the torch backend's fused CPU path returned lse laid out (B, Lq, H) while the fake
    promised a contiguous (B, H, Lq): compiled graphs plan views from the fake's strides."""
    args = (*_inputs(case), True, 0.25, 0.0, backend)
    torch.library.opcheck(ops.attention, args)


@pytest.mark.parametrize("case", ["shared", "bank"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_attention_backward(backend, case):
    q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, mask = _inputs(case)
    with torch.no_grad():
        out, lse, rng_state = ops.attention(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, mask, True, 0.25,
                                            0.0, backend)
    dout = torch.randn_like(out)
    args = (dout, None, q.detach(), k.detach(), v.detach(), prefix_k.detach(), prefix_v.detach(), prefix_idx,
            prefix_lens, mask, out, lse, rng_state, True, 0.25, 0.0, backend)
    torch.library.opcheck(ops.attention_backward, args)
