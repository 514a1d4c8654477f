"""The attention function's entry, prefix_attn.api.causal_attention_heads_first: transformers' heads-first
tensors on CPU go to the torch backend without the public function's layers (as they are when no autograd
node is needed on the fused path: decoding, evaluation; else the same autograd node); CUDA, compiled and
torch.func calls go through prefix_attn_func. Oracle: the float64 reference; and the same bits as
prefix_attn_func on the transposes, outputs and gradients, with the same checks and errors."""
import pytest
import torch

from prefix_attn import api, prefix_attn_func, torch_backend
from prefix_attn.api import causal_attention_heads_first
from prefix_attn.reference import prefix_attn_ref
from tests.helpers import ATOL, Case, make_inputs, max_err

CASES = [
    Case(P=10, Lq=1, Lk=17, B=3),  # a decode step
    Case(P=10, Lq=1, Lk=17, B=3, mask="left"),  # left-padded generate
    Case(P=9, T=3, B=4, Lq=1, Lk=12),  # a bank: one part per task in use
    Case(P=9, T=3, B=4, Lq=5, Lk=12, mask="holes"),  # several queries, bottom-right causal, a bank
    Case(P=10, Lq=7, Lk=7, strided=True),  # a prefill over GPT-2's fused-projection views
    Case(P=64, B=4, Lq=4, Lk=10),  # B * Lq * P = 1024: the prefix part's query rows as one batch
    Case(P=0, Lq=3, Lk=9, mask="right"),  # no prefix
    Case(P=6, Lq=1, Lk=8, B=2, mask="empty_row"),  # a row that sees only the prefix
]


def _heads_first(tensors, kwargs):
    """The entry's positional arguments for make_inputs' (B, L, H, D) tensors: their heads-first views."""
    return (tensors["q"].transpose(1, 2), tensors["k"].transpose(1, 2), tensors["v"].transpose(1, 2),
            tensors.get("prefix_k"), tensors.get("prefix_v"), kwargs.get("prefix_idx"), kwargs.get("attention_mask"))


class _PublicCalls:
    def __init__(self, monkeypatch):
        self.count = 0
        real = api.prefix_attn_func

        def counted(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(api, "prefix_attn_func", counted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_without_autograd_the_backend_takes_the_heads_first_tensors(monkeypatch, case, dtype):
    tensors, kwargs = make_inputs(case, dtype, requires_grad=False)
    public = _PublicCalls(monkeypatch)
    with torch.no_grad():
        out = causal_attention_heads_first(*_heads_first(tensors, kwargs), 0.3, 0.0)
    assert public.count == 0  # the direct route ran
    kwargs.pop("causal")
    want = prefix_attn_func(**tensors, **kwargs, softmax_scale=0.3)
    assert out.shape == (case.B, case.Lq, case.H, case.D) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, want)  # the same kernels on the same memory
    ref = prefix_attn_ref(**{k: v.double() for k, v in tensors.items()}, **kwargs, softmax_scale=0.3)
    low = prefix_attn_ref(**tensors, **kwargs, softmax_scale=0.3)
    assert max_err(out, ref) <= 2 * max_err(low, ref) + ATOL[dtype]


TRAINING_CASES = [
    Case(P=10, B=2, Lq=9, Lk=9),  # GPT-2's training call: a shared prefix, equal heads
    Case(P=7, B=3, Lq=6, Lk=6, mask="left", strided=True),  # padded, over fused-projection views
    Case(P=9, T=3, B=4, Lq=5, Lk=12, mask="holes"),  # a bank, Lq < Lk
    Case(P=6, B=2, Lq=7, Lk=7, H=4),  # grouped KV heads (Llama): see _grouped_kv
]


def _grouped_kv(tensors, kv_heads: int):
    """The case's tensors with k, v and the prefix cut to their first kv_heads heads (new leaves)."""
    cut = {"k": lambda t: t[:, :, :kv_heads], "v": lambda t: t[:, :, :kv_heads],
           "prefix_k": lambda t: t[:, :kv_heads], "prefix_v": lambda t: t[:, :kv_heads]}
    return {name: cut[name](t).detach().requires_grad_() if name in cut else t for name, t in tensors.items()}


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("case", TRAINING_CASES, ids=str)
def test_with_autograd_the_same_node_runs_without_the_public_function(monkeypatch, case, dropout_p):
    """A training call: the public function's layers skipped, its autograd node and backend run; output and
    every gradient equal prefix_attn_func's on the transposes bit for bit (dropout: the same mask, drawn
    from the same seed), and the float64 reference's within the bound."""
    tensors, kwargs = make_inputs(case, torch.float32)
    if case.H == 4:
        tensors = _grouped_kv(tensors, 2)
    kwargs.pop("causal")
    dout = torch.randn(case.B, case.Lq, case.H, case.D, generator=torch.Generator().manual_seed(1))
    public = _PublicCalls(monkeypatch)
    torch.manual_seed(0)
    out = causal_attention_heads_first(*_heads_first(tensors, kwargs), None, dropout_p)
    grads = torch.autograd.grad(out, list(tensors.values()), dout)
    assert public.count == 0
    torch.manual_seed(0)
    want = api.prefix_attn_func(**tensors, **kwargs, dropout_p=dropout_p)
    assert torch.equal(out, want)
    for got, expected in zip(grads, torch.autograd.grad(want, list(tensors.values()), dout)):
        assert torch.equal(got, expected)
    if dropout_p == 0.0:
        ref = prefix_attn_ref(**{k: v.double() for k, v in tensors.items()}, **kwargs)
        ref_grads = torch.autograd.grad(ref, [t for t in tensors.values()], dout.double())
        assert max_err(out, ref) < 1e-5
        for name, got, expected in zip(tensors, grads, ref_grads):
            assert max_err(got, expected) < 5e-5, name


def test_dropout_without_autograd_runs_the_backend_with_the_same_bits(monkeypatch):
    """Dropout under no_grad (a train-mode model evaluated without gradients) is not the fused path: the
    backend's forward runs directly, with the mask the public function draws from the same seed."""
    case = CASES[3]
    tensors, kwargs = make_inputs(case, torch.float32, requires_grad=False)
    kwargs.pop("causal")
    public = _PublicCalls(monkeypatch)
    with torch.no_grad():
        torch.manual_seed(0)
        dropped = causal_attention_heads_first(*_heads_first(tensors, kwargs), None, 0.25)
        assert public.count == 0
        torch.manual_seed(0)
        assert torch.equal(dropped, api.prefix_attn_func(**tensors, **kwargs, dropout_p=0.25))


def test_compiled_and_torch_func_calls_go_through_the_public_function(monkeypatch):
    """torch.func transforms need the public function's functorch node; a call seen while torch.compile traces
    takes its custom op: neither takes the direct route."""
    tensors, kwargs = make_inputs(TRAINING_CASES[0], torch.float32)
    public = _PublicCalls(monkeypatch)
    q, k, v, prefix_k, prefix_v, _, _ = _heads_first(tensors, kwargs)

    def loss(q):
        return causal_attention_heads_first(q, k, v, prefix_k, prefix_v, None, None, None, 0.0).sum()

    grad = torch.func.grad(loss)(q.detach())
    assert public.count == 1
    torch.testing.assert_close(grad, torch.autograd.grad(loss(q), q)[0])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        causal_attention_heads_first(q, k, v, prefix_k, prefix_v, None, None, None, 0.0)
    assert public.count == 2  # the torch.func call and this one (the eager comparison took the direct route)


def test_checks_and_errors_are_the_public_functions(monkeypatch):
    tensors, kwargs = make_inputs(Case(P=5, T=2, B=3, Lq=1, Lk=6), torch.float32, requires_grad=False)
    q, k, v, prefix_k, prefix_v, prefix_idx, _ = _heads_first(tensors, kwargs)
    with torch.no_grad():
        causal_attention_heads_first(q, k, v, prefix_k, prefix_v, prefix_idx, None, None, 0.0)  # checked, kept
        with pytest.raises(ValueError, match="prefix_k has 1 heads but k has 2"):
            causal_attention_heads_first(q, k, v, prefix_k[:, :, :1], prefix_v[:, :, :1], prefix_idx, None, None, 0.0)
        with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
            causal_attention_heads_first(q, k.to("meta"), v.to("meta"), prefix_k, prefix_v, prefix_idx, None, None, 0.0)
        with pytest.raises(ValueError, match="prefix_k is on meta but q is on cpu"):
            causal_attention_heads_first(q, k, v, prefix_k.to("meta"), prefix_v.to("meta"), prefix_idx, None, None,
                                         0.0)
        with pytest.raises(TypeError, match="k has dtype torch.float16 but q has torch.float32"):
            causal_attention_heads_first(q, k.half(), v.half(), prefix_k, prefix_v, prefix_idx, None, None, 0.0)
        with pytest.raises(ValueError, match="attention_mask must have shape"):
            causal_attention_heads_first(q, k, v, prefix_k, prefix_v, prefix_idx, torch.ones(3, 5, dtype=torch.bool),
                                         None, 0.0)
        # Index values are read on every call (once per tensor), not cached with the signature.
        with pytest.raises(ValueError, match="prefix_idx has values in"):
            causal_attention_heads_first(q, k, v, prefix_k, prefix_v, torch.tensor([0, 2, 1]), None, None, 0.0)
        # The backend follows $PREFIX_ATTN_BACKEND on every call, also for a signature seen before.
        monkeypatch.setenv("PREFIX_ATTN_BACKEND", "triton")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
            causal_attention_heads_first(q, k, v, prefix_k, prefix_v, prefix_idx, None, None, 0.0)


def test_a_call_checks_strides_nowhere_on_the_direct_route(monkeypatch):
    """The direct route's signatures leave strides out: one entry serves GPT-2's fused-projection views and
    contiguous tensors of the same shapes, and both compute what the public function does."""
    monkeypatch.setattr(api, "_CPU_CALLS", {})
    case = Case(P=4, Lq=3, Lk=5, strided=True)
    strided, kwargs = make_inputs(case, torch.float32, requires_grad=False)
    contiguous = {name: t.contiguous() for name, t in strided.items()}
    kwargs.pop("causal")
    with torch.no_grad():
        for tensors in (strided, contiguous):
            out = causal_attention_heads_first(*_heads_first(tensors, kwargs), None, 0.0)
            assert torch.equal(out, prefix_attn_func(**tensors, **kwargs))
    assert len(api._CPU_CALLS) == 1


def test_the_backend_keeps_one_forward_for_both_layouts(monkeypatch):
    """forward_unchecked (the op's layout) and the heads-first route both run _forward_fused_cpu (a prefill: small
    fp32 decoding calls run in C, from both layouts too, tests/test_decode_cpu.py)."""
    ran = []
    real = torch_backend._forward_fused_cpu
    monkeypatch.setattr(torch_backend, "_forward_fused_cpu", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    tensors, kwargs = make_inputs(CASES[4], torch.float32, requires_grad=False)
    kwargs.pop("causal")
    with torch.no_grad():
        causal_attention_heads_first(*_heads_first(tensors, kwargs), None, 0.0)
        prefix_attn_func(**tensors, **kwargs)
    assert ran == [1, 1]


def test_a_decoding_loop_stays_on_one_signature(monkeypatch):
    """Keys that grow by one per step keep the signature (it holds of seqlen_k only how it compares); the
    sizes the backend gets follow every step, and what the checks refuse is still refused after hits."""
    monkeypatch.setattr(api, "_CPU_CALLS", {})
    g = torch.Generator().manual_seed(0)
    B, H, D, P = 3, 2, 16, 5
    q = torch.randn(B, H, 1, D, generator=g)
    prefix_k, prefix_v = torch.randn(P, H, D, generator=g), torch.randn(P, H, D, generator=g)
    with torch.no_grad():
        for seqlen_k in (4, 5, 6, 9):
            k, v = torch.randn(B, H, seqlen_k, D, generator=g), torch.randn(B, H, seqlen_k, D, generator=g)
            mask = torch.ones(B, seqlen_k, dtype=torch.bool)
            mask[0, :2] = False
            for _ in range(2):  # two layers
                out = causal_attention_heads_first(q, k, v, prefix_k, prefix_v, None, mask, None, 0.0)
                want = prefix_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), prefix_k, prefix_v,
                                        attention_mask=mask)
                assert torch.equal(out, want)
        assert len(api._CPU_CALLS) == 1
        with pytest.raises(ValueError, match="attention_mask must have shape"):
            causal_attention_heads_first(q, k, v, prefix_k, prefix_v, None, mask[:, 1:], None, 0.0)
        with pytest.raises(ValueError, match="k and v must have the same shape"):
            causal_attention_heads_first(q, k, v[:, :, 1:], prefix_k, prefix_v, None, mask, None, 0.0)
        with pytest.raises(ValueError, match="queries must be the last Lq"):
            causal_attention_heads_first(torch.randn(B, H, 10, D), k, v, prefix_k, prefix_v, None, None, None, 0.0)
        with pytest.raises(ValueError, match="must be 4-D"):
            causal_attention_heads_first(q, k[0], v[0], prefix_k, prefix_v, None, None, None, 0.0)


def test_sizes_returned_are_the_calls_own_when_threads_share_an_entry(monkeypatch):
    """Regression: the entry's sizes follow the latest seqlen_k; a call returns its own, never the shared
    template another thread may be overwriting."""
    monkeypatch.setattr(api, "_CPU_CALLS", {})
    q = torch.randn(2, 2, 1, 16)
    sizes = []
    with torch.no_grad():
        for seqlen_k in (5, 7, 5):
            k = torch.randn(2, 2, seqlen_k, 16)
            dims, _, _ = api._cpu_call(q, k, k, None, None, None, None, None, 0.0)
            sizes.append(dims.seqlen_k)
        held = api._cpu_call(q, k, k, None, None, None, None, None, 0.0)
        api._cpu_call(q, torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16), None, None, None, None, None, 0.0)
    assert sizes == [5, 7, 5] and held[0].seqlen_k == 5  # the later call did not change what was returned
