"""The torch backend's CPU path for dropout with a shared prefix and equal heads (GPT-2's training call):
one softmax over [prefix; keys], the forward's probabilities kept for the backward. Checked against the
float64 reference run with the keep-mask the op drew: output, lse and every gradient, with and without an
lse gradient, every mask kind, strided views, Lq < Lk, half precision; and which calls take it."""
import pytest
import torch

from prefix_attn import prefix_attn_func
from prefix_attn.dropout import draw_rng_state, dropout_keep_mask
from prefix_attn.reference import prefix_attn_ref
from tests.helpers import ATOL, Case, PathSpy, dropout_run_and_reference, make_inputs, max_err, run_op, to64, to_dtype

CASES = [Case(P=10), Case(P=7, B=3, Lq=5, Lk=23, mask="left"), Case(P=3, causal=False, mask="holes"),
         Case(P=9, Lq=11, Lk=11, mask="empty_row"), Case(P=6, B=2, Lq=9, Lk=9, strided=True, H=3, D=24),
         Case(P=5, Lq=13, Lk=13, mask="right", causal=False)]


def probs_spy(monkeypatch):
    """Records each time the path computes its scores and probabilities."""
    return PathSpy(monkeypatch, ("_dropout_cpu_probs",))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_output_lse_and_gradients_match_the_reference_with_the_drawn_mask(monkeypatch, case):
    spy = probs_spy(monkeypatch)
    tensors, kwargs = make_inputs(case)
    _, pairs = dropout_run_and_reference(case, tensors, kwargs, 0.3, "torch")
    assert len(spy.ran) == 1  # the forward's; the backward read them
    for name, ours, ref in pairs:
        assert max_err(ours, ref) < 5e-5, name


@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_with_an_lse_gradient(case):
    tensors, kwargs = make_inputs(case)
    dout, dlse = torch.randn_like(tensors["q"]), torch.randn(case.B, case.H, case.Lq)
    torch.manual_seed(5)
    out, lse, grads = run_op(lambda **kw: prefix_attn_func(**kw, dropout_p=0.2, backend="torch"), tensors, kwargs,
                             dout, dlse)
    torch.manual_seed(5)
    mask = dropout_keep_mask(draw_rng_state(torch.device("cpu")), case.B, case.H, case.Lq, case.P, case.Lk, 0.2)
    ref = run_op(lambda **kw: prefix_attn_ref(**kw, dropout_p=0.2, dropout_mask=mask), to64(tensors), kwargs,
                 dout.double(), dlse.double())
    for name, a, b in zip(["out", "lse", *tensors], [out, lse, *grads], [ref[0], ref[1], *ref[2]]):
        assert max_err(a, b) < 5e-5, name


@pytest.mark.parametrize("layout", ["expanded", "heads_first"])
def test_a_gradient_of_any_layout_is_read_not_written(layout):
    """Regression: the backward lays dout out as (B * H, Lq, D) for its GEMMs; a gradient that is a stride-0
    expansion (out.sum().backward()) or already (B, H, Lq, D) in memory (its transpose-reshape is a view) must
    be copied, never scaled in place."""
    B, L, H, D, P = 2, 6, 3, 16, 5
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, generator=gen, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(P, H, D, generator=gen, requires_grad=True) for _ in range(2))
    if layout == "expanded":
        dout = torch.ones(()).expand(B, L, H, D)
    else:
        dout = torch.randn(B, H, L, D, generator=gen).transpose(1, 2)
    before = dout.clone()
    grads = []
    for given in (dout, dout.contiguous()):
        torch.manual_seed(4)
        out = prefix_attn_func(q, k, v, pk, pv, dropout_p=0.3, backend="torch")
        grads.append(torch.autograd.grad(out, (q, k, v, pk, pv), given))
    assert torch.equal(dout, before)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    """err(op) <= 2 * err(the reference computed in dtype) + ATOL[dtype], against the float64 reference."""
    case = Case(P=8, mask="left")
    tensors, kwargs = make_inputs(case, dtype)
    dout = torch.randn(tensors["q"].shape).to(dtype)
    torch.manual_seed(3)
    ours = run_op(lambda **kw: prefix_attn_func(**kw, dropout_p=0.1, backend="torch"), tensors, kwargs, dout)
    torch.manual_seed(3)
    mask = dropout_keep_mask(draw_rng_state(torch.device("cpu")), case.B, case.H, case.Lq, case.P, case.Lk, 0.1)
    reference = lambda **kw: prefix_attn_ref(**kw, dropout_p=0.1, dropout_mask=mask)  # noqa: E731
    exact = run_op(reference, to64(tensors), kwargs, dout.double())
    low = run_op(reference, to_dtype(tensors, dtype), kwargs, dout)
    assert ours[0].dtype == dtype and all(g.dtype == dtype for g in ours[2])
    for name, got, ref, low_got in zip(["out", "lse", *tensors], [ours[0], ours[1], *ours[2]],
                                       [exact[0], exact[1], *exact[2]], [low[0], low[1], *low[2]]):
        bound = 2 * max_err(low_got, ref) + ATOL[dtype] * max(1.0, ref.abs().max().item())
        assert max_err(got, ref) <= bound, name


@pytest.mark.parametrize("case,taken", [
    (Case(P=6), True),
    (Case(P=6, T=2), False),  # a bank
    (Case(P=6, prefix_lens=True), False),
    (Case(P=0), False),  # no prefix slot: a row may see nothing
], ids=str)
def test_which_calls_take_it(monkeypatch, case, taken):
    spy = probs_spy(monkeypatch)
    tensors, kwargs = make_inputs(case)
    prefix_attn_func(**tensors, **kwargs, dropout_p=0.2, backend="torch").sum().backward()
    assert len(spy.ran) == (1 if taken else 0)


def test_grouped_heads_take_the_chunked_path(monkeypatch):
    spy = probs_spy(monkeypatch)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 4, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 7, 2, 16, generator=g, requires_grad=True) for _ in range(2))
    pk, pv = (torch.randn(3, 2, 16, generator=g, requires_grad=True) for _ in range(2))
    prefix_attn_func(q, k, v, pk, pv, dropout_p=0.2, backend="torch").sum().backward()
    assert len(spy.ran) == 0


def test_a_retained_graph_gives_the_same_gradients_twice():
    """The backward overwrites the p it takes out of the saved state; a second backward computes it again."""
    tensors, kwargs = make_inputs(Case(P=6, mask="left"))
    out = prefix_attn_func(**tensors, **kwargs, dropout_p=0.3, backend="torch")
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, list(tensors.values()), dout, retain_graph=True)
    second = torch.autograd.grad(out, list(tensors.values()), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_double_backward_takes_the_explicit_backward(monkeypatch):
    """create_graph=True: the gradients are differentiable again, so the chunked explicit backward (made of
    differentiable ops) runs; its second-order terms match the reference's."""
    case = Case(P=5, Lq=7, Lk=7, mask="left")
    tensors, kwargs = make_inputs(case)
    torch.manual_seed(11)
    out = prefix_attn_func(**tensors, **kwargs, dropout_p=0.2, backend="torch")
    torch.manual_seed(11)
    mask = dropout_keep_mask(draw_rng_state(torch.device("cpu")), case.B, case.H, case.Lq, case.P, case.Lk, 0.2)

    def second_order(o, inputs):
        gq = torch.autograd.grad((o ** 2).sum(), inputs["q"], create_graph=True)[0]
        return torch.autograd.grad(gq.pow(2).sum(), list(inputs.values()))

    ref_inputs = to64(tensors)
    ref = prefix_attn_ref(**ref_inputs, **kwargs, dropout_p=0.2, dropout_mask=mask)
    for a, b in zip(second_order(out, tensors), second_order(ref, ref_inputs)):
        assert max_err(a, b) < 1e-5 * max(1.0, b.abs().max().item())  # second-order terms reach ~1e2


@pytest.mark.parametrize("L,P", [(32, 8), (64, 16), (128, 16), (128, 64)])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_memory_is_at_most_sdpa_with_dropout_over_the_concatenation(mode, L, P):
    """The kept p and p * keep are what SDPA's math path keeps too (its softmax output and the dropped
    probabilities, besides its dropout mask and the concatenated K and V): the peak stays at or below it."""
    from benchmarks.measure import peak_memory_mb

    B, H, D = 2, 4, 64
    q, k, v = (torch.randn(B, L, H, D, requires_grad=True) for _ in range(3))
    prefix_k, prefix_v = (torch.randn(P, H, D, requires_grad=True) for _ in range(2))
    dout = torch.randn(B, L, H, D)
    visible = torch.ones(L, P + L, dtype=torch.bool).tril(P)

    def sdpa():
        k_all, v_all = (torch.cat([x.expand(B, -1, -1, -1), y], dim=1) for x, y in ((prefix_k, k), (prefix_v, v)))
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), attn_mask=visible, dropout_p=0.1)
        return out.transpose(1, 2)

    def run(fn):
        if mode == "fwd":
            with torch.no_grad():
                return fn()
        fn().backward(dout)

    ours = lambda: prefix_attn_func(q, k, v, prefix_k, prefix_v, dropout_p=0.1, backend="torch")  # noqa: E731
    mine, theirs = peak_memory_mb(lambda: run(ours), "cpu"), peak_memory_mb(lambda: run(sdpa), "cpu")
    assert mine <= theirs, f"{mode}: peak {mine:.3f} MiB > SDPA with dropout over the concatenation {theirs:.3f} MiB"


def test_compiled_training_call_equals_eager():
    """Through the custom ops (torch.compile), the backward op gets the forward's rng_state: it takes the kept
    probabilities or computes them again, with the same bits as eager either way."""
    torch._dynamo.reset()
    case = Case(P=6, mask="left")
    tensors, kwargs = make_inputs(case)

    def layer(q, k, v, prefix_k, prefix_v):
        out = prefix_attn_func(q, k, v, prefix_k, prefix_v, **kwargs, dropout_p=0.3, backend="torch")
        return (out ** 2).sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, layer):
        torch.manual_seed(21)
        loss = fn(**tensors)
        results.append((loss, torch.autograd.grad(loss, list(tensors.values()))))
    (loss_c, grads_c), (loss_e, grads_e) = results
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)
