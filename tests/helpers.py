"""Case construction and the accuracy oracle shared by the tests."""
import contextlib
import dataclasses
import zlib
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prefix_attn import prefix_attn_func, torch_backend
from prefix_attn.dropout import draw_rng_state, dropout_keep_mask
from prefix_attn.reference import prefix_attn_ref
from tests.conftest import DEVICE

# Absolute slack on top of the oracle (2x the error of the reference run in the same dtype).
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclasses.dataclass
class Case:
    B: int = 2
    Lq: int = 19
    Lk: int = 19
    H: int = 2
    D: int = 32
    P: int = 0
    T: int = 0  # 0: shared prefix (P, H, D); >0: bank of T tasks
    causal: bool = True
    mask: Optional[str] = None  # None, "left", "right", "holes", "empty_row"
    prefix_lens: bool = False
    strided: bool = False  # q, k, v as non-contiguous views, as HF hands them over

    def __str__(self):
        return "-".join(f"{k}{v}" for k, v in dataclasses.asdict(self).items())

    @property
    def launch_path(self) -> str:
        """Which way the op runs this case: "plain" (no prefix), "decode" (a few queries per sequence:
        the stacked-row decode kernels), "bank", "strided" (HF's transposed views) or "shared"."""
        if not self.P:
            return "plain"
        if self.Lq <= 16:
            return "decode"
        if self.T:
            return "bank"
        return "strided" if self.strided else "shared"


def one_case_per_launch_path(cases, with_prefix=True):
    """The first case of each launch path (with a prefix only, by default): low-precision rounding
    differs by path, not by shape, so this covers fp16 without re-running every fp32 case."""
    chosen = {}
    for case in cases:
        if case.P or not with_prefix:
            chosen.setdefault(case.launch_path, case)
    return list(chosen.values())


def make_inputs(case: Case, dtype=torch.float32, device=DEVICE, requires_grad=True, scale=1.0):
    # crc32, not hash(): str hashes are salted per process (PYTHONHASHSEED), which drew other inputs in every run and
    # let a data-dependent assertion fail now and then (a bank case whose tasks in use all drew prefix_lens 0).
    g = torch.Generator(device="cpu").manual_seed(zlib.crc32(str(case).encode()))

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    B, Lq, Lk, H, D = case.B, case.Lq, case.Lk, case.H, case.D
    if case.strided:
        # A fused (B, L, 3, H, D) projection as GPT-2 produces it: views with a 3*H*D row stride.
        qkv_q = rand(B, Lq, 3, H, D)
        qkv_k = rand(B, Lk, 3, H, D)
        q, k, v = qkv_q[:, :, 0], qkv_k[:, :, 1], qkv_k[:, :, 2]
    else:
        q, k, v = rand(B, Lq, H, D), rand(B, Lk, H, D), rand(B, Lk, H, D)
    tensors = {"q": q, "k": k, "v": v}
    kwargs = {"causal": case.causal}
    if case.P or case.T:
        shape = (case.T, case.P, H, D) if case.T else (case.P, H, D)
        tensors["prefix_k"], tensors["prefix_v"] = rand(*shape), rand(*shape)
        if case.T:
            kwargs["prefix_idx"] = torch.randint(0, case.T, (B,), generator=g).to(device)
        if case.prefix_lens:
            n = max(case.T, 1)
            kwargs["prefix_lens"] = torch.randint(0, case.P + 1, (n,), generator=g).to(device)
    if case.mask:
        mask = torch.ones(B, Lk, dtype=torch.bool)
        if case.mask == "left":
            for b in range(B):
                mask[b, : int(torch.randint(0, Lk // 2 + 1, (1,), generator=g))] = False
        elif case.mask == "right":
            for b in range(B):
                mask[b, Lk - int(torch.randint(0, Lk // 2 + 1, (1,), generator=g)):] = False
        elif case.mask == "holes":
            mask = torch.rand(B, Lk, generator=g) > 0.3
        elif case.mask == "empty_row":
            mask[0] = False
        kwargs["attention_mask"] = mask.to(device)
    if requires_grad:
        for t in tensors.values():
            t.requires_grad_(True)
    return tensors, kwargs


def _grad_inputs(tensors):
    return [t for t in tensors.values()]


def run_op(fn, tensors, kwargs, dout, dlse=None):
    """out, lse and the gradients of every input for loss = <out, dout> (+ <lse, dlse>)."""
    out, lse = fn(**tensors, **kwargs, return_lse=True)
    loss = (out.float() * dout.float()).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isneginf(lse), 0.0, lse).float() * dlse).sum()
    grads = torch.autograd.grad(loss, _grad_inputs(tensors), allow_unused=True)
    return out, lse, grads


def to64(tensors):
    return {k: v.detach().double().requires_grad_(True) for k, v in tensors.items()}


def to_dtype(tensors, dtype):
    return {k: v.detach().to(dtype).requires_grad_(True) for k, v in tensors.items()}


def max_err(a, b):
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), finite):
        return float("inf")
    if not finite.any():
        return 0.0
    return (a[finite] - b[finite]).abs().max().item() if a.numel() else 0.0


def check_against_reference(case: Case, dtype, backend, with_dlse=False, tensors_kwargs=None):
    """Output, lse and every gradient vs. a float64 reference, FlashAttention-style oracle:
    err(op) <= 2 * err(reference in the same dtype) + ATOL[dtype]."""
    tensors, kwargs = tensors_kwargs or make_inputs(case, dtype)
    dout = torch.randn(tensors["q"].shape, device=tensors["q"].device)
    dlse = torch.randn(case.B, case.H, case.Lq, device=dout.device) if with_dlse else None
    op = lambda **kw: prefix_attn_func(**kw, backend=backend)  # noqa: E731
    out, lse, grads = run_op(op, tensors, kwargs, dout.to(dtype), dlse)
    ref_out, ref_lse, ref_grads = run_op(prefix_attn_ref, to64(tensors), kwargs, dout.double(), dlse)
    low_out, low_lse, low_grads = run_op(prefix_attn_ref, to_dtype(tensors, dtype), kwargs, dout.to(dtype), dlse)
    names = ["out", "lse", *[f"d{k}" for k in tensors]]
    for name, got, ref, low in zip(names, [out, lse, *grads], [ref_out, ref_lse, *ref_grads],
                                   [low_out, low_lse, *low_grads]):
        assert got is not None, f"{name}: no gradient"
        assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        assert not torch.isnan(got).any(), f"{name}: NaN"
        err, low_err = max_err(got, ref), max_err(low, ref)
        finite = ref[torch.isfinite(ref)]  # none at all: a batch whose only row sees nothing (lse all -inf)
        bound = 2 * low_err + ATOL[dtype] * max(1.0, finite.abs().max().item() if finite.numel() else 1)
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (reference in {dtype}: {low_err:.3g})"
    return out, lse, grads


# ---- model-level helpers shared by the integration tests ---------------------------------------------

VOCAB = 100  # vocabulary of the tiny random models


def make_batch(padding=None, batch=3, length=9, seed=0, device="cpu", vocab=VOCAB):
    """(input_ids, attention_mask) (batch, length) of random tokens, padded with token 0.

    padding: None; "left" (row 0 loses 3 leading tokens, row 1 one, as generate() prompts are
    padded); "right" (row 0 loses 3 trailing tokens, the last row 2).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padding == "left":
        mask[0, :3] = 0
        mask[min(1, batch - 1), :1] = 0
    elif padding == "right":
        mask[0, -3:] = 0
        mask[batch - 1, -2:] = 0
    elif padding is not None:
        raise ValueError(f"padding must be None, 'left' or 'right', got {padding!r}")
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def heads_first_entry(op):
    """``op`` (prefix_attn_func's arguments, (B, L, heads, D) tensors) as the attention function's entry,
    ``causal_attention_heads_first`` (heads-first tensors): for tests that swap the op out."""
    def entry(q, k, v, prefix_k, prefix_v, prefix_idx, attention_mask, softmax_scale, dropout_p):
        return op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), prefix_k, prefix_v, prefix_idx=prefix_idx,
                  attention_mask=attention_mask, causal=True, softmax_scale=softmax_scale, dropout_p=dropout_p)
    return entry


class OpSpy:
    """Records what each call of the fused op receives from the attention function, then runs it (through
    the attention function's own entry, heads-first, as unspied).

    Each call is a dict, in the op's (B, L, heads, D) terms: q, k, prefix_k, prefix_v (shapes, None when
    absent), k_ptr (k's data pointer: a static cache's buffer is handed over as a view), prefix_idx (a list
    or None), mask (a clone or None) and q_is_view (q is GPT-2's transposed view, not a copy).
    """

    def __init__(self, monkeypatch):
        import prefix_attn.integrations.hf_attention as hf_attention

        self.calls = []
        self._entry = hf_attention.causal_attention_heads_first
        monkeypatch.setattr(hf_attention, "causal_attention_heads_first", self)

    def __call__(self, q, k, v, prefix_k, prefix_v, prefix_idx, attention_mask, softmax_scale, dropout_p):
        q_op, k_op = q.transpose(1, 2), k.transpose(1, 2)
        self.calls.append({
            "q": tuple(q_op.shape), "k": tuple(k_op.shape), "k_ptr": k.data_ptr(),
            "prefix_k": None if prefix_k is None else tuple(prefix_k.shape),
            "prefix_v": None if prefix_v is None else tuple(prefix_v.shape),
            "prefix_idx": None if prefix_idx is None else prefix_idx.tolist(),
            "mask": None if attention_mask is None else attention_mask.clone(),
            "q_is_view": not q_op.is_contiguous(),
        })
        return self._entry(q, k, v, prefix_k, prefix_v, prefix_idx, attention_mask, softmax_scale, dropout_p)


@contextlib.contextmanager
def reference_attention():
    """Inside: the attention function (every model) runs prefix_attn_ref (expanded prefix, concatenation,
    explicit mask) instead of the fused op: with use_cache=False that is the ground truth a route's
    generate() must reproduce."""
    import prefix_attn.integrations.hf_attention as hf_attention

    saved = hf_attention.causal_attention_heads_first
    hf_attention.causal_attention_heads_first = heads_first_entry(prefix_attn_ref)
    try:
        yield
    finally:
        hf_attention.causal_attention_heads_first = saved


def no_cache_generate(model, seed=123, **kwargs):
    """The ground truth of ``model.generate(**kwargs)``: every step a full recompute without a cache
    (use_cache=False) through the concatenation reference, seeded like the run it checks. For PEFT's
    own (unpatched) model this is PEFT without a cache; for a patched route it is the same route with
    prefix_attn_ref in place of the fused op."""
    torch.manual_seed(seed)
    with reference_attention(), torch.no_grad():
        return model.generate(**kwargs, use_cache=False)


class ShapeLog(TorchDispatchMode):
    """Records (op, output shape) of every op run under it: tests look for tensors that should
    never exist (KV heads repeated over a group, the batch-expanded prefix)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.shapes.append((str(func), tuple(x.shape)))
        return out


class PathSpy:
    """Records which of the torch backend's functions ``names`` a call ran (by default its fused CPU kernels'),
    in order, in ``ran``."""

    def __init__(self, monkeypatch, names=("_forward_fused_cpu", "_backward_fused_cpu")):
        self.ran = []
        for name in names:
            real = getattr(torch_backend, name)
            monkeypatch.setattr(torch_backend, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def spy(*args, **kwargs):
            self.ran.append(name)
            return real(*args, **kwargs)
        return spy


def dropout_run_and_reference(case, tensors, kwargs, p: float, backend: str):
    """The op with dropout p, and the float64 reference run with the keep-mask the op drew (same
    seed): (rng_state, [(name, ours, reference)] for out, lse and every gradient)."""
    dout = torch.randn_like(tensors["q"])
    torch.manual_seed(99)
    out, lse, grads = run_op(lambda **kw: prefix_attn_func(**kw, dropout_p=p, backend=backend), tensors, kwargs,
                             dout)
    torch.manual_seed(99)
    rng = draw_rng_state(tensors["q"].device)
    mask = dropout_keep_mask(rng, case.B, case.H, case.Lq, case.P, case.Lk, p)
    ref_out, ref_lse, ref_grads = run_op(lambda **kw: prefix_attn_ref(**kw, dropout_p=p, dropout_mask=mask),
                                         to64(tensors), kwargs, dout.double())
    return rng, list(zip(["out", "lse", *tensors], [out, lse, *grads], [ref_out, ref_lse, *ref_grads]))


def run_two_workers(worker, tmp_path, what: str, seconds: float = 180):
    """Spawn worker(rank, 2, rendezvous file, tmp_path) in 2 processes and wait for both; a worker that
    fails raises here, and workers still running after ``seconds`` are killed and the test fails."""
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=5):  # join raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {what} workers did not finish within {seconds:.0f} s")
