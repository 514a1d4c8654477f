"""Which backend a call runs on."""
import os

import torch

from prefix_attn.checks import check_triton_device

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "PREFIX_ATTN_BACKEND"


def resolve_backend(backend: str, device: torch.device) -> str:
    """"triton" or "torch" for a call on ``device``.

    "auto" takes $PREFIX_ATTN_BACKEND when it is set, else triton on CUDA and torch elsewhere.
    """
    if backend == "auto":
        override = os.environ.get(ENV_VAR)
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
