"""The pure-PyTorch backend: the kernels' algorithm written with torch ops, for CPU users.

Same contract and same numerics as the Triton backend (fp32 math, the same dropout mask bit for
bit), forward and backward written out explicitly so that both backends share one autograd and
custom-op path. It never builds the batch-expanded prefix: prefix scores are an einsum against
the (P, Hkv, D) block, and a bank is handled task by task over the rows that use each task.

Grouped KV heads (k, v, prefix with Hkv heads, H = Hkv * G query heads; query head h reads KV head
h // G): KV heads are never expanded. The G query heads of a KV head are laid out as G * rows of
one GEMM against that KV head (q (B, H, c, D) seen as (B, Hkv, G * c, D): the same memory order),
so dK, dV and the prefix gradients come out summed over each group by the GEMMs themselves.
Scores, the dropout mask, lse and delta stay per query head (B, H, c, .).

Two paths:
- CPU tensors without dropout (inference, and training without attention dropout): the sequence's
  own keys go through PyTorch's fused CPU attention kernel (``_scaled_dot_product_flash_attention_
  for_cpu``: tiled online softmax, no Lq x Lk score matrix), the P prefix slots are computed
  explicitly in query chunks, and the two are merged by log-sum-exp. Its backward gets the merged
  output and lse, from which the fused kernel's recomputed probabilities and row sums are exactly
  those of the whole softmax over [prefix; keys].
- Otherwise (dropout, whose mask must be the kernels' Philox mask bit for bit; CUDA tensors; an
  lse gradient; double backward), scores of [prefix; keys] are materialised for query chunks that
  stay within ``CHUNK_ELEMENTS``. On CPU the forward keeps each chunk's dropout keep-mask bit-packed
  for the backward (``_SAVED_KEEP``: 1/32 of a chunk's fp32 scores, freed with the graph) instead of
  drawing it twice; Philox in NumPy is the largest single cost of this path at training shapes.
"""
import math
import weakref
from typing import Optional

import numpy as np
import torch

from prefix_attn.args import AttnArgs
from prefix_attn.checks import AttnDims, default_scale
from prefix_attn.dropout import keep_mask_grid, keep_scale

# fp32 score elements per query chunk (64 MiB per score-sized buffer).
CHUNK_ELEMENTS = 1 << 24


class _Prefix:
    """The prefix of one call in fp32, (T, Hkv, P, D), with each task's batch rows."""

    def __init__(self, prefix_k, prefix_v, prefix_idx, prefix_lens, dims: AttnDims, device):
        self.P = dims.prefix_len
        self.k = prefix_k.float().reshape(-1, self.P, dims.kv_heads, dims.head_dim).transpose(1, 2)
        self.v = prefix_v.float().reshape(-1, self.P, dims.kv_heads, dims.head_dim).transpose(1, 2)
        if dims.is_bank:
            idx = prefix_idx.to(torch.int64)
            self.groups = [(t, (idx == t).nonzero().flatten()) for t in torch.unique(idx).tolist()]
        else:
            idx = None
            self.groups = [(0, None)]  # None: every row, no gather
        if prefix_lens is not None:
            if idx is None:
                idx = torch.zeros(dims.batch, dtype=torch.int64, device=device)
            slots = torch.arange(self.P, device=device)
            lens = prefix_lens.to(torch.int64)
            self.slot_ok = slots[None, :] < lens[idx][:, None]  # (B, P)
            # Slots past a task's prefix_lens are never read: they may hold anything (a bank allocated
            # with torch.empty: NaN, inf), and a masked score alone still leaves 0 * NaN in p @ V and
            # in dS @ K. Zero them (torch.where, not a product) as the kernels' masked loads do.
            self.task_slot_ok = slots[None, :] < lens[:, None]  # (T, P)
            task_ok = self.task_slot_ok[:, None, :, None]  # (T, 1, P, 1)
            self.k = torch.where(task_ok, self.k, 0.0)
            self.v = torch.where(task_ok, self.v, 0.0)
        else:
            self.slot_ok = self.task_slot_ok = None

    def apply(self, x, fn, out_shape):
        """Run fn(x_rows, task) per task; scatter into a (B, ...) result of out_shape."""
        if len(self.groups) == 1 and self.groups[0][1] is None:
            return fn(x, 0)
        result = x.new_zeros(out_shape)
        for t, rows in self.groups:
            result[rows] = fn(x[rows], t)
        return result

    def reduce(self, a, b, fn):
        """Sum fn(a_rows, b_rows) over each task's rows: (T, Hkv, P, D) prefix-shaped result."""
        if len(self.groups) == 1 and self.groups[0][1] is None:
            return fn(a, b)[None]
        result = self.k.new_zeros(self.k.shape)
        for t, rows in self.groups:
            result[t] = fn(a, b) if rows is None else fn(a[rows], b[rows])
        return result


def _chunk_rows(dims: AttnDims) -> int:
    per_row = max(1, dims.batch * dims.heads * (dims.prefix_len + dims.seqlen_k))
    return max(1, min(dims.seqlen_q, CHUNK_ELEMENTS // per_row))


# The forward's keep-masks, bit-packed, for the backward of the same call: id(rng_state) ->
# {(seed, offset, dims, rows, dropout_p): packed bits}. An entry lives as long as the call's rng_state
# tensor (which the autograd node saves for its backward), so it costs what a saved tensor of
# B * H * Lq * (P + Lk) / 8 bytes would, and goes with the graph. The key holds everything the mask is
# a function of, so a hit is the mask the backward would draw, bit for bit; a miss (another rng_state
# tensor, e.g. through the custom op) draws it again.
_SAVED_KEEP: dict = {}


def _keep(rng, dropout_p: float, dims: AttnDims, rows: slice, save: bool) -> torch.Tensor:
    """Dropout keep-mask (B, H, chunk, P + Lk) for the query rows ``rows``, as the fp32 factors that
    multiply p: keep_scale where kept, 0 where dropped. save: keep it (packed) for the backward; else
    take it from there when the forward saved it."""
    seed, offset = (int(x) for x in rng.tolist())
    shape = (dims.batch, dims.heads, rows.stop - rows.start, dims.prefix_len + dims.seqlen_k)
    key = (seed, offset, shape, dims.seqlen_q, rows.start, dropout_p)
    saved = _SAVED_KEEP.get(id(rng))
    packed = None if save or saved is None else saved.get(key)
    if packed is not None:
        mask = torch.from_numpy(np.unpackbits(packed.numpy(), count=math.prod(shape)).view(np.bool_))
    else:
        mask = keep_mask_grid(seed, offset, dims.batch * dims.heads, dims.seqlen_q, rows, dims.prefix_len,
                              dims.seqlen_k, dropout_p, rng.device)
        if save and mask.device.type == "cpu":
            if saved is None:
                saved = _SAVED_KEEP[id(rng)] = {}
                weakref.finalize(rng, _SAVED_KEEP.pop, id(rng), None)
            bits = np.packbits(mask.numpy().reshape(-1))
            # A torch tensor, not the NumPy array: memory accounting (the benchmarks' dispatch-mode
            # counter, torch's own) sees what the graph keeps.
            packed = saved[key] = torch.empty(bits.shape, dtype=torch.uint8)
            packed.numpy()[:] = bits
    return mask.reshape(shape).to(torch.float32).mul_(keep_scale(dropout_p))


def _grouped(x, dims: AttnDims):
    """(n, H, c, X) per query head -> (n, Hkv, G * c, X): the G query heads of each KV head as rows of
    one GEMM against that head (query head h = kv * G + g: the same memory order, so a view when x is
    laid out (n, H, c, X) with c * X contiguous, else a copy of x; never of K or V)."""
    n, _, c, X = x.shape
    return x.reshape(n, dims.kv_heads, dims.group_size * c, X)


def _per_query_head(y, dims: AttnDims):
    """(n, Hkv, G * c, X) -> (n, H, c, X), the inverse of _grouped."""
    n, _, rows, X = y.shape
    return y.reshape(n, dims.heads, rows // dims.group_size, X)


def _gemm_kv(x, kv, dims: AttnDims):
    """x (n, H, c, X) per query head times each one's KV head kv (n, Hkv, X, Y) -> (n, H, c, Y)."""
    return _per_query_head(torch.matmul(_grouped(x, dims), kv), dims)


def _gemm_prefix(x, prefix_kv, dims: AttnDims, transpose: bool):
    """x (n, H, c, X) per query head times its KV head's prefix block (Hkv, P, D) (transposed: (Hkv, D, P))
    -> (n, H, c, Y). Not torch.matmul: matmul broadcasts the prefix over n by expanding it and copying the
    expansion (the batch-expanded prefix this backend never builds); n goes into the GEMM rows instead, one
    bmm per KV head (what an einsum does, without its equation parsing: measured ~2x its cost per call at
    training shapes, and a layer runs seven of these per training step)."""
    xg = _grouped(x, dims)
    n, hkv, rows, X = xg.shape
    # (Hkv, n * G * c, X): a view when x's rows (n, c) merge, e.g. q seen (B, H, Lq, D) in (B, Lq, H, D) memory.
    y = torch.bmm(xg.transpose(0, 1).reshape(hkv, n * rows, X), prefix_kv.transpose(-1, -2) if transpose else prefix_kv)
    return _per_query_head(y.view(hkv, n, rows, y.shape[-1]).transpose(0, 1), dims)


def _reduce_prefix_grad(a, b, dims: AttnDims):
    """sum over rows of a^T b for a (n, H, c, P), b (n, H, c, D) -> (Hkv, P, D), summed over each group."""
    ag, bg = _grouped(a, dims), _grouped(b, dims)
    n, hkv, rows, P = ag.shape
    return torch.bmm(ag.permute(1, 3, 0, 2).reshape(hkv, P, n * rows),
                     bg.transpose(0, 1).reshape(hkv, n * rows, bg.shape[-1]))


def _probs(qc, kf, prefix: Optional[_Prefix], key_ok, causal, scale, dims: AttnDims, rows: slice, lse=None):
    """Scores of the query chunk against [prefix; keys] -> (p (B, H, c, P + Lk), lse (B, H, c))."""
    B, H = dims.batch, dims.heads
    c = rows.stop - rows.start
    s_seq = _gemm_kv(qc, kf.transpose(-1, -2), dims).mul_(scale)
    # Masks built with as few ops as possible (each costs microseconds of dispatch at training shapes):
    # key j is visible to query row rows.start + r iff j <= rows.start + r + Lk - Lq, a lower triangle.
    hidden = None
    if causal:
        hidden = torch.ones((c, dims.seqlen_k), dtype=torch.bool, device=qc.device).triu_(
            rows.start + dims.seqlen_k - dims.seqlen_q + 1)
    if key_ok is not None:
        padding = ~key_ok[:, None, None, :]
        hidden = padding if hidden is None else hidden | padding
    if hidden is not None:
        s_seq.masked_fill_(hidden, float("-inf"))
    if prefix is not None:
        s_pre = prefix.apply(qc, lambda x, t: _gemm_prefix(x, prefix.k[t], dims, transpose=True),
                             (B, H, c, prefix.P)).mul_(scale)
        if prefix.slot_ok is not None:
            s_pre.masked_fill_(~prefix.slot_ok[:, None, None, :], float("-inf"))
        s = torch.cat([s_pre, s_seq], dim=-1)
    else:
        s = s_seq
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    # A row that sees nothing has lse -inf: subtract 0 instead, every p is exp(-inf) = 0. (s is a fresh
    # buffer here: cat's, or s_seq's own, which nothing else holds.)
    lse_safe = torch.where(torch.isneginf(lse), 0.0, lse)
    return s.sub_(lse_safe[..., None]).exp_(), lse


# ---- CPU: the fused kernel for the own keys, the prefix slots explicitly ---------------------------------

def _use_fused_cpu_kernel(q, dims: AttnDims, dropout_p: float) -> bool:
    # Empty calls stay on the explicit path: the fused kernel dies of a division by zero (SIGFPE) at Lq = 0.
    return q.device.type == "cpu" and dropout_p == 0.0 and q.numel() > 0 and dims.seqlen_k > 0


def _own_key_mask(key_ok, causal: bool, dims: AttnDims, dtype):
    """(is_causal, additive mask or None, (B or 1, 1, Lq) rows that see at least one own key, or None for all).

    The fused kernel's is_causal is top-left aligned, which is ours (bottom-right) when Lq == Lk; with
    Lq < Lk the causal part goes into the mask. Its mask must have q's dtype.
    """
    Lq, Lk = dims.seqlen_q, dims.seqlen_k
    device = key_ok.device if key_ok is not None else None
    top_left = causal and Lq == Lk
    visible = None
    if causal and not top_left:
        qpos = torch.arange(Lq, device=device) + (Lk - Lq)
        visible = (torch.arange(Lk, device=device)[None, :] <= qpos[:, None])[None, None]  # (1, 1, Lq, Lk)
    if key_ok is not None:
        padding = key_ok[:, None, None, :]  # (B, 1, 1, Lk)
        visible = padding if visible is None else visible & padding
    if visible is None:
        return top_left, None, None
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
    if key_ok is None:
        return top_left, mask, None  # bottom-right causal alone leaves every query its own key
    # A row sees an own key iff an unmasked key lies at or before its causal limit.
    seen = key_ok.cumsum(-1) > 0 if causal else key_ok.any(-1, keepdim=True).expand(-1, Lk)
    return top_left, mask, seen[:, Lk - Lq:][:, None, :]  # (B, 1, Lq)


def _prefix_rows(dims: AttnDims) -> int:
    # Query rows per chunk of the prefix part: its (rows x P) score tiles stay far below the expanded
    # prefix's K and V (P x 2D per (batch, head)) that the concatenation builds.
    return max(16, min(dims.head_dim // 2, 2 * dims.prefix_len))


def _heads_major(x, rows: slice, batch_rows, dims: AttnDims):
    """The (B, H, L, X) chunk x[batch_rows, :, rows] as (Hkv, n * G * c, X), one GEMM batch per KV head
    (rows ordered (n, g, c)): a copy, or a view of x when the layout allows (read it, never write to it)."""
    chunk = x[:, :, rows] if batch_rows is None else x[batch_rows][:, :, rows]
    chunk = chunk.unflatten(1, (dims.kv_heads, dims.group_size))  # (n, Hkv, G, c, X)
    return chunk.transpose(0, 1).reshape(dims.kv_heads, -1, chunk.shape[-1])


def _write_heads_major(dst, rows: slice, batch_rows, y, dims: AttnDims, accumulate=False):
    """dst[batch_rows, :, rows] = y (or += y), y an (Hkv, n * G * c, X) tile laid out as _heads_major makes it."""
    X = y.shape[-1]
    y = y.view(dims.kv_heads, -1, dims.group_size, rows.stop - rows.start, X).transpose(0, 1)  # (n, Hkv, G, c, X)
    if batch_rows is None:
        target = dst[:, :, rows].unflatten(1, (dims.kv_heads, dims.group_size))
        target.add_(y) if accumulate else target.copy_(y)
        return
    # A task's batch rows are distinct, so index_put (with accumulate or not) is exact.
    index = (batch_rows[:, None], torch.arange(rows.start, rows.stop, device=dst.device)[None, :])
    dst.transpose(1, 2).unflatten(2, (dims.kv_heads, dims.group_size)).index_put_(
        index, y.permute(0, 3, 1, 2, 4), accumulate=accumulate)


def _task_prefix_scores(qh, prefix: _Prefix, task: int, scale):
    """Scores (Hkv, n, P) of an (Hkv, n, D) heads-major query tile against its task's prefix slots; slots
    past the task's prefix_lens at -inf."""
    s_pre = torch.matmul(qh, prefix.k[task].transpose(-1, -2)).mul_(scale)
    if prefix.task_slot_ok is not None:
        s_pre.masked_fill_(~prefix.task_slot_ok[task], float("-inf"))
    return s_pre


def _forward_fused_cpu(q, k, v, prefix: Optional[_Prefix], key_ok, causal, scale, dims: AttnDims):
    is_causal, mask, own_seen = _own_key_mask(key_ok, causal, dims, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, is_causal, attn_mask=mask, scale=scale)
    # The kernel's lse is laid out (B, Lq, H); the op promises a contiguous (B, H, Lq) (its fake says so).
    lse = lse.contiguous()
    if own_seen is not None:  # the kernel reports lse 0 for a row that sees nothing
        lse.masked_fill_(~own_seen, float("-inf"))
    if prefix is not None:
        # Merged in fp32 into the kernel's output ((B, L, H, D) memory seen as (B, H, L, D)).
        out = out.float()
        qf = q.float().transpose(1, 2)
        step = _prefix_rows(dims)
        for start in range(0, dims.seqlen_q, step):
            rows = slice(start, min(start + step, dims.seqlen_q))
            for task, batch_rows in prefix.groups:
                lse_own = _heads_major(lse[..., None], rows, batch_rows, dims)[..., 0]  # (Hkv, n)
                s_pre = _task_prefix_scores(_heads_major(qf, rows, batch_rows, dims), prefix, task, scale)
                lse_all = torch.logaddexp(lse_own, torch.logsumexp(s_pre, dim=-1))
                safe = torch.where(torch.isneginf(lse_all), 0.0, lse_all)
                o_pre = torch.matmul(s_pre.sub_(safe[..., None]).exp_(), prefix.v[task])  # (Hkv, n, D)
                merged = o_pre.addcmul_(_heads_major(out, rows, batch_rows, dims), torch.exp(lse_own - safe)[..., None])
                _write_heads_major(out, rows, batch_rows, merged, dims)
                _write_heads_major(lse[..., None], rows, batch_rows, lse_all[..., None], dims)
    # Contiguous (B, Lq, H, D), as the custom op's fake promises (a copy only if the kernel's layout differs).
    return out.transpose(1, 2).contiguous().to(q.dtype), lse


def _backward_fused_cpu(dout, q, k, v, out, lse, prefix: Optional[_Prefix], key_ok, causal, scale, dims: AttnDims):
    """Gradients from the merged out and lse (no lse gradient): for the own keys the fused kernel's
    backward, given the whole softmax's lse and output, recomputes p = exp(s - lse) and
    delta = rowsum(dout * out) of the softmax over [prefix; keys]; the prefix slots explicitly."""
    is_causal, mask, _ = _own_key_mask(key_ok, causal, dims, q.dtype)
    safe = torch.where(torch.isneginf(lse), 0.0, lse)  # a row that sees nothing: every p is 0
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.to(q.dtype).transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        out.to(q.dtype).transpose(1, 2), safe, 0.0, is_causal, attn_mask=mask, scale=scale)
    dpk = dpv = None
    if prefix is not None:
        qf, dof, of = (x.float().transpose(1, 2) for x in (q, dout, out))
        dq = dq.float()
        dpk = torch.zeros_like(prefix.k)
        dpv = torch.zeros_like(prefix.v)
        step = _prefix_rows(dims)
        for start in range(0, dims.seqlen_q, step):
            rows = slice(start, min(start + step, dims.seqlen_q))
            for task, batch_rows in prefix.groups:
                qh, doh = _heads_major(qf, rows, batch_rows, dims), _heads_major(dof, rows, batch_rows, dims)
                delta = (doh * _heads_major(of, rows, batch_rows, dims)).sum(-1)  # (Hkv, n)
                lse_h = _heads_major(safe[..., None], rows, batch_rows, dims)[..., 0]
                p_pre = _task_prefix_scores(qh, prefix, task, scale).sub_(lse_h[..., None]).exp_()
                ds_pre = torch.matmul(doh, prefix.v[task].transpose(-1, -2)).sub_(delta[..., None]).mul_(p_pre)
                _write_heads_major(dq, rows, batch_rows, torch.matmul(ds_pre, prefix.k[task]).mul_(scale),
                                   dims, accumulate=True)
                # (Hkv, P, D): the GEMM over the group's rows sums its query heads.
                dpk[task].baddbmm_(ds_pre.transpose(-1, -2), qh)
                dpv[task].baddbmm_(p_pre.transpose(-1, -2), doh)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dpk, dpv


def _prepare(q, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dims):
    prefix = _Prefix(prefix_k, prefix_v, prefix_idx, prefix_lens, dims, q.device) if dims.has_prefix else None
    key_ok = attention_mask != 0 if attention_mask is not None else None
    return prefix, key_ok


def forward_unchecked(q, k, v, prefix_k, prefix_v, args: AttnArgs, rng_state):
    prefix_idx, prefix_lens, attention_mask, causal, softmax_scale, dropout_p, _, dims = args
    prefix, key_ok = _prepare(q, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dims)
    scale = default_scale(dims.head_dim, softmax_scale)
    if _use_fused_cpu_kernel(q, dims, dropout_p):
        return _forward_fused_cpu(q, k, v, prefix, key_ok, causal, scale, dims)
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))  # (B, H, Lq, D), (B, Hkv, Lk, D)
    chunk = _chunk_rows(dims)
    one_chunk = 0 < dims.seqlen_q <= chunk  # the usual case: no (B, H, Lq, .) buffers to copy chunks into
    if not one_chunk:
        out = torch.empty((dims.batch, dims.heads, dims.seqlen_q, dims.head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((dims.batch, dims.heads, dims.seqlen_q), dtype=torch.float32, device=q.device)
    P = dims.prefix_len
    for start in range(0, dims.seqlen_q, chunk):
        rows = slice(start, min(start + chunk, dims.seqlen_q))
        p, lse_c = _probs(qf[:, :, rows], kf, prefix, key_ok, causal, scale, dims, rows)
        if dropout_p > 0.0:
            p.mul_(_keep(rng_state, dropout_p, dims, rows, save=True))
        o = _gemm_kv(p[..., P:], vf, dims)
        if prefix is not None:
            o.add_(prefix.apply(p[..., :P], lambda x, t: _gemm_prefix(x, prefix.v[t], dims, transpose=False),
                                o.shape))
        if one_chunk:
            out, lse = o, lse_c
        else:
            out[:, :, rows], lse[:, :, rows] = o, lse_c
    # Contiguous (B, Lq, H, D), as the custom op's fake promises: torch.compile plans views on it.
    return out.transpose(1, 2).contiguous().to(q.dtype), lse


def backward_unchecked(dout, dlse, q, k, v, out, lse, prefix_k, prefix_v, args: AttnArgs, rng_state):
    prefix_idx, prefix_lens, attention_mask, causal, softmax_scale, dropout_p, _, dims = args
    prefix, key_ok = _prepare(q, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dims)
    scale = default_scale(dims.head_dim, softmax_scale)
    # The fused kernel's backward is not differentiable: double backward (create_graph=True) and lse
    # gradients take the explicit path.
    if _use_fused_cpu_kernel(q, dims, dropout_p) and dlse is None and not torch.is_grad_enabled():
        dq, dk, dv, dpk, dpv = _backward_fused_cpu(dout, q, k, v, out, lse, prefix, key_ok, causal, scale, dims)
        dq, dk, dv = (g.contiguous().to(x.dtype) for g, x in ((dq, q), (dk, k), (dv, v)))
        return (dq, dk, dv, *_prefix_grads(dpk, dpv, prefix_k, prefix_v, scale))
    qf, kf, vf, dof, of = (x.float().transpose(1, 2) for x in (q, k, v, dout, out))  # k, v: (B, Hkv, Lk, D)
    delta = (dof * of).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    chunk = _chunk_rows(dims)
    one_chunk = 0 < dims.seqlen_q <= chunk
    dq = None if one_chunk else torch.empty_like(qf)
    dk = dv = dpk = dpv = None  # sums over chunks, started by the first
    add = lambda total, x: x if total is None else total.add_(x)  # noqa: E731
    P = dims.prefix_len
    B, H = dims.batch, dims.heads
    for start in range(0, dims.seqlen_q, chunk):
        rows = slice(start, min(start + chunk, dims.seqlen_q))
        c = rows.stop - rows.start
        qc, doc = qf[:, :, rows], dof[:, :, rows]
        p, _ = _probs(qc, kf, prefix, key_ok, causal, scale, dims, rows, lse=lse[:, :, rows].float())
        dp_seq = _gemm_kv(doc, vf.transpose(-1, -2), dims)
        if prefix is not None:
            dp_pre = prefix.apply(doc, lambda x, t: _gemm_prefix(x, prefix.v[t], dims, transpose=True), (B, H, c, P))
            dp = torch.cat([dp_pre, dp_seq], dim=-1)
        else:
            dp = dp_seq
        p_kept = p
        if dropout_p > 0.0:
            keep = _keep(rng_state, dropout_p, dims, rows, save=False)
            p_kept = p * keep
            dp.mul_(keep)  # dp is a fresh buffer (cat's, or dp_seq's)
        ds = dp.sub_(delta[:, :, rows, None]).mul_(p)
        dq_c = _gemm_kv(ds[..., P:], kf, dims)
        # dK, dV (B, Hkv, Lk, D): the GEMM over the group's G * c rows sums the group's query heads.
        dk = add(dk, torch.matmul(_grouped(ds[..., P:], dims).transpose(-1, -2), _grouped(qc, dims)))
        dv = add(dv, torch.matmul(_grouped(p_kept[..., P:], dims).transpose(-1, -2), _grouped(doc, dims)))
        if prefix is not None:
            ds_pre, pk_pre = ds[..., :P], p_kept[..., :P]
            dq_c.add_(prefix.apply(ds_pre, lambda x, t: _gemm_prefix(x, prefix.k[t], dims, transpose=False),
                                   dq_c.shape))
            dpk = add(dpk, prefix.reduce(ds_pre, qc, lambda a, b: _reduce_prefix_grad(a, b, dims)))
            dpv = add(dpv, prefix.reduce(pk_pre, doc, lambda a, b: _reduce_prefix_grad(a, b, dims)))
        if one_chunk:
            dq = dq_c
        else:
            dq[:, :, rows] = dq_c
    if dk is None:  # Lq = 0: no chunk ran
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        if prefix is not None:
            dpk, dpv = torch.zeros_like(prefix.k), torch.zeros_like(prefix.v)
    dq = dq.mul_(scale).transpose(1, 2).contiguous().to(q.dtype)
    dk = dk.mul_(scale).transpose(1, 2).contiguous().to(k.dtype)
    dv = dv.transpose(1, 2).contiguous().to(v.dtype)
    return (dq, dk, dv, *_prefix_grads(dpk, dpv, prefix_k, prefix_v, scale))


def _prefix_grads(dpk, dpv, prefix_k, prefix_v, scale):
    """The prefix gradients (T, Hkv, P, D) fp32 (dpk still unscaled) in the prefix's shape and dtype,
    contiguous (the custom op's fake promises it; a reshape of the transpose may stay a strided view)."""
    if dpk is not None:
        dpk = (dpk * scale).transpose(1, 2).reshape(prefix_k.shape).to(prefix_k.dtype).contiguous()
        dpv = dpv.transpose(1, 2).reshape(prefix_v.shape).to(prefix_v.dtype).contiguous()
    elif prefix_k is not None:
        dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    return dpk, dpv
