"""merge_attn_states: attention over A and over B merges into attention over A and B."""
import pytest
import torch

from prefix_attn import merge_attn_states, prefix_attn_func
from prefix_attn.reference import prefix_attn_ref
from tests.conftest import DEVICE


def test_merge_equals_attention_over_the_union():
    B, Lq, Lk, H, D, P = 2, 5, 9, 2, 16, 6
    q = torch.randn(B, Lq, H, D, device=DEVICE, dtype=torch.float64)
    k, v = (torch.randn(B, Lk, H, D, device=DEVICE, dtype=torch.float64) for _ in range(2))
    pk, pv = (torch.randn(P, H, D, device=DEVICE, dtype=torch.float64) for _ in range(2))
    full, full_lse = prefix_attn_ref(q, k, v, pk, pv, causal=True, return_lse=True)
    # A: the prefix alone (a zero-length own sequence), B: the sequence alone.
    empty = torch.zeros(B, Lk, dtype=torch.bool, device=DEVICE)
    out_a, lse_a = prefix_attn_ref(q, k, v, pk, pv, attention_mask=empty, return_lse=True)
    out_b, lse_b = prefix_attn_ref(q, k, v, causal=True, return_lse=True)
    out, lse = merge_attn_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, full.to(out.dtype))
    torch.testing.assert_close(lse.double(), full_lse, atol=1e-6, rtol=1e-6)


def test_empty_parts():
    B, L, H, D = 1, 3, 1, 16
    out_a = torch.randn(B, L, H, D, device=DEVICE)
    out_b = torch.randn(B, L, H, D, device=DEVICE)
    lse_a = torch.tensor([[[0.5, float("-inf"), float("-inf")]]], device=DEVICE)
    lse_b = torch.tensor([[[float("-inf"), 1.0, float("-inf")]]], device=DEVICE)
    out, lse = merge_attn_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out[0, 0], out_a[0, 0])
    torch.testing.assert_close(out[0, 1], out_b[0, 1])
    assert torch.all(out[0, 2] == 0) and torch.isneginf(lse[0, 0, 2])


def test_merge_gradients_finite_with_empty_parts():
    out_a = torch.randn(1, 2, 1, 16, device=DEVICE, requires_grad=True)
    out_b = torch.randn(1, 2, 1, 16, device=DEVICE, requires_grad=True)
    lse_a = torch.tensor([[[0.3, float("-inf")]]], device=DEVICE, requires_grad=True)
    lse_b = torch.tensor([[[float("-inf"), float("-inf")]]], device=DEVICE, requires_grad=True)
    out, lse = merge_attn_states(out_a, lse_a, out_b, lse_b)
    out.sum().backward()
    for t in (out_a, out_b, lse_a, lse_b):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_merge_of_op_outputs(backend):
    """The op's own lse is what merge needs: prefix part + sequence part = the fused op."""
    B, L, H, D, P = 2, 11, 2, 32, 7
    q, k, v = (torch.randn(B, L, H, D, device=DEVICE) for _ in range(3))
    pk, pv = (torch.randn(P, H, D, device=DEVICE) for _ in range(2))
    fused = prefix_attn_func(q, k, v, pk, pv, backend=backend)
    none = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    out_a, lse_a = prefix_attn_func(q, k, v, pk, pv, attention_mask=none, return_lse=True, backend=backend)
    out_b, lse_b = prefix_attn_func(q, k, v, return_lse=True, backend=backend)
    out, _ = merge_attn_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, fused, atol=1e-5, rtol=1e-5)


def test_bad_shapes():
    a = torch.randn(1, 2, 1, 16)
    with pytest.raises(ValueError, match="lse_a must be"):
        merge_attn_states(a, torch.zeros(1, 2), a, torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="out_a and out_b"):
        merge_attn_states(a, torch.zeros(1, 1, 2), a[:, :1], torch.zeros(1, 1, 2))
