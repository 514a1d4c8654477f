"""Attention dropout: the mask, its regeneration in backward, repeatability and statistics."""
import pytest
import torch

from prefix_attn import prefix_attn_func
from prefix_attn.dropout import draw_rng_state, dropout_keep_mask
from prefix_attn.triton_launch import dropout_keep_mask_triton
from tests.conftest import DEVICE
from tests.helpers import Case, dropout_run_and_reference, make_inputs, max_err, run_op

BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("shape", [(2, 3, 5, 10, 13), (1, 1, 7, 0, 9), (2, 2, 4, 33, 1), (1, 2, 3, 4, 64)])
def test_torch_mirror_equals_kernel_mask(shape):
    """The PyTorch Philox mirror draws the kernels' mask bit for bit."""
    B, H, Lq, P, Lk = shape
    for p in (0.1, 0.5, 0.9):
        rng = draw_rng_state(torch.device(DEVICE))
        a = dropout_keep_mask(rng, B, H, Lq, P, Lk, p)
        b = dropout_keep_mask_triton(rng, B, H, Lq, P, Lk, p)
        assert torch.equal(a, b)


def test_keep_rate():
    rng = draw_rng_state(torch.device(DEVICE))
    for p in (0.1, 0.5):
        mask = dropout_keep_mask(rng, 4, 4, 64, 30, 200, p)
        n = mask.numel()
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(mask.float().mean().item() - (1 - p)) < 5 * sigma
        # Columns and rows are not correlated with position: every quarter of the columns (the
        # four Philox outputs) keeps at the same rate.
        for j in range(4):
            sub = mask[..., j::4]
            assert abs(sub.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / sub.numel()) ** 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_zero_is_exact(backend):
    tensors, kwargs = make_inputs(Case(P=10, mask="left"), requires_grad=False)
    a = prefix_attn_func(**tensors, **kwargs, backend=backend)
    b = prefix_attn_func(**tensors, **kwargs, dropout_p=0.0, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_is_bitwise_repeatable(backend):
    tensors, kwargs = make_inputs(Case(P=10, T=2, mask="left"))
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        runs.append(run_op(lambda **kw: prefix_attn_func(**kw, dropout_p=0.3, backend=backend), tensors, kwargs,
                           torch.ones_like(tensors["q"])))
    (out1, lse1, g1), (out2, lse2, g2) = runs
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    torch.manual_seed(4321)
    out3 = prefix_attn_func(**tensors, **kwargs, dropout_p=0.3, backend=backend)
    assert not torch.equal(out1, out3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [Case(P=10, mask="left"), Case(P=21, T=3, B=3, prefix_lens=True, Lq=9, Lk=20),
                                  Case(P=0, causal=False, mask="holes")], ids=str)
def test_gradients_use_the_forward_mask(case, backend):
    """Output and every gradient equal the reference run with the mask the op drew."""
    p = 0.25
    tensors, kwargs = make_inputs(case)
    _, pairs = dropout_run_and_reference(case, tensors, kwargs, p, backend)
    for name, a, b in pairs:
        assert max_err(a, b) < 5e-5, name


def test_backends_agree_under_dropout():
    tensors, kwargs = make_inputs(Case(P=10, T=2, mask="right"))
    dout = torch.randn_like(tensors["q"])
    results = []
    for backend in BACKENDS:
        torch.manual_seed(7)
        results.append(run_op(lambda **kw: prefix_attn_func(**kw, dropout_p=0.4, backend=backend), tensors, kwargs,
                              dout))
    for a, b in zip([results[0][0], *results[0][2]], [results[1][0], *results[1][2]]):
        assert max_err(a, b) < 5e-5
