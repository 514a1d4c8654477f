"""Grouped KV heads (k, v, prefix with Hkv heads, q with H = Hkv * G) in the torch backend: outputs, lse
and every gradient vs the float64 reference (which repeats the KV heads), on both of its paths (the
fused CPU kernel without dropout, the explicit one with dropout, an lse gradient or double backward),
the dropout mask drawn per QUERY head as the Triton kernels draw it, and no expanded KV anywhere."""
import pytest
import torch

from prefix_attn import prefix_attn_func
from prefix_attn.dropout import draw_rng_state, dropout_keep_mask
from prefix_attn.reference import prefix_attn_ref
from tests.helpers import (Case, PathSpy, ShapeLog, check_against_reference, dropout_run_and_reference, make_inputs,
                           max_err, to64)

H = 4
KV_HEADS = [1, H // 2]  # G = 4 and G = 2

CASES = [
    Case(H=H, P=0),
    Case(H=H, P=0, mask="empty_row", causal=False),
    Case(H=H, P=10, mask="left", B=3),
    Case(H=H, P=7, mask="right", causal=False),
    Case(H=H, P=9, T=3, B=4, prefix_lens=True, mask="holes"),
    Case(H=H, P=10, Lq=7, Lk=30, mask="holes"),  # Lq < Lk: bottom-right causal in the mask
    Case(H=H, P=5, T=2, Lq=3, Lk=21),  # a few queries per sequence (decoding)
    Case(H=H, P=10, strided=True),  # GPT-2's transposed views
]


def make_grouped_inputs(case: Case, kv_heads: int, dtype=torch.float32):
    """make_inputs with k, v, prefix_k and prefix_v cut to their first kv_heads heads (k and v stay views
    with the fused projection's strides when case.strided)."""
    tensors, kwargs = make_inputs(case, dtype, requires_grad=False)
    for name in ("k", "v", "prefix_k", "prefix_v"):
        if name in tensors:
            x = tensors[name][..., :kv_heads, :]
            tensors[name] = x if case.strided and name in ("k", "v") else x.contiguous()
    # detach() keeps the strides: strided leaves, as GPT-2 hands over views.
    leaves = {name: x.detach().requires_grad_(True) for name, x in tensors.items()}
    return leaves, kwargs


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_path_matches_reference(monkeypatch, case, kv_heads):
    spy = PathSpy(monkeypatch)
    tensors, kwargs = make_grouped_inputs(case, kv_heads)
    out, lse, grads = check_against_reference(case, torch.float32, "torch", tensors_kwargs=(tensors, kwargs))
    assert spy.ran == ["_forward_fused_cpu", "_backward_fused_cpu"]
    assert grads[1].shape[2] == kv_heads and grads[2].shape[2] == kv_heads


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("case", CASES[2:6], ids=str)
def test_explicit_path_with_lse_gradient_matches_reference(monkeypatch, case, kv_heads):
    spy = PathSpy(monkeypatch)
    tensors, kwargs = make_grouped_inputs(case, kv_heads)
    check_against_reference(case, torch.float32, "torch", with_dlse=True, tensors_kwargs=(tensors, kwargs))
    assert spy.ran == ["_forward_fused_cpu"]  # an lse gradient: the explicit backward


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    case = Case(H=H, P=9, T=3, B=4, prefix_lens=True, mask="left")
    for kv_heads in KV_HEADS:
        tensors, kwargs = make_grouped_inputs(case, kv_heads, dtype)
        check_against_reference(case, dtype, "torch", tensors_kwargs=(tensors, kwargs))


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("case", [Case(H=H, P=10, mask="left"), Case(H=H, P=21, T=3, B=3, prefix_lens=True, Lq=9, Lk=20),
                                  Case(H=H, P=0, causal=False, mask="holes")], ids=str)
def test_dropout_mask_is_drawn_per_query_head(case, kv_heads):
    """Output, lse and every gradient equal the reference run with the keep-mask of the QUERY heads
    (B, H, Lq, P + Lk): the bits the Triton kernels draw for (b, h, i, key)."""
    p = 0.25
    tensors, kwargs = make_grouped_inputs(case, kv_heads)
    rng, pairs = dropout_run_and_reference(case, tensors, kwargs, p, "torch")
    for name, a, b in pairs:
        assert a.shape == b.shape, name
        assert max_err(a, b) < 5e-5, name
    # The mask really matters here: another mask (the one of the KV heads' indexing) gives another output.
    other = dropout_keep_mask(rng, case.B, case.H, case.Lq, case.P, case.Lk, p)[:, torch.arange(case.H) // (case.H // kv_heads)]
    if kv_heads < case.H:
        wrong = prefix_attn_ref(**to64(tensors), **kwargs, dropout_p=p, dropout_mask=other)
        assert max_err(pairs[0][1], wrong) > 1e-3  # pairs[0]: the op's out


def test_dropout_mask_equals_the_triton_kernels_mask():
    from prefix_attn.triton_launch import dropout_keep_mask_triton

    rng = draw_rng_state(torch.device("cpu"))
    B, Lq, P, Lk = 2, 5, 6, 9
    assert torch.equal(dropout_keep_mask(rng, B, H, Lq, P, Lk, 0.3), dropout_keep_mask_triton(rng, B, H, Lq, P, Lk, 0.3))


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_double_backward_matches_reference(kv_heads, dropout_p):
    case = Case(H=H, P=6, T=2, B=3, Lq=7, Lk=11, prefix_lens=True, mask="left")
    tensors, kwargs = make_grouped_inputs(case, kv_heads)
    names = list(tensors)
    dout = torch.randn_like(tensors["q"])
    weights = {n: torch.randn_like(t) for n, t in tensors.items()}
    torch.manual_seed(5)
    mask = None
    if dropout_p:
        mask = dropout_keep_mask(draw_rng_state(torch.device("cpu")), case.B, case.H, case.Lq, case.P, case.Lk,
                                 dropout_p)

    def second_order(fn, inputs, dtype):
        out = fn(**inputs, **kwargs)
        grads = torch.autograd.grad((out * dout.to(dtype)).sum(), [inputs[n] for n in names], create_graph=True)
        loss = sum((g * weights[n].to(dtype)).sum() for g, n in zip(grads, names))
        return grads, torch.autograd.grad(loss, [inputs[n] for n in names])

    torch.manual_seed(5)
    got_first, got = second_order(lambda **kw: prefix_attn_func(**kw, dropout_p=dropout_p, backend="torch"),
                                  tensors, torch.float32)
    ref_first, ref = second_order(lambda **kw: prefix_attn_ref(**kw, dropout_p=dropout_p, dropout_mask=mask),
                                  to64(tensors), torch.float64)
    for name, a, b in zip(names, [*got_first, *got], [*ref_first, *ref]):
        scale = max(1.0, b.abs().max().item())
        assert max_err(a, b) < 1e-4 * scale, name


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("bank", [False, True])
def test_kv_heads_are_never_expanded(dropout_p, bank):
    """No tensor of the call (forward, backward, double backward) holds K, V or the prefix repeated over the
    query heads: none has the query heads H next to the head dim and the key length or prefix length.
    (The fused CPU kernel indexes KV head h // G itself; its source was read: no copy.)"""
    B, Hq, kv_heads, Lq, Lk, P, D = 2, 6, 2, 5, 37, 11, 16
    q = torch.randn(B, Lq, Hq, D, requires_grad=True)
    k, v = (torch.randn(B, Lk, kv_heads, D, requires_grad=True) for _ in range(2))
    shape = (3, P, kv_heads, D) if bank else (P, kv_heads, D)
    prefix_k, prefix_v = (torch.randn(*shape, requires_grad=True) for _ in range(2))
    kwargs = {"prefix_idx": torch.tensor([2, 0])} if bank else {}
    log = ShapeLog()
    with log:
        out = prefix_attn_func(q, k, v, prefix_k, prefix_v, dropout_p=dropout_p, backend="torch", **kwargs)
        (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        gq.sum().backward()
    assert log.shapes
    expanded = [(f, s) for f, s in log.shapes if Hq in s and D in s and (Lk in s or P in s)]
    assert not expanded, expanded


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("case", [Case(H=H, P=6, B=3, Lq=1, Lk=9, mask="left"), Case(H=H, P=10, strided=True),
                                  Case(H=H, P=5, T=2, B=4, Lq=1, Lk=21)], ids=str)
def test_prefix_part_as_one_batch_of_query_rows_matches_reference(monkeypatch, case, kv_heads):
    """The prefix part with every query row in one batch (torch_backend.FOLD_MIN_ROWS_X_SLOTS forced to 0)
    against the (1, Hkv, P, D) block: grouped heads go to the kernel as they are."""
    from prefix_attn import torch_backend

    monkeypatch.setattr(torch_backend, "FOLD_MIN_ROWS_X_SLOTS", 0)
    tensors, kwargs = make_grouped_inputs(case, kv_heads)
    check_against_reference(case, torch.float32, "torch", tensors_kwargs=(tensors, kwargs))
