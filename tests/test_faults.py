"""Inputs that real programs produce and that must end in a correct result or a clear error
(issue 11): double backward, garbage in bank slots that prefix_lens excludes, a softmax_scale that
overflows float32, damaged prefix files."""
import math

import pytest
import torch
from safetensors.torch import save_file

from prefix_attn import ops, prefix_attn_func
from prefix_attn.autograd import DOUBLE_BACKWARD_ERROR
from prefix_attn.checks import MAX_SOFTMAX_SCALE
from prefix_attn.reference import prefix_attn_ref
from tests.conftest import DEVICE
from tests.helpers import Case, check_against_reference, make_inputs, max_err

# ---- double backward -------------------------------------------------------------------------------

# A bank whose excluded slots hold NaN (as torch.empty may leave them), a padding mask, causal.
DOUBLE_CASE = Case(B=3, Lq=20, Lk=24, H=2, D=16, P=6, T=2, mask="left", prefix_lens=True)


def _fill_excluded(tensors, kwargs, value):
    """Write ``value`` into every bank slot that prefix_lens excludes (in place, before grads)."""
    lens = kwargs["prefix_lens"].tolist()
    with torch.no_grad():
        for name in ("prefix_k", "prefix_v"):
            bank = tensors[name] if tensors[name].dim() == 4 else tensors[name].unsqueeze(0)
            for t, n in enumerate(lens):
                bank[t, n:] = value
    return tensors


def _gradient_penalty(fn, tensors, kwargs, x):
    """Second-order gradient of a gradient penalty, as WGAN-GP or meta-learning compute it: q is a
    linear function of x, so d(penalty)/dx holds the op's second derivative."""
    w = torch.linspace(-1.0, 1.0, x.shape[-1] * x.shape[-1], dtype=x.dtype, device=x.device).reshape(x.shape[-1], -1)
    q = x @ w
    inputs = {**tensors, "q": q}
    out = fn(**inputs, **kwargs)
    dout = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    leaves = [x, tensors["k"], tensors["v"], tensors["prefix_k"], tensors["prefix_v"]]
    grads = torch.autograd.grad((out * dout).sum(), leaves, create_graph=True)
    penalty = sum((g.float() ** 2).sum() for g in grads)
    return torch.autograd.grad(penalty, leaves)


def _double_case_inputs(dtype):
    tensors, kwargs = make_inputs(DOUBLE_CASE, dtype)
    tensors = _fill_excluded(tensors, kwargs, float("nan"))
    x = tensors.pop("q").detach().requires_grad_(True)
    return tensors, kwargs, x


def test_double_backward_torch_backend_equals_float64_reference():
    tensors, kwargs, x = _double_case_inputs(torch.float32)
    got = _gradient_penalty(lambda **kw: prefix_attn_func(**kw, backend="torch"), tensors, kwargs, x)
    ref_tensors = {k: v.detach().double().requires_grad_(True) for k, v in tensors.items()}
    want = _gradient_penalty(prefix_attn_ref, ref_tensors, kwargs, x.detach().double().requires_grad_(True))
    for name, g, r in zip(["x", "k", "v", "prefix_k", "prefix_v"], got, want):
        assert torch.isfinite(g).all(), f"d2/d{name}: not finite"
        err = max_err(g, r)
        assert err <= 1e-4 * max(1.0, r.abs().max().item()), f"d2/d{name}: max error {err:.3g}"


@pytest.mark.parametrize("seqlen_q", [20, 3], ids=["training-path", "decode-path"])
def test_double_backward_triton_refuses(seqlen_q):
    """Before the fix the Triton backward's gradients had no graph: a loss on them silently missed
    the op's second-order terms (the result was wrong, without an error)."""
    tensors, kwargs, x = _double_case_inputs(torch.float32)
    x = x[:, -seqlen_q:].detach().requires_grad_(True)
    # First-order gradients under create_graph=True still work (and are right) ...
    w_out = prefix_attn_func(**{**tensors, "q": x}, **kwargs, backend="triton")
    grads = torch.autograd.grad(w_out.sum(), [x, tensors["prefix_k"]], create_graph=True)
    ref = torch.autograd.grad(prefix_attn_func(**{**tensors, "q": x}, **kwargs, backend="torch").sum(),
                              [x, tensors["prefix_k"]])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=2e-5)
    # ... differentiating them raises, naming the op.
    with pytest.raises(RuntimeError) as info:
        _gradient_penalty(lambda **kw: prefix_attn_func(**kw, backend="triton"), tensors, kwargs, x)
    assert str(info.value) == DOUBLE_BACKWARD_ERROR
    assert "prefix_attn_func(backend='triton')" in DOUBLE_BACKWARD_ERROR


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_double_backward_through_the_custom_op_raises(backend):
    """The torch.library path (what torch.compile traces) has no second-order formula: an error,
    never a silent result (torch.compile itself refuses double backward before that). With Triton
    it is the eager path's own error: both paths share one autograd formula."""
    tensors, kwargs, x = _double_case_inputs(torch.float32)
    q = x @ torch.eye(x.shape[-1], device=x.device)
    out, _, _ = ops.attention(q, tensors["k"], tensors["v"], tensors["prefix_k"], tensors["prefix_v"],
                              kwargs["prefix_idx"], kwargs["prefix_lens"], kwargs["attention_mask"], True, 0.25, 0.0,
                              backend)
    (dx,) = torch.autograd.grad(out.sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="attention_backward" if backend == "torch" else "differentiable once"):
        torch.autograd.grad((dx ** 2).sum(), [x])


# ---- garbage in excluded bank slots ----------------------------------------------------------------

GARBAGE_CASES = [
    Case(B=3, Lq=19, Lk=23, H=2, D=16, P=20, T=3, mask="left", prefix_lens=True),  # training path
    Case(B=3, Lq=3, Lk=23, H=2, D=16, P=20, T=3, prefix_lens=True),  # decode path (Lq <= 16)
    Case(B=2, Lq=19, Lk=19, H=2, D=32, P=20, prefix_lens=True),  # a shared prefix with prefix_lens (1,)
]


def _garbage_inputs(case, value):
    tensors, kwargs = make_inputs(case, torch.float32)
    lens = torch.tensor([case.P, 7, 0][: max(case.T, 1)], device=DEVICE)
    kwargs["prefix_lens"] = lens
    if case.T:
        kwargs["prefix_idx"] = torch.tensor([0, 1, 2, 1][: case.B], device=DEVICE) % case.T
    if case.T == 0:
        kwargs["prefix_lens"] = torch.tensor([11], device=DEVICE)
    return _fill_excluded(tensors, kwargs, value), kwargs


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", GARBAGE_CASES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_excluded_slots_are_never_read(backend, case, value):
    tensors, kwargs = _garbage_inputs(case, value)
    out, lse, grads = check_against_reference(case, torch.float32, backend, with_dlse=True,
                                              tensors_kwargs=(tensors, kwargs))
    for name, x in zip(["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"], [out, *grads]):
        assert torch.isfinite(x).all(), f"{name} is not finite"
    # The gradient of an excluded slot is zero.
    lens = kwargs["prefix_lens"].tolist()
    for g in grads[3:]:
        bank = g if g.dim() == 4 else g.unsqueeze(0)
        for t, n in enumerate(lens):
            assert torch.equal(bank[t, n:], torch.zeros_like(bank[t, n:]))


def test_excluded_slots_with_dropout_backends_agree():
    """With dropout (the torch backend mirrors the Triton mask bit for bit): finite and equal."""
    case = GARBAGE_CASES[0]
    results = []
    for backend in ("triton", "torch"):
        tensors, kwargs = _garbage_inputs(case, float("nan"))
        torch.manual_seed(3)
        out = prefix_attn_func(**tensors, **kwargs, dropout_p=0.2, backend=backend)
        grads = torch.autograd.grad(out.sum(), list(tensors.values()))
        results.append([out, *grads])
    for got, want in zip(*results):
        assert torch.isfinite(got).all() and torch.isfinite(want).all()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_reference_ignores_excluded_slots(value):
    """The oracle itself: garbage in excluded slots gives the same result as zeros there."""
    case = GARBAGE_CASES[0]
    dirty, kwargs = _garbage_inputs(case, value)
    clean = {k: v.detach().clone() for k, v in dirty.items()}
    _fill_excluded(clean, kwargs, 0.0)
    outs = []
    for tensors in (dirty, clean):
        t64 = {k: v.detach().double().requires_grad_(True) for k, v in tensors.items()}
        out, lse = prefix_attn_ref(**t64, **kwargs, return_lse=True)
        grads = torch.autograd.grad(out.sum() + lse.sum(), list(t64.values()))
        outs.append([out, lse, *grads])
    for got, want in zip(*outs):
        assert torch.equal(got, want)


# ---- softmax_scale that overflows float32 ----------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("scale", [1e39, -1e39, 2.4e38, 3.4e38, MAX_SOFTMAX_SCALE * 1.0001])
def test_softmax_scale_overflowing_float32_is_refused(backend, scale):
    tensors, kwargs = make_inputs(Case(B=1, Lq=4, Lk=4, H=1, D=16, P=2), requires_grad=False)
    assert math.isfinite(scale)
    with pytest.raises(ValueError, match="softmax_scale .* overflows float32"):
        prefix_attn_func(**tensors, **kwargs, softmax_scale=scale, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_largest_softmax_scale_is_accepted(backend):
    """At the bound the kernels' factor is finite: with q.k small enough the result is right."""
    case = Case(B=1, Lq=4, Lk=4, H=1, D=16, P=2)
    tensors, kwargs = make_inputs(case, requires_grad=False)
    tensors["q"] = tensors["q"] * 1e-37  # normal floats; softmax_scale * q.k stays O(100)
    scale = MAX_SOFTMAX_SCALE * 0.9999
    out = prefix_attn_func(**tensors, **kwargs, softmax_scale=scale, backend=backend)
    ref = prefix_attn_ref(**{k: v.double() for k, v in tensors.items()}, **kwargs, softmax_scale=scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


# ---- damaged prefix files --------------------------------------------------------------------------

def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50, attn_implementation="eager")
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def saved_prefix(tmp_path):
    """(path of a good prefix file, its tensor, its metadata)."""
    from safetensors import safe_open

    from prefix_attn import PrefixTuning

    path = tmp_path / "good.safetensors"
    PrefixTuning(_tiny_gpt2(), 3, num_tasks=2).save_prefix(path)
    with safe_open(str(path), framework="pt") as handle:
        return path, handle.get_tensor("prefix"), handle.metadata()


def _load(path):
    from prefix_attn import PrefixTuning

    return PrefixTuning.load_prefix(_tiny_gpt2(), path)


def test_good_prefix_file_loads(saved_prefix):
    path, kv, _ = saved_prefix
    loaded = _load(path)
    assert torch.equal(loaded.prefix_encoder().detach(), kv)


@pytest.mark.parametrize("keep", [0.5, 0.98, 10], ids=["half", "last-bytes", "header"])
def test_truncated_prefix_file(saved_prefix, tmp_path, keep):
    path, _, _ = saved_prefix
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file"):
        _load(cut)


def _rewrite(tmp_path, tensors, metadata):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_prefix_file_with_an_extra_tensor(saved_prefix, tmp_path):
    _, kv, metadata = saved_prefix
    path = _rewrite(tmp_path, {"prefix": kv, "prefix_mlp": torch.zeros(3)}, metadata)
    with pytest.raises(ValueError, match=r"bad.safetensors holds tensors \['prefix', 'prefix_mlp'\]"):
        _load(path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float16, torch.float64])
def test_prefix_file_with_another_dtype(saved_prefix, tmp_path, dtype):
    _, kv, metadata = saved_prefix
    path = _rewrite(tmp_path, {"prefix": (kv * 100).to(dtype)}, metadata)
    with pytest.raises(ValueError, match=f"bad.safetensors: tensor 'prefix' has dtype {dtype}"):
        _load(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_prefix_file_with_non_finite_values(saved_prefix, tmp_path, value):
    _, kv, metadata = saved_prefix
    kv = kv.clone()
    kv[1, 0, 1, 2, 0, 5] = value
    path = _rewrite(tmp_path, {"prefix": kv}, metadata)
    with pytest.raises(ValueError, match="bad.safetensors: tensor 'prefix' holds non-finite values"):
        _load(path)


@pytest.mark.parametrize("key", ["n_layer", "n_head", "head_dim", "n_embd", "num_virtual_tokens", "num_tasks"])
def test_prefix_file_with_missing_metadata(saved_prefix, tmp_path, key):
    _, kv, metadata = saved_prefix
    path = _rewrite(tmp_path, {"prefix": kv}, {k: v for k, v in metadata.items() if k != key})
    with pytest.raises(ValueError, match=f"bad.safetensors: metadata has no '{key}'"):
        _load(path)


@pytest.mark.parametrize("key,value", [("num_tasks", "two"), ("num_virtual_tokens", "3.0"), ("n_layer", "-2"),
                                       ("num_tasks", "0"), ("head_dim", ""), ("n_head", "²")])
def test_prefix_file_with_malformed_metadata(saved_prefix, tmp_path, key, value):
    _, kv, metadata = saved_prefix
    path = _rewrite(tmp_path, {"prefix": kv}, {**metadata, key: value})
    with pytest.raises(ValueError, match=f"bad.safetensors: metadata {key}={value!r} is not a positive integer"):
        _load(path)
