"""What one call of the op carries besides its differentiable tensors, as one named bundle.

The public function builds it once per call; the autograd node, the backends and the launchers take
it as it is. Only the torch.library custom ops (``prefix_attn.ops``) see these fields flat, because
a custom op's schema admits tensors and scalars only.
"""
from typing import NamedTuple, Optional

import torch

from prefix_attn.checks import AttnDims


class AttnArgs(NamedTuple):
    """prefix_idx (B,) / prefix_lens (T,) / attention_mask (B, Lk) as the caller gave them (None
    when absent or without a prefix), the resolved options, and the call's sizes."""

    prefix_idx: Optional[torch.Tensor]
    prefix_lens: Optional[torch.Tensor]
    attention_mask: Optional[torch.Tensor]
    causal: bool
    softmax_scale: float  # resolved: 1 / sqrt(head_dim) when the caller gave None
    dropout_p: float
    backend: str  # "triton" or "torch"
    dims: AttnDims
    # q, k, v (and their gradients) heads-first, (B, heads, L, D): the integrations' CPU calls to the torch
    # backend (prefix_attn.api.causal_attention_heads_first), whose paths read that layout as it is.
    heads_first: bool = False

    def options(self) -> tuple:
        """The non-tensor fields, in order (what an autograd context keeps besides saved tensors)."""
        return self[3:]

    @classmethod
    def from_tensors_and_options(cls, prefix_idx, prefix_lens, attention_mask, options: tuple) -> "AttnArgs":
        return cls(prefix_idx, prefix_lens, attention_mask, *options)
