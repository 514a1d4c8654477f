"""The naive prefix attention: the baseline benchmarks compare against and the tests' oracle.

It does what PEFT + eager attention do: the prefix is expanded over the batch and concatenated with
each sequence's keys and values, an explicit (batch, 1, Lq, P + Lk) mask is built and a full softmax
is materialised.
"""
from typing import Optional

import torch

from prefix_attn.checks import check_attention_inputs, check_prefix_values, default_scale
from prefix_attn.dropout import keep_scale

_REF_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def concat_prefix(prefix: Optional[torch.Tensor], x: torch.Tensor, prefix_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """[prefix expanded over the batch; x] along the sequence: (B, P + L, H, D), materialised."""
    if prefix is None:
        return x
    expanded = prefix[prefix_idx] if prefix.dim() == 4 else prefix.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
    return torch.cat([expanded, x], dim=1)


def prefix_attn_mask(batch: int, seqlen_q: int, seqlen_k: int, prefix_len: int, device,
                     prefix_idx=None, prefix_lens=None, attention_mask=None, causal=True) -> torch.Tensor:
    """Explicit visibility (B, 1, Lq, P + Lk) bool of queries over [prefix slots; keys]."""
    slots = torch.arange(prefix_len, device=device)
    if prefix_lens is not None:
        lens = prefix_lens.to(torch.int64)
        lens = lens[prefix_idx] if prefix_idx is not None else lens.expand(batch)
        slot_ok = slots[None, :] < lens[:, None]
    else:
        slot_ok = torch.ones((batch, prefix_len), dtype=torch.bool, device=device)
    key_ok = torch.ones((batch, seqlen_k), dtype=torch.bool, device=device)
    if attention_mask is not None:
        key_ok = attention_mask != 0
    seq_ok = key_ok[:, None, :].expand(batch, seqlen_q, seqlen_k)
    if causal:
        qpos = torch.arange(seqlen_q, device=device) + (seqlen_k - seqlen_q)
        seq_ok = seq_ok & (torch.arange(seqlen_k, device=device)[None, :] <= qpos[:, None])
    pre_ok = slot_ok[:, None, :].expand(batch, seqlen_q, prefix_len)
    return torch.cat([pre_ok, seq_ok], dim=-1)[:, None]


def prefix_attn_ref(q, k, v, prefix_k=None, prefix_v=None, *, prefix_idx=None, prefix_lens=None,
                    attention_mask=None, causal=True, softmax_scale=None, dropout_p=0.0, deterministic=True,
                    return_lse=False, backend="auto", dropout_mask: Optional[torch.Tensor] = None):
    """prefix_attn_func computed the naive way; same arguments and shapes (see its docstring).

    Matmuls run in the inputs' dtype (float64 too, for an oracle), the softmax in at least fp32.
    ``deterministic`` and ``backend`` are accepted for signature compatibility and ignored.
    dropout_mask: (B, H, Lq, P + Lk) bool keep-mask to apply instead of drawing one (tests pass
    the op's own mask from prefix_attn.dropout.dropout_keep_mask). Without it, dropout_p > 0 draws
    a fresh mask from torch's generator.
    Returns out (B, Lq, H, D) and with return_lse=True lse (B, H, Lq) (float32, float64 for
    float64 inputs). Empty rows give zeros and lse = -inf.
    """
    dims = check_attention_inputs(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask,
                                  dropout_p, softmax_scale, allowed_dtypes=_REF_DTYPES)
    check_prefix_values(prefix_idx, prefix_lens, dims)
    if not dims.has_prefix:
        prefix_k = prefix_v = prefix_idx = prefix_lens = None
    scale = default_scale(dims.head_dim, softmax_scale)
    if prefix_lens is not None:
        # Slots past prefix_lens may hold anything (NaN, inf): never read them, not even as 0 * NaN.
        slot_ok = torch.arange(dims.prefix_len, device=q.device)[None, :] < prefix_lens.to(torch.int64)[:, None]
        slot_ok = slot_ok.reshape(prefix_k.shape[:-2] + (1, 1))  # (T, P, 1, 1) or (P, 1, 1)
        prefix_k = torch.where(slot_ok, prefix_k, 0.0)
        prefix_v = torch.where(slot_ok, prefix_v, 0.0)
    k_all = concat_prefix(prefix_k, k, prefix_idx)
    v_all = concat_prefix(prefix_v, v, prefix_idx)
    if dims.group_size > 1:  # grouped heads: query head h reads KV head h // group_size
        k_all = k_all.repeat_interleave(dims.group_size, dim=2)
        v_all = v_all.repeat_interleave(dims.group_size, dim=2)
    visible = prefix_attn_mask(dims.batch, dims.seqlen_q, dims.seqlen_k, dims.prefix_len, q.device,
                               prefix_idx, prefix_lens, attention_mask, causal)
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k_all).to(softmax_dtype) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - lse_safe[..., None])
    if dropout_p > 0.0:
        if dropout_mask is None:
            probs = probs * (torch.rand_like(probs) >= dropout_p) / (1.0 - dropout_p)
        else:  # the op's own mask: the op's exact keep probability (16-bit threshold)
            probs = probs * dropout_mask * keep_scale(dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v_all)
    lse = lse if softmax_dtype == torch.float64 else lse.float()
    return (out, lse) if return_lse else out
