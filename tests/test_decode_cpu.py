"""The torch backend's C decoding step (prefix_attn/decode_cpu.c): small fp32 CPU calls with one query per row
whose rows see one task's prefix run in one C call; the output, lse and every gradient (the backward is the fused
path's, from the C step's output and lse) are the float64 reference's, with shared prefixes, a bank with one task
in use, prefix_lens, grouped KV heads, every mask kind, rows that see only the prefix or nothing, odd head dims
and HF's strided views. Other calls (larger, half precision, several tasks, an innermost stride other than 1)
take the fused kernel; without a C compiler every call does, after one warning."""
import warnings

import pytest
import torch

from prefix_attn import c_library, decode_cpu, prefix_attn_func, torch_backend
from prefix_attn.api import causal_attention_heads_first
from prefix_attn.reference import prefix_attn_ref
from tests.helpers import ATOL, Case, check_against_reference, make_inputs, max_err
from tests.test_gqa_torch import make_grouped_inputs

DECODING = [
    Case(P=10, Lq=1, Lk=17, B=3),
    Case(P=10, Lq=1, Lk=17, B=3, mask="left"),  # left-padded generate
    Case(P=6, Lq=1, Lk=9, B=3, mask="holes", causal=False),
    Case(P=6, Lq=1, Lk=8, B=2, mask="empty_row"),  # row 0 sees only the prefix
    Case(P=0, Lq=1, Lk=8, B=2, mask="empty_row"),  # row 0 sees nothing: out 0, lse -inf
    Case(P=7, Lq=1, Lk=5, D=20),  # a head dim that is no multiple of the C dot product's 8 lanes
    Case(P=7, Lq=1, Lk=5, D=24, H=3, strided=True),  # GPT-2's fused-projection views
    Case(P=9, T=3, B=1, Lq=1, Lk=6),  # a bank with one row: one task in use
    Case(P=9, T=1, B=3, Lq=1, Lk=6, prefix_lens=True),  # a bank of one task, some slots visible
    Case(P=5, Lq=1, Lk=4, B=2, prefix_lens=True),  # a shared prefix with prefix_lens
]


class _CSteps:
    """Counts decode_cpu.decode's calls that computed the step (not None)."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = decode_cpu.decode

        def counted(*args, **kwargs):
            found = real(*args, **kwargs)
            self.count += found is not None
            return found

        monkeypatch.setattr(decode_cpu, "decode", counted)


def _require_c():
    if decode_cpu.DECODE.get() is None:
        pytest.skip(f"the C decoding step could not be built here: {decode_cpu.DECODE.unavailable}")


@pytest.mark.parametrize("case", DECODING, ids=str)
def test_small_decoding_calls_run_in_c_and_match_the_reference(monkeypatch, case):
    _require_c()
    steps = _CSteps(monkeypatch)
    out, lse, _ = check_against_reference(case, torch.float32, "torch", with_dlse=False)
    assert steps.count == 1
    if case.mask == "empty_row" and not case.P:
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_kv_heads(monkeypatch, kv_heads):
    _require_c()
    steps = _CSteps(monkeypatch)
    case = Case(H=4, P=10, Lq=1, Lk=11, B=3, mask="left")
    check_against_reference(case, torch.float32, "torch", tensors_kwargs=make_grouped_inputs(case, kv_heads))
    assert steps.count == 1


def test_the_entry_and_the_public_function_run_the_same_c_step(monkeypatch):
    """Transformers' heads-first layer call and prefix_attn_func on the transposes: the same C step, the same
    bits, without and with the lse."""
    _require_c()
    steps = _CSteps(monkeypatch)
    tensors, kwargs = make_inputs(DECODING[1], torch.float32, requires_grad=False)
    kwargs.pop("causal")
    q, k, v = (tensors[name].transpose(1, 2) for name in ("q", "k", "v"))
    with torch.no_grad():
        out = causal_attention_heads_first(q, k, v, tensors["prefix_k"], tensors["prefix_v"], None,
                                           kwargs["attention_mask"], 0.3, 0.0)
    public, lse = prefix_attn_func(**tensors, **kwargs, softmax_scale=0.3, return_lse=True)
    assert steps.count == 2 and torch.equal(out, public) and out.is_contiguous() and lse.is_contiguous()
    assert torch.equal(out, prefix_attn_func(**tensors, **kwargs, softmax_scale=0.3))


def test_a_nan_query_gives_nan_not_a_row_that_sees_nothing():
    _require_c()
    tensors, kwargs = make_inputs(Case(P=4, Lq=1, Lk=5), torch.float32, requires_grad=False)
    tensors["q"][1] = float("nan")
    out = prefix_attn_func(**tensors, **kwargs, backend="torch")
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()


@pytest.mark.parametrize("what", ["larger", "bfloat16", "two tasks", "head_dim stride 2", "two queries"])
def test_other_calls_take_the_fused_kernel(monkeypatch, what):
    steps = _CSteps(monkeypatch)
    fused = []
    real = torch_backend._forward_fused_cpu
    monkeypatch.setattr(torch_backend, "_forward_fused_cpu", lambda *a, **kw: fused.append(1) or real(*a, **kw))
    case = {"larger": Case(P=40, Lq=1, Lk=64, B=4, H=4, D=32),  # 4 * 4 * 104 * 32 > DECODE_C_MAX_MACS
            "two tasks": Case(P=9, T=3, B=6, Lq=1, Lk=6),
            "two queries": Case(P=5, Lq=2, Lk=6)}.get(what, Case(P=5, Lq=1, Lk=6))
    dtype = torch.bfloat16 if what == "bfloat16" else torch.float32
    tensors, kwargs = make_inputs(case, dtype, requires_grad=False)
    if what == "two tasks":
        assert kwargs["prefix_idx"].unique().numel() > 1
    if what == "head_dim stride 2":
        tensors["q"] = torch.repeat_interleave(tensors["q"], 2, dim=-1)[..., ::2]
    if what == "larger":
        assert case.B * case.H * (case.P + case.Lk) * case.D > torch_backend.DECODE_C_MAX_MACS
    out = prefix_attn_func(**tensors, **kwargs, backend="torch")
    assert steps.count == 0 and fused == [1]
    ref = prefix_attn_ref(**{name: x.double() for name, x in tensors.items()}, **kwargs)
    low = prefix_attn_ref(**tensors, **kwargs)
    assert max_err(out, ref) <= 2 * max_err(low, ref) + ATOL[dtype]


def test_without_a_compiler_decoding_takes_the_fused_kernel(monkeypatch, tmp_path):
    """No C compiler: one warning that says so, then every decoding call runs on the fused kernel, with the
    reference's result."""
    monkeypatch.setenv("PREFIX_ATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(c_library, "find_compiler", lambda: None)
    decode_cpu.DECODE.reset()
    try:
        tensors, kwargs = make_inputs(DECODING[1], torch.float32, requires_grad=False)
        ref = prefix_attn_ref(**{name: x.double() for name, x in tensors.items()}, **kwargs)
        with pytest.warns(RuntimeWarning, match="decoding through PyTorch's fused CPU attention instead"):
            first = prefix_attn_func(**tensors, **kwargs, backend="torch")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning per process
            second = prefix_attn_func(**tensors, **kwargs, backend="torch")
        assert "no C compiler found" in decode_cpu.DECODE.unavailable
        assert torch.equal(first, second) and max_err(first, ref) <= 2e-5
    finally:
        decode_cpu.DECODE.reset()
