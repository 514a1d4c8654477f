"""Which backend a call runs on."""
import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "PREFIX_ATTN_BACKEND"


def resolve_backend(backend: str, device: torch.device) -> str:
    """"triton" or "torch" for a call on ``device``.

    "auto" takes $PREFIX_ATTN_BACKEND when it is set, else triton on CUDA and torch elsewhere.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        override = os.environ.get(ENV_VAR, "")
        if override:
            if override not in ("triton", "torch"):
                raise ValueError(f"${ENV_VAR} must be 'triton' or 'torch', got {override!r}")
            backend = override
        else:
            backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got tensors on {device}); for CPU tensors set "
            "TRITON_INTERPRET=1 before importing prefix_attn, or use backend='torch'")
    return backend
