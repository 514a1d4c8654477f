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


def test_bank_task_that_no_sequence_uses_gets_a_zero_gradient(monkeypatch):
    """Regression (two-launch backward): dprefix of a task no sequence uses is written (zeros), not
    left as torch.empty garbage (NaN here); every task has a piece that reduces it."""
    case = Case(P=10, T=4, B=3, Lq=20, Lk=20, mask="left")
    tensors, kwargs = make_inputs(case, requires_grad=False)
    kwargs["prefix_idx"] = torch.tensor([2, 0, 2], device=tensors["q"].device)  # tasks 1 and 3 unused
    dout = torch.randn_like(tensors["q"])
    real_empty = torch.empty
    monkeypatch.setattr(triton_launch.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    dpk, dpv = _bwd(tensors, kwargs, dout)[3:]
    monkeypatch.undo()
    for t in (1, 3):
        assert torch.equal(dpk[t], torch.zeros_like(dpk[t])) and torch.equal(dpv[t], torch.zeros_like(dpv[t]))
    assert dpk[0].abs().sum() > 0 and dpk[2].abs().sum() > 0


@pytest.mark.parametrize("case", [Case(P=10, B=3, Lq=20, Lk=20), Case(P=20, T=3, B=5, prefix_lens=True)], ids=str)
def test_backward_writes_everything_it_returns_and_zeroes_its_counters(monkeypatch, case):
    """Every allocation of the backward filled with NaN (as a reused block may hold anything, the
    last-arrival counters included): the results equal those from zero-filled memory, so every
    output element is written and the counters are zeroed on the device before they count."""
    tensors, kwargs = make_inputs(case, requires_grad=False)
    dout = torch.randn_like(tensors["q"])
    t = {k: v.detach() for k, v in tensors.items()}
    out, lse = triton_launch.prefix_attn_fwd(**t, **kwargs)
    results = []
    for fill in (0.0, float("nan")):
        real_empty = torch.empty

        def filled_empty(*args, **kw):
            x = real_empty(*args, **kw)
            return x.fill_(fill) if x.dtype.is_floating_point else x

        monkeypatch.setattr(triton_launch.torch, "empty", filled_empty)
        results.append(triton_launch.prefix_attn_bwd(dout, None, **t, **kwargs, out=out, lse=lse,
                                                     items_per_piece=2))
        monkeypatch.undo()
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_strided_dlse_is_read_in_place():
    """dlse with any strides (autograd hands over a stride-0 expansion): the preprocess reads it
    through its strides, the same gradients as a contiguous copy."""
    case = Case(P=10, B=2, Lq=20, Lk=20)
    tensors, kwargs = make_inputs(case, requires_grad=False)
    t = {k: v.detach() for k, v in tensors.items()}
    out, lse = triton_launch.prefix_attn_fwd(**t, **kwargs)
    dout = torch.randn_like(t["q"])
    dlse_rows = torch.randn(case.B, 1, case.Lq)
    expanded = dlse_rows.expand(case.B, case.H, case.Lq)
    got = triton_launch.prefix_attn_bwd(dout, expanded, **t, **kwargs, out=out, lse=lse)
    want = triton_launch.prefix_attn_bwd(dout, expanded.contiguous(), **t, **kwargs, out=out, lse=lse)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
