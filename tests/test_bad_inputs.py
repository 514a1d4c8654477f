"""Every bad input raises ValueError or TypeError naming the argument, on both backends,
before any kernel runs."""
import os

import pytest
import torch

from prefix_attn import prefix_attn_func
from prefix_attn.backend import resolve_backend
from tests.conftest import DEVICE

B, L, H, D, P, T = 2, 8, 2, 16, 4, 3


def _base():
    q, k, v = (torch.randn(B, L, H, D, device=DEVICE) for _ in range(3))
    pk, pv = (torch.randn(P, H, D, device=DEVICE) for _ in range(2))
    return dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)


def _bank():
    args = _base()
    args["prefix_k"], args["prefix_v"] = (torch.randn(T, P, H, D, device=DEVICE) for _ in range(2))
    args["prefix_idx"] = torch.tensor([0, 2], device=DEVICE)
    return args


def _with(base, **changes):
    def build():
        args = base()
        for key, fn in changes.items():
            args[key] = fn(args)
        return {k: v for k, v in args.items() if v is not None or k in ("prefix_k", "prefix_v")}

    return build


CASES = [
    ("q not a tensor", _with(_base, q=lambda a: a["q"].tolist()), TypeError, "q must be a torch.Tensor"),
    ("q rank", _with(_base, q=lambda a: a["q"][0]), ValueError, "q must be 4-D"),
    ("integer q", _with(_base, q=lambda a: a["q"].long()), TypeError, "q has dtype"),
    ("float64 q", _with(_base, q=lambda a: a["q"].double()), TypeError, "q has dtype"),
    ("mixed dtypes", _with(_base, k=lambda a: a["k"].half()), TypeError, "k has dtype"),
    ("k batch", _with(_base, k=lambda a: a["k"][:1], v=lambda a: a["v"][:1]), ValueError, "k has batch"),
    ("k heads not dividing q's", _with(_base, q=lambda a: a["q"][:, :, :1].repeat(1, 1, 3, 1)), ValueError,
     "k has 2 heads but q has 3"),
    ("k heads without the prefix's", _with(_base, k=lambda a: a["k"][:, :, :1], v=lambda a: a["v"][:, :, :1]),
     ValueError, "prefix_k has 2 heads but k has 1"),
    ("k head dim", _with(_base, k=lambda a: a["k"][..., :8], v=lambda a: a["v"][..., :8]), ValueError, "k has head_dim"),
    ("v shape", _with(_base, v=lambda a: a["v"][:, :4]), ValueError, "k and v must have the same shape"),
    ("Lq > Lk", _with(_base, k=lambda a: a["k"][:, :4], v=lambda a: a["v"][:, :4]), ValueError, "seqlen"),
    ("head dim too small", _with(_base, q=lambda a: a["q"][..., :8], k=lambda a: a["k"][..., :8],
                                 v=lambda a: a["v"][..., :8], prefix_k=lambda a: None, prefix_v=lambda a: None),
     ValueError, "head_dim 8"),
    ("head dim too large", _with(_base, q=lambda a: a["q"].repeat(1, 1, 1, 9), k=lambda a: a["k"].repeat(1, 1, 1, 9),
                                 v=lambda a: a["v"].repeat(1, 1, 1, 9), prefix_k=lambda a: None,
                                 prefix_v=lambda a: None), ValueError, "head_dim 144"),
    ("prefix_k without prefix_v", _with(_base, prefix_v=lambda a: None), ValueError, "prefix_k was given without"),
    ("prefix_v without prefix_k", _with(_base, prefix_k=lambda a: None), ValueError, "prefix_v was given without"),
    ("prefix rank", _with(_base, prefix_k=lambda a: a["prefix_k"][0], prefix_v=lambda a: a["prefix_v"][0]),
     ValueError, "prefix_k must be"),
    ("prefix heads", _with(_base, prefix_k=lambda a: a["prefix_k"][:, :1], prefix_v=lambda a: a["prefix_v"][:, :1]),
     ValueError, "prefix_k has 1 heads"),
    ("prefix head dim", _with(_base, prefix_k=lambda a: a["prefix_k"][..., :8], prefix_v=lambda a: a["prefix_v"][..., :8]),
     ValueError, "prefix_k has head_dim"),
    ("prefix k/v shapes", _with(_base, prefix_v=lambda a: a["prefix_v"][:2]), ValueError,
     "prefix_k and prefix_v must have the same shape"),
    ("prefix dtype", _with(_base, prefix_k=lambda a: a["prefix_k"].half(), prefix_v=lambda a: a["prefix_v"].half()),
     TypeError, "prefix_k has dtype"),
    ("bank without prefix_idx", _with(_bank, prefix_idx=lambda a: None), ValueError, "prefix_idx (batch,)"),
    ("prefix_idx out of range", _with(_bank, prefix_idx=lambda a: torch.tensor([0, T], device=DEVICE)),
     ValueError, "prefix_idx has values"),
    ("prefix_idx negative", _with(_bank, prefix_idx=lambda a: torch.tensor([-1, 0], device=DEVICE)),
     ValueError, "prefix_idx has values"),
    ("prefix_idx length", _with(_bank, prefix_idx=lambda a: torch.tensor([0, 1, 2], device=DEVICE)),
     ValueError, "prefix_idx must have shape"),
    ("prefix_idx float", _with(_bank, prefix_idx=lambda a: torch.tensor([0.0, 1.0], device=DEVICE)),
     TypeError, "prefix_idx must be an integer"),
    ("prefix_idx with a shared prefix", _with(_base, prefix_idx=lambda a: torch.tensor([0, 0], device=DEVICE)),
     ValueError, "prefix_idx needs a prefix bank"),
    ("prefix_lens above P", _with(_bank, prefix_lens=lambda a: torch.tensor([1, P + 1, 2], device=DEVICE)),
     ValueError, "prefix_lens has values"),
    ("prefix_lens negative", _with(_bank, prefix_lens=lambda a: torch.tensor([1, -1, 2], device=DEVICE)),
     ValueError, "prefix_lens has values"),
    ("prefix_lens length", _with(_bank, prefix_lens=lambda a: torch.tensor([1, 2], device=DEVICE)),
     ValueError, "prefix_lens must have shape"),
    ("prefix_lens without prefix", _with(_base, prefix_k=lambda a: None, prefix_v=lambda a: None,
                                         prefix_lens=lambda a: torch.tensor([1], device=DEVICE)),
     ValueError, "prefix_lens was given without"),
    ("mask shape", _with(_base, attention_mask=lambda a: torch.ones(B, L + 1, dtype=torch.bool, device=DEVICE)),
     ValueError, "attention_mask must have shape"),
    ("float mask", _with(_base, attention_mask=lambda a: torch.zeros(B, L, device=DEVICE)), TypeError,
     "attention_mask must be bool or an integer"),
    ("dropout_p = 1", _with(_base, dropout_p=lambda a: 1.0), ValueError, "dropout_p must be in [0, 1)"),
    ("dropout_p < 0", _with(_base, dropout_p=lambda a: -0.1), ValueError, "dropout_p must be in [0, 1)"),
    ("softmax_scale nan", _with(_base, softmax_scale=lambda a: float("nan")), ValueError, "softmax_scale must be finite"),
    ("k on another device", _with(_base, k=lambda a: a["k"].to("meta")), ValueError, "k is on meta"),
    ("mask on another device", _with(_base, attention_mask=lambda a: torch.ones(B, L, dtype=torch.bool, device="meta")),
     ValueError, "attention_mask is on meta"),
    ("unknown backend", _with(_base, backend=lambda a: "cuda"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name,build,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, build, error, message, backend):
    args = build()
    args.setdefault("backend", backend)
    with pytest.raises(error) as info:
        prefix_attn_func(**args)
    assert message in str(info.value), str(info.value)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))


def test_environment_override(monkeypatch):
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "torch")
    assert resolve_backend("auto", torch.device(DEVICE)) == "torch"
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "fast")
    with pytest.raises(ValueError, match="PREFIX_ATTN_BACKEND"):
        resolve_backend("auto", torch.device(DEVICE))


def test_environment_override_is_read_on_every_call(monkeypatch):
    """backend_override reads os.environ's own mapping (not os.environ.get, 1 us per call): it must follow every
    change made through os.environ, as os.environ.get would."""
    from prefix_attn.backend import backend_override

    monkeypatch.delenv("PREFIX_ATTN_BACKEND", raising=False)
    assert backend_override() is None
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "torch")
    assert backend_override() == "torch" == os.environ.get("PREFIX_ATTN_BACKEND")
    os.environ["PREFIX_ATTN_BACKEND"] = "triton"
    assert backend_override() == "triton"
    monkeypatch.delenv("PREFIX_ATTN_BACKEND")
    assert backend_override() is None
    expected = "torch" if torch.device(DEVICE).type == "cpu" else "triton"
    assert resolve_backend("auto", torch.device(DEVICE)) == expected
