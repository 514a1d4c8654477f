"""Which backend a call runs on."""
import os

import torch

from prefix_attn.checks import check_triton_device

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "PREFIX_ATTN_BACKEND"

# $PREFIX_ATTN_BACKEND is read on every call (it may change at run time). os.environ.get costs about 1 us when
# it is unset (os._Environ raises and catches two KeyErrors); CPython's os.environ keeps its encoded mapping
# in _data, which os.environ[...] = ... and del os.environ[...] update, read here directly where it exists.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON_DATA is not None else None


def backend_override():
    """The value of $PREFIX_ATTN_BACKEND as os.environ holds it now, or None when it is unset."""
    if _ENVIRON_DATA is None:
        return os.environ.get(ENV_VAR)
    value = _ENVIRON_DATA.get(_ENV_KEY)
    return None if value is None else os.environ.decodevalue(value)


def resolve_backend(backend: str, device: torch.device) -> str:
    """"triton" or "torch" for a call on ``device``.

    "auto" takes $PREFIX_ATTN_BACKEND when it is set, else triton on CUDA and torch elsewhere.
    """
    if backend == "auto":
        override = backend_override()
        if not override:  # the usual case first: this runs once per layer call
            return "triton" if device.type == "cuda" else "torch"
        if override not in ("triton", "torch"):
            raise ValueError(f"${ENV_VAR} must be 'triton' or 'torch', got {override!r}")
        backend = override
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        check_triton_device(device)
    return backend
