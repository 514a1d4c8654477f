"""The attention function's entry, prefix_attn.api.causal_attention_heads_first: transformers' heads-first
tensors, handed to the torch backend as they are when no autograd node is needed on CPU (decoding,
evaluation), else through prefix_attn_func. Oracle: the float64 reference; and the same bits as
prefix_attn_func on the transposes, with the same checks and errors."""
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


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
def test_with_autograd_or_dropout_the_public_function_runs(monkeypatch, case):
    tensors, kwargs = make_inputs(case, torch.float32)
    public = _PublicCalls(monkeypatch)
    args = _heads_first(tensors, kwargs)
    out = causal_attention_heads_first(*args, None, 0.0)
    assert public.count == 1
    out.sum().backward()
    assert all(t.grad is not None for t in tensors.values())
    with torch.no_grad():
        torch.manual_seed(0)
        dropped = causal_attention_heads_first(*args, None, 0.25)
    assert public.count == 2
    kwargs.pop("causal")
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(dropped, prefix_attn_func(**tensors, **kwargs, dropout_p=0.25))


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
    monkeypatch.setattr(api, "_FUSED_CPU_CALLS", {})
    case = Case(P=4, Lq=3, Lk=5, strided=True)
    strided, kwargs = make_inputs(case, torch.float32, requires_grad=False)
    contiguous = {name: t.contiguous() for name, t in strided.items()}
    kwargs.pop("causal")
    with torch.no_grad():
        for tensors in (strided, contiguous):
            out = causal_attention_heads_first(*_heads_first(tensors, kwargs), None, 0.0)
            assert torch.equal(out, prefix_attn_func(**tensors, **kwargs))
    assert len(api._FUSED_CPU_CALLS) == 1


def test_the_backend_keeps_one_forward_for_both_layouts(monkeypatch):
    """forward_unchecked (the op's layout) and the heads-first route both run _forward_fused_cpu."""
    ran = []
    real = torch_backend._forward_fused_cpu
    monkeypatch.setattr(torch_backend, "_forward_fused_cpu", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    tensors, kwargs = make_inputs(CASES[0], torch.float32, requires_grad=False)
    kwargs.pop("causal")
    with torch.no_grad():
        causal_attention_heads_first(*_heads_first(tensors, kwargs), None, 0.0)
        prefix_attn_func(**tensors, **kwargs)
    assert ran == [1, 1]


def test_a_decoding_loop_stays_on_one_signature(monkeypatch):
    """Keys that grow by one per step keep the signature (it holds of seqlen_k only how it compares); the
    sizes the backend gets follow every step, and what the checks refuse is still refused after hits."""
    monkeypatch.setattr(api, "_FUSED_CPU_CALLS", {})
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
        assert len(api._FUSED_CPU_CALLS) == 1
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
    monkeypatch.setattr(api, "_FUSED_CPU_CALLS", {})
    q = torch.randn(2, 2, 1, 16)
    sizes = []
    with torch.no_grad():
        for seqlen_k in (5, 7, 5):
            k = torch.randn(2, 2, seqlen_k, 16)
            dims, _ = api._fused_cpu_call(q, k, k, None, None, None, None, None, 0.0)
            sizes.append(dims.seqlen_k)
        held = api._fused_cpu_call(q, k, k, None, None, None, None, None, 0.0)
        api._fused_cpu_call(q, torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16), None, None, None, None, None, 0.0)
    assert sizes == [5, 7, 5] and held[0].seqlen_k == 5  # the later call did not change what was returned
