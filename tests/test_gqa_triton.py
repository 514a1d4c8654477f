"""Grouped KV heads (k, v, prefix with Hkv heads, q with H = Hkv * G) in the Triton forward and backward
kernels: outputs, lse and every gradient vs the float64 reference (which repeats the KV heads itself),
shared prefix and bank with prefix_lens, every mask kind, causal and not, dropout drawn per QUERY head
(the same bits as the torch backend), the prefix-gradient reduction over the group with forced many
pieces, run-to-run determinism, no expanded KV, and decode-shaped calls through the public op."""
import pytest
import torch

from prefix_attn import prefix_attn_func, triton_launch
from prefix_attn.dropout import draw_rng_state, dropout_keep_mask
from prefix_attn.reference import prefix_attn_ref
from tests.helpers import Case, ShapeLog, check_against_reference, max_err, run_op, to64
from tests.test_gqa_torch import make_grouped_inputs

H = 4
KV_HEADS = [1, H // 2]  # MQA (G = 4) and G = 2

# Lq > 16 everywhere but the dropout cases: the main forward kernel runs, not the decode path.
CASES = [
    Case(H=H, D=16, P=0, Lq=17, Lk=17),
    Case(H=H, D=16, P=0, Lq=17, Lk=20, mask="empty_row", causal=False),
    Case(H=H, D=16, P=10, Lq=18, Lk=18, mask="left", B=3),
    Case(H=H, D=16, P=7, Lq=17, Lk=21, mask="right", causal=False),
    Case(H=H, D=16, P=9, T=3, B=4, Lq=17, Lk=17, prefix_lens=True, mask="holes"),
    Case(H=H, D=16, P=20, T=2, B=3, Lq=17, Lk=30, mask="holes", causal=False),
    Case(H=H, D=16, P=10, Lq=19, Lk=19, strided=True),  # GPT-2-like views with the fused row stride
]


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_against_reference(case, kv_heads):
    tensors, kwargs = make_grouped_inputs(case, kv_heads)
    _, _, grads = check_against_reference(case, torch.float32, "triton", tensors_kwargs=(tensors, kwargs))
    for name, g in zip(tensors, grads):
        assert g.shape == tensors[name].shape, name  # dK, dV, dprefix have the KV heads


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=str)
def test_lse_gradient(case, kv_heads):
    tensors, kwargs = make_grouped_inputs(case, kv_heads)
    check_against_reference(case, torch.float32, "triton", with_dlse=True, tensors_kwargs=(tensors, kwargs))


def test_fp16_against_reference():
    case = Case(H=H, D=16, P=9, T=3, B=3, Lq=17, Lk=19, prefix_lens=True, mask="left")
    for kv_heads in KV_HEADS:
        tensors, kwargs = make_grouped_inputs(case, kv_heads, torch.float16)
        check_against_reference(case, torch.float16, "triton", tensors_kwargs=(tensors, kwargs))


def test_head_dim_128():
    case = Case(H=H, D=128, P=5, B=1, Lq=17, Lk=17, mask="left")
    tensors, kwargs = make_grouped_inputs(case, 2)
    check_against_reference(case, torch.float32, "triton", tensors_kwargs=(tensors, kwargs))


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("case", [Case(H=H, D=16, P=10, Lq=17, Lk=17, mask="left"),
                                  Case(H=H, D=16, P=21, T=3, B=3, prefix_lens=True, Lq=9, Lk=20),
                                  Case(H=H, D=16, P=0, Lq=5, Lk=7, causal=False, mask="holes")], ids=str)
def test_dropout_per_query_head_matches_torch_backend_and_reference(case, kv_heads):
    """Under dropout (which always takes the main kernels, also for Lq <= 16): the Triton and torch
    backends draw the same keep-mask (per query head) from the same seed, and both equal the
    reference run with that mask, outputs, lse and every gradient."""
    p = 0.25
    tensors, kwargs = make_grouped_inputs(case, kv_heads)
    dout = torch.randn_like(tensors["q"])
    results = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(99)
        results[backend] = run_op(lambda **kw: prefix_attn_func(**kw, dropout_p=p, backend=backend), tensors,
                                  kwargs, dout)
    torch.manual_seed(99)
    mask = dropout_keep_mask(draw_rng_state(tensors["q"].device), case.B, case.H, case.Lq, case.P, case.Lk, p)
    ref_out, ref_lse, ref_grads = run_op(lambda **kw: prefix_attn_ref(**kw, dropout_p=p, dropout_mask=mask),
                                         to64(tensors), kwargs, dout.double())
    names = ["out", "lse", *tensors]
    tri, tor = results["triton"], results["torch"]
    for name, a, b, ref in zip(names, [tri[0], tri[1], *tri[2]], [tor[0], tor[1], *tor[2]],
                               [ref_out, ref_lse, *ref_grads]):
        assert a.shape == ref.shape, name
        assert max_err(a, ref) < 5e-5, name
        assert max_err(a, b) < 5e-5, name
    if kv_heads < case.H:  # the mask of the KV heads' indexing would give another output
        other = mask[:, torch.arange(case.H) // (case.H // kv_heads)]
        wrong = prefix_attn_ref(**to64(tensors), **kwargs, dropout_p=p, dropout_mask=other)
        assert max_err(tri[0], wrong) > 1e-3


def _launch_bwd(tensors, kwargs, dout, items_per_piece=None, dropout_p=0.0, rng_state=None):
    t = {k: v.detach() for k, v in tensors.items()}
    out, lse = triton_launch.prefix_attn_fwd(**t, **kwargs, dropout_p=dropout_p, rng_state=rng_state)
    grads = triton_launch.prefix_attn_bwd(dout, None, **t, **kwargs, out=out, lse=lse, dropout_p=dropout_p,
                                          rng_state=rng_state, items_per_piece=items_per_piece)
    return (out, lse, *grads)


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("case", [Case(H=H, D=16, P=20, B=3, Lq=33, Lk=33, mask="left"),
                                  Case(H=H, D=16, P=9, T=3, B=4, Lq=17, Lk=17, prefix_lens=True, mask="holes")],
                         ids=str)
def test_prefix_gradient_over_many_pieces(case, kv_heads):
    """The prefix-gradient reduction over (sequences x the group's query heads x query blocks) cut
    into one item per piece, a few, and one piece per task: each equals the float64 reference, and
    one item per piece means pieces that hold a single query head of a group."""
    tensors, kwargs = make_grouped_inputs(case, kv_heads)
    dout = torch.randn_like(tensors["q"])
    _, _, ref_grads = run_op(prefix_attn_ref, to64(tensors), kwargs, dout.double())
    for items_per_piece in (1, 3, 1000):
        dpk, dpv = _launch_bwd(tensors, kwargs, dout, items_per_piece)[5:]
        assert dpk.shape == tensors["prefix_k"].shape
        assert max_err(dpk, ref_grads[3]) < 1e-4, items_per_piece
        assert max_err(dpv, ref_grads[4]) < 1e-4, items_per_piece


@pytest.mark.parametrize("kv_heads", KV_HEADS)
def test_two_runs_are_bitwise_equal(kv_heads):
    case = Case(H=H, D=16, P=9, T=3, B=4, Lq=17, Lk=20, prefix_lens=True, mask="left")
    tensors, kwargs = make_grouped_inputs(case, kv_heads)
    dout = torch.randn_like(tensors["q"])
    rng = draw_rng_state(tensors["q"].device)
    first = _launch_bwd(tensors, kwargs, dout, items_per_piece=2, dropout_p=0.2, rng_state=rng)
    second = _launch_bwd(tensors, kwargs, dout, items_per_piece=2, dropout_p=0.2, rng_state=rng)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_grouped_equals_equal_heads_with_repeated_kv():
    """The grouped call equals the equal-heads call on K, V and prefix repeated over each group
    (what FlashAttention's GQA backward computes by expanding): out, lse and dQ, and dK, dV, dprefix
    equal the expanded ones summed over each group."""
    case = Case(H=H, D=16, P=10, T=2, B=3, Lq=17, Lk=19, mask="right")
    kv_heads = 2
    group = H // kv_heads
    tensors, kwargs = make_grouped_inputs(case, kv_heads)
    dout = torch.randn_like(tensors["q"])
    grouped = _launch_bwd(tensors, kwargs, dout)
    expanded = {k: (v if k == "q" else v.repeat_interleave(group, dim=-2)) for k, v in tensors.items()}
    equal = _launch_bwd(expanded, kwargs, dout)
    for a, b in zip(grouped[:3], equal[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(grouped[3:], equal[3:]):
        summed = b.unflatten(-2, (kv_heads, group)).sum(-2)
        torch.testing.assert_close(a, summed, atol=1e-5, rtol=1e-5)


def test_kv_heads_are_never_expanded():
    """No tensor the Triton call allocates (forward and backward) has the query heads next to the
    key length or prefix length: K, V and the prefix are read per KV head, never repeated."""
    B, Hq, kv_heads, Lq, Lk, P, D = 2, 6, 2, 17, 37, 11, 16
    q = torch.randn(B, Lq, Hq, D, requires_grad=True)
    k, v = (torch.randn(B, Lk, kv_heads, D, requires_grad=True) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(3, P, kv_heads, D, requires_grad=True) for _ in range(2))
    log = ShapeLog()
    with log:
        out = prefix_attn_func(q, k, v, prefix_k, prefix_v, prefix_idx=torch.tensor([2, 0]), dropout_p=0.2,
                               backend="triton")
        out.square().sum().backward()
    assert log.shapes
    expanded = [(f, s) for f, s in log.shapes if Hq in s and D in s and (Lk in s or P in s)]
    assert not expanded, expanded
    assert k.grad.shape == k.shape and prefix_k.grad.shape == prefix_k.shape


@pytest.mark.parametrize("with_prefix", [False, True])
def test_decode_shaped_grouped_calls_through_the_public_op(with_prefix):
    """Grouped heads on the Triton decode path (Lq <= 16, no dropout) through prefix_attn_func and
    the launcher, vs the float64 reference (regression: that path refused them before it computed them)."""
    q = torch.randn(2, 3, 4, 16)
    k, v = torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    prefix = (torch.randn(5, 2, 16), torch.randn(5, 2, 16)) if with_prefix else (None, None)
    ref = prefix_attn_ref(*(x.double() if x is not None else None for x in (q, k, v, *prefix)))
    out = prefix_attn_func(q, k, v, *prefix, backend="triton")
    assert max_err(out, ref) < 1e-5
    out, _ = triton_launch.prefix_attn_fwd(q, k, v, *prefix)
    assert max_err(out, ref) < 1e-5
