"""The pure-PyTorch backend: the kernels' algorithm written with torch ops, for CPU users.

Same contract and same numerics as the Triton backend (fp32 math, the same dropout mask bit for
bit), forward and backward written out explicitly so that both backends share one autograd and
custom-op path. It never builds the batch-expanded prefix: prefix scores are an einsum against
the (P, H, D) block, and a bank is handled task by task over the rows that use each task. Query
rows are processed in chunks, so that the score tiles stay within ``CHUNK_ELEMENTS``.
"""
from typing import Optional

import torch

from prefix_attn.checks import AttnDims, check_attention_inputs, check_prefix_values, default_scale
from prefix_attn.dropout import keep_mask_rows, keep_scale

# fp32 score elements per query chunk (64 MiB per score-sized buffer).
CHUNK_ELEMENTS = 1 << 24


class _Prefix:
    """The prefix of one call in fp32, (T, H, P, D), with each task's batch rows."""

    def __init__(self, prefix_k, prefix_v, prefix_idx, prefix_lens, dims: AttnDims, device):
        self.P = dims.prefix_len
        self.k = prefix_k.float().reshape(-1, self.P, dims.heads, dims.head_dim).transpose(1, 2)
        self.v = prefix_v.float().reshape(-1, self.P, dims.heads, dims.head_dim).transpose(1, 2)
        if dims.is_bank:
            idx = prefix_idx.to(torch.int64)
            self.groups = [(t, (idx == t).nonzero().flatten()) for t in torch.unique(idx).tolist()]
        else:
            idx = torch.zeros(dims.batch, dtype=torch.int64, device=device)
            self.groups = [(0, None)]  # None: every row, no gather
        slots = torch.arange(self.P, device=device)
        if prefix_lens is not None:
            lens = prefix_lens.to(torch.int64)
            self.slot_ok = slots[None, :] < lens[idx][:, None]  # (B, P)
            # Slots past a task's prefix_lens are never read: they may hold anything (a bank allocated
            # with torch.empty: NaN, inf), and a masked score alone still leaves 0 * NaN in p @ V and
            # in dS @ K. Zero them (torch.where, not a product) as the kernels' masked loads do.
            task_ok = (slots[None, :] < lens[:, None])[:, None, :, None]  # (T, 1, P, 1)
            self.k = torch.where(task_ok, self.k, 0.0)
            self.v = torch.where(task_ok, self.v, 0.0)
        else:
            self.slot_ok = None

    def apply(self, x, fn, out_shape):
        """Run fn(x_rows, task) per task; scatter into a (B, ...) result of out_shape."""
        if len(self.groups) == 1 and self.groups[0][1] is None:
            return fn(x, 0)
        result = x.new_zeros(out_shape)
        for t, rows in self.groups:
            result[rows] = fn(x[rows], t)
        return result

    def reduce(self, a, b, fn):
        """Sum fn(a_rows, b_rows) over each task's rows: (T, H, P, D) prefix-shaped result."""
        result = self.k.new_zeros(self.k.shape)
        for t, rows in self.groups:
            result[t] = fn(a, b) if rows is None else fn(a[rows], b[rows])
        return result


def _chunk_rows(dims: AttnDims) -> int:
    per_row = max(1, dims.batch * dims.heads * (dims.prefix_len + dims.seqlen_k))
    return max(1, min(dims.seqlen_q, CHUNK_ELEMENTS // per_row))


def _keep(rng, dropout_p: float, dims: AttnDims, rows: slice, device) -> torch.Tensor:
    """Dropout keep-mask (B, H, chunk, P + Lk) for the query rows ``rows``."""
    seed, offset = (int(x) for x in rng.tolist())
    B, H, Lq = dims.batch, dims.heads, dims.seqlen_q
    i = torch.arange(rows.start, rows.stop, device=device)
    flat = (torch.arange(B * H, device=device)[:, None] * Lq + i[None, :]).flatten()
    mask = keep_mask_rows(seed, offset, flat, dims.prefix_len, dims.seqlen_k, dropout_p)
    return mask.reshape(B, H, rows.stop - rows.start, -1)


def _probs(qc, kf, prefix: Optional[_Prefix], key_ok, causal, scale, dims: AttnDims, rows: slice, lse=None):
    """Scores of the query chunk against [prefix; keys] -> (p (B, H, c, P + Lk), lse (B, H, c))."""
    B, H = dims.batch, dims.heads
    c = rows.stop - rows.start
    s_seq = torch.matmul(qc, kf.transpose(-1, -2)) * scale
    visible = torch.ones((1, 1, c, dims.seqlen_k), dtype=torch.bool, device=qc.device)
    if key_ok is not None:
        visible = visible & key_ok[:, None, None, :]
    if causal:
        qpos = torch.arange(rows.start, rows.stop, device=qc.device) + (dims.seqlen_k - dims.seqlen_q)
        visible = visible & (torch.arange(dims.seqlen_k, device=qc.device)[None, :] <= qpos[:, None])
    s_seq = s_seq.masked_fill(~visible, float("-inf"))
    if prefix is not None:
        s_pre = prefix.apply(qc, lambda x, t: torch.matmul(x, prefix.k[t].transpose(-1, -2)) * scale,
                             (B, H, c, prefix.P))
        if prefix.slot_ok is not None:
            s_pre = s_pre.masked_fill(~prefix.slot_ok[:, None, None, :], float("-inf"))
        s = torch.cat([s_pre, s_seq], dim=-1)
    else:
        s = s_seq
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    return torch.exp(s - lse_safe[..., None]), lse


def _validate(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p, softmax_scale):
    dims = check_attention_inputs(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask,
                                  dropout_p, softmax_scale)
    check_prefix_values(prefix_idx, prefix_lens, dims)
    return dims


def _prepare(q, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dims):
    prefix = _Prefix(prefix_k, prefix_v, prefix_idx, prefix_lens, dims, q.device) if dims.has_prefix else None
    key_ok = attention_mask != 0 if attention_mask is not None else None
    return prefix, key_ok


def prefix_attn_fwd(q, k, v, prefix_k=None, prefix_v=None, prefix_idx=None, prefix_lens=None,
                    attention_mask=None, causal=True, softmax_scale=None, dropout_p=0.0, rng_state=None):
    """Forward in PyTorch. Returns out (B, Lq, H, D) in q's dtype and lse (B, H, Lq) fp32."""
    dims = _validate(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p, softmax_scale)
    return forward_unchecked(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal,
                             softmax_scale, dropout_p, rng_state, dims)


def forward_unchecked(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal, softmax_scale,
                      dropout_p, rng_state, dims: AttnDims):
    prefix, key_ok = _prepare(q, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dims)
    scale = default_scale(dims.head_dim, softmax_scale)
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
    out = torch.empty((dims.batch, dims.heads, dims.seqlen_q, dims.head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((dims.batch, dims.heads, dims.seqlen_q), dtype=torch.float32, device=q.device)
    chunk = _chunk_rows(dims)
    P = dims.prefix_len
    for start in range(0, dims.seqlen_q, chunk):
        rows = slice(start, min(start + chunk, dims.seqlen_q))
        p, lse[:, :, rows] = _probs(qf[:, :, rows], kf, prefix, key_ok, causal, scale, dims, rows)
        if dropout_p > 0.0:
            p = p * (_keep(rng_state, dropout_p, dims, rows, q.device) * keep_scale(dropout_p))
        o = torch.matmul(p[..., P:], vf)
        if prefix is not None:
            o = o + prefix.apply(p[..., :P], lambda x, t: torch.matmul(x, prefix.v[t]), o.shape)
        out[:, :, rows] = o
    # Contiguous (B, Lq, H, D), as the custom op's fake promises: torch.compile plans views on it.
    return out.transpose(1, 2).contiguous().to(q.dtype), lse


def prefix_attn_bwd(dout, dlse, q, k, v, out, lse, prefix_k=None, prefix_v=None, prefix_idx=None, prefix_lens=None,
                    attention_mask=None, causal=True, softmax_scale=None, dropout_p=0.0, rng_state=None):
    """Backward in PyTorch; same outputs as the Triton launcher (dq, dk, dv, dprefix_k, dprefix_v)."""
    dims = _validate(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p, softmax_scale)
    return backward_unchecked(dout, dlse, q, k, v, out, lse, prefix_k, prefix_v, prefix_idx, prefix_lens,
                              attention_mask, causal, softmax_scale, dropout_p, rng_state, dims)


def backward_unchecked(dout, dlse, q, k, v, out, lse, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask,
                       causal, softmax_scale, dropout_p, rng_state, dims: AttnDims):
    prefix, key_ok = _prepare(q, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dims)
    scale = default_scale(dims.head_dim, softmax_scale)
    qf, kf, vf, dof, of = (x.float().transpose(1, 2) for x in (q, k, v, dout, out))
    delta = (dof * of).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    dpk = dpv = None
    if prefix is not None:
        dpk = torch.zeros_like(prefix.k)
        dpv = torch.zeros_like(prefix.v)
    chunk = _chunk_rows(dims)
    P = dims.prefix_len
    B, H = dims.batch, dims.heads
    for start in range(0, dims.seqlen_q, chunk):
        rows = slice(start, min(start + chunk, dims.seqlen_q))
        c = rows.stop - rows.start
        qc, doc = qf[:, :, rows], dof[:, :, rows]
        p, _ = _probs(qc, kf, prefix, key_ok, causal, scale, dims, rows, lse=lse[:, :, rows].float())
        dp_seq = torch.matmul(doc, vf.transpose(-1, -2))
        if prefix is not None:
            dp_pre = prefix.apply(doc, lambda x, t: torch.matmul(x, prefix.v[t].transpose(-1, -2)), (B, H, c, P))
            dp = torch.cat([dp_pre, dp_seq], dim=-1)
        else:
            dp = dp_seq
        p_kept = p
        if dropout_p > 0.0:
            keep = _keep(rng_state, dropout_p, dims, rows, q.device) * keep_scale(dropout_p)
            p_kept = p * keep
            dp = dp * keep
        ds = p * (dp - delta[:, :, rows, None])
        dq_c = torch.matmul(ds[..., P:], kf)
        dk += torch.matmul(ds[..., P:].transpose(-1, -2), qc)
        dv += torch.matmul(p_kept[..., P:].transpose(-1, -2), doc)
        if prefix is not None:
            ds_pre, pk_pre = ds[..., :P], p_kept[..., :P]
            dq_c = dq_c + prefix.apply(ds_pre, lambda x, t: torch.matmul(x, prefix.k[t]), dq_c.shape)
            dpk += prefix.reduce(ds_pre, qc, lambda a, b: torch.einsum("bhcp,bhcd->hpd", a, b))
            dpv += prefix.reduce(pk_pre, doc, lambda a, b: torch.einsum("bhcp,bhcd->hpd", a, b))
        dq[:, :, rows] = dq_c
    dq = (dq * scale).transpose(1, 2).contiguous().to(q.dtype)
    dk = (dk * scale).transpose(1, 2).contiguous().to(k.dtype)
    dv = dv.transpose(1, 2).contiguous().to(v.dtype)
    if prefix is not None:
        dpk = (dpk * scale).transpose(1, 2).reshape(prefix_k.shape).to(prefix_k.dtype)
        dpv = dpv.transpose(1, 2).reshape(prefix_v.shape).to(prefix_v.dtype)
    elif prefix_k is not None:
        dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    return dq, dk, dv, dpk, dpv
