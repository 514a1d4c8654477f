"""Attention providers compared by the op-level benchmarks: the fused op and the concat baselines.

Each provider takes q (B, L, H, D), k, v (B, L, Hkv, D) and prefix_k, prefix_v (P, Hkv, D) (or None)
and computes causal prefix attention; the concat_* providers expand the prefix over the batch and
concatenate it with K/V in every call, as PEFT does. Grouped KV heads (Hkv < H) go to SDPA and
FlexAttention with enable_gqa=True, as transformers passes them (no repeat of the KV heads).
"""
import functools

import torch
import torch.nn.functional as F

from prefix_attn import prefix_attn_func
from prefix_attn.reference import concat_prefix, prefix_attn_ref


def fused_triton(q, k, v, pk, pv):
    return prefix_attn_func(q, k, v, pk, pv, causal=True, backend="triton")


def fused_torch(q, k, v, pk, pv):
    return prefix_attn_func(q, k, v, pk, pv, causal=True, backend="torch")


def concat_eager(q, k, v, pk, pv):
    return prefix_attn_ref(q, k, v, pk, pv, causal=True)


@functools.lru_cache(maxsize=None)
def _lower_right(seqlen_q, seqlen_k):
    # Built once per shape (a tensor subclass; building it under a dispatch mode fails).
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(seqlen_q, seqlen_k)


def concat_sdpa(q, k, v, pk, pv):
    """SDPA over [prefix; keys] with a lower-right causal mask: query i sees every prefix slot and
    keys <= i, which is exactly the prefix-LM pattern, so SDPA may keep its flash backend."""
    k_all, v_all = concat_prefix(pk, k, None), concat_prefix(pv, v, None)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k_all, v_all))
    gqa = {"enable_gqa": True} if kt.shape[1] != qt.shape[1] else {}
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=_lower_right(qt.shape[2], kt.shape[2]), **gqa)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _flex_block_mask(B, Lq, Lk_all, P, device):
    from torch.nn.attention.flex_attention import create_block_mask

    shift = Lk_all - Lq

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < P) | (kv_idx <= q_idx + shift)

    return create_block_mask(prefix_lm, None, None, Lq, Lk_all, device=device)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def concat_flex(q, k, v, pk, pv):
    """FlexAttention over [prefix; keys] with a prefix-LM block mask (compiled, GPU)."""
    k_all, v_all = concat_prefix(pk, k, None), concat_prefix(pv, v, None)
    P = 0 if pk is None else pk.shape[0]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k_all, v_all))
    mask = _flex_block_mask(q.shape[0], qt.shape[2], kt.shape[2], P, str(q.device))
    gqa = {"enable_gqa": True} if kt.shape[1] != qt.shape[1] else {}
    return _compiled_flex()(qt, kt, vt, block_mask=mask, **gqa).transpose(1, 2)


PROVIDERS = {
    "prefix_attn": fused_triton,
    "prefix_attn_torch": fused_torch,
    "concat_eager": concat_eager,
    "concat_sdpa": concat_sdpa,
    "concat_flex": concat_flex,
}


def unavailable_reason(provider: str, device) -> str:
    """Why a provider cannot run on this machine ('' when it can)."""
    on_gpu = torch.device(device).type == "cuda"
    if provider == "prefix_attn" and not on_gpu:
        return "Triton kernels need a CUDA GPU (the CPU interpreter is for tests, never for timings)"
    if provider == "concat_flex":
        if not on_gpu:
            return "FlexAttention is benchmarked on GPU only"
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:
            return "FlexAttention needs torch >= 2.5"
    return ""
