"""The pure-PyTorch backend: the kernels' algorithm written with torch ops, for CPU users.

Same contract and same numerics as the Triton backend (fp32 math, the same dropout mask bit for
bit), forward and backward written out explicitly so that both backends share one autograd and
custom-op path. It keeps no batch-expanded prefix: prefix scores come from GEMMs against the
(P, Hkv, D) block (or the fused CPU kernel reads it with batch stride 0), and a bank is handled task
by task over the rows that use each task. Batch-sized prefix tensors exist only within a call: the
CPU backward paths return the prefix gradient per batch row, summed at once, and the CPU dropout
path builds [prefix; keys] for its GEMMs (see below).

Grouped KV heads (k, v, prefix with Hkv heads, H = Hkv * G query heads; query head h reads KV head
h // G): KV heads are never expanded. The G query heads of a KV head are laid out as G * rows of
one GEMM against that KV head (q (B, H, c, D) seen as (B, Hkv, G * c, D): the same memory order),
so dK, dV and the prefix gradients come out summed over each group by the GEMMs themselves.
Scores, the dropout mask, lse and delta stay per query head (B, H, c, .).

Three paths:
- CPU tensors without dropout (inference, and training without attention dropout): the sequence's
  own keys go through PyTorch's fused CPU attention kernel (``_scaled_dot_product_flash_attention_
  for_cpu``: tiled online softmax, no Lq x Lk score matrix), and so do each task's visible prefix
  slots, read as one (Hkv, P, D) block (never expanded): against all the part's query rows as one batch
  of B * Lq rows where the work is large enough (decoding at B 8-32 with P 32-200: 1.3-3.6x faster than B
  batches), else with batch stride 0; the parts are merged by log-sum-exp. Its backward gets the merged
  output and lse, from which the fused kernel's recomputed probabilities and row sums are exactly those
  of the whole softmax over [prefix; keys]; the prefix part's gradient comes back per batch row (what
  SDPA over the concatenation also holds, as part of its dK and dV) and is summed in fp32. Few, large
  ops: at small shapes a call's cost is its count of dispatched ops. It works on heads-first (B, H, L, D)
  views, the layout of the kernel and of transformers' attention layers, which the integrations' calls
  hand over as they are (``forward_heads_first`` without autograd; ``AttnArgs.heads_first`` through the
  autograd node, gradients in that layout too). A small fp32 decoding call (one query per row, every row
  on one task's prefix, at most ``DECODE_C_MAX_MACS``) runs in C instead (``prefix_attn/decode_cpu.c``, built
  on first use): one call where the kernel's route costs two kernel calls, two views and a merge (at the
  quick sweep's tiny shapes about 3x the time); its backward is the fused path's, from its out and lse.
- CPU tensors with dropout, a shared prefix (no bank, no prefix_lens), equal heads and one query chunk
  (GPT-2's training call): one softmax over [prefix; keys], the keep-mask the kernels' Philox mask bit
  for bit, and the forward's probabilities and keep-mask kept for the backward (as SDPA's math path keeps
  its own; ``_SAVED_KEEP``), so the backward does not compute the scores again. Each product is one GEMM
  over the (batch, head) matrices against [prefix; keys] (or [prefix; values]), built for that product
  and dropped after it: one at a time, where SDPA over the concatenation keeps both from forward to
  backward, so the peak stays at or below SDPA's (tests/test_torch_backend_dropout_cpu.py). The
  softmax scale and the dropout factor are the GEMMs' alpha; q, k, v are read heads-first, as the
  integrations hand them over, and the gradients leave as views of the GEMMs' results. Keeping
  them from the forward saved about 20 us per call at the quick sweep's tiny shape and raised the peak of
  a GPT-2 small training step on CPU (B 4, L 64, P 10) from 0.97x to 1.03x PEFT's: not kept. Separate
  GEMMs against the prefix block and the keys cost a GEMM, a concatenation of scores and an add more per
  product: about 10% of a GPT-2 training call at the quick sweep's CPU shape.
- Otherwise (other dropout calls; CUDA tensors; double backward), scores of [prefix; keys] are
  materialised for query chunks that stay within ``CHUNK_ELEMENTS``. On CPU the forward keeps each
  chunk's dropout keep-mask bit-packed for the backward (``_SAVED_KEEP``: 1/32 of a chunk's fp32
  scores, freed with the graph) instead of drawing it twice.
The keep-mask of CPU tensors is drawn in C (``prefix_attn/keep_mask_cpu.c``, built on first use; NumPy where no
compiler is found): drawn with NumPy it was the largest single cost of a dropout call at small training shapes.
"""
import math
import weakref
from typing import Optional

import numpy as np
import torch

from prefix_attn import decode_cpu
from prefix_attn.args import AttnArgs
from prefix_attn.checks import FLOAT32_MAX, AttnDims, default_scale
from prefix_attn.dropout import keep_mask_grid, keep_scale
from prefix_attn.key_masks import causal_bias, causal_hidden, dropout_bias, host_array, own_key_mask, visible_keys

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


# What a dropout forward keeps for the backward of the same call: id(rng_state) -> {key: state}, with key
# (seed, offset, mask shape, Lq, first row, dropout_p) (``_keep_key``). The chunked path keeps each chunk's
# keep-mask bit-packed (B * H * c * (P + Lk) / 8 bytes); the CPU dropout path keeps its probabilities and
# bool keep-mask under the key plus "probs", popped by its backward. An entry lives as long
# as the call's rng_state tensor (which the autograd node saves for its backward), so it goes with the
# graph. The key holds everything the state is a function of, so a hit is what the backward would compute,
# bit for bit; a miss (another rng_state tensor, e.g. through the custom op) computes it again.
_SAVED_KEEP: dict = {}


def _saved_for(rng) -> dict:
    """The forward's saved state of the call that drew ``rng`` (created on first use, dropped with rng)."""
    saved = _SAVED_KEEP.get(id(rng))
    if saved is None:
        saved = _SAVED_KEEP[id(rng)] = {}
        weakref.finalize(rng, _SAVED_KEEP.pop, id(rng), None)
    return saved


def _keep_key(rng, dropout_p: float, dims: AttnDims, rows: slice):
    """(seed, offset, the key of this chunk's saved state, its mask shape)."""
    seed, offset = (int(x) for x in rng.tolist())
    shape = (dims.batch, dims.heads, rows.stop - rows.start, dims.prefix_len + dims.seqlen_k)
    return seed, offset, (seed, offset, shape, dims.seqlen_q, rows.start, dropout_p), shape


def _keep(rng, dropout_p: float, dims: AttnDims, rows: slice, save: bool) -> torch.Tensor:
    """Dropout keep-mask (B, H, chunk, P + Lk) bool for the query rows ``rows`` (the kept values' factor
    keep_scale is applied by the caller to a smaller operand). save: keep it (packed) for the backward;
    else take it from there when the forward saved it."""
    seed, offset, key, shape = _keep_key(rng, dropout_p, dims, rows)
    saved = _SAVED_KEEP.get(id(rng))
    packed = None if save or saved is None else saved.get(key)
    if packed is not None:
        mask = torch.from_numpy(np.unpackbits(packed.numpy(), count=math.prod(shape)).view(np.bool_))
    else:
        mask = keep_mask_grid(seed, offset, dims.batch * dims.heads, dims.seqlen_q, rows, dims.prefix_len,
                              dims.seqlen_k, dropout_p, rng.device)
        if save and mask.device.type == "cpu":
            bits = np.packbits(mask.numpy().reshape(-1))
            # A torch tensor, not the NumPy array: memory accounting (the benchmarks' dispatch-mode
            # counter, torch's own) sees what the graph keeps.
            packed = _saved_for(rng)[key] = torch.empty(bits.shape, dtype=torch.uint8)
            packed.numpy()[:] = bits
    return mask.reshape(shape)


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
    s_seq = _gemm_kv(qc, kf.transpose(-1, -2), dims).mul_(scale)
    # Masks built with as few ops as possible (each costs microseconds of dispatch at training shapes).
    hidden = causal_hidden(rows.start, rows.stop, dims.seqlen_q, dims.seqlen_k, qc.device) if causal else None
    if key_ok is not None:
        padding = ~key_ok[:, None, None, :]
        hidden = padding if hidden is None else hidden | padding
    if hidden is not None:
        s_seq.masked_fill_(hidden, float("-inf"))
    s = torch.cat([_prefix_scores(qc, prefix, scale, dims), s_seq], dim=-1) if prefix is not None else s_seq
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    # s is a fresh buffer here: cat's, or s_seq's own, which nothing else holds.
    return s.sub_(_finite_lse(lse)[..., None]).exp_(), lse


# ---- CPU: the fused kernel for the own keys, the prefix slots explicitly ---------------------------------

def uses_fused_cpu_kernel(q, dims: AttnDims, dropout_p: float) -> bool:
    """Whether a forward runs on the fused CPU path (CPU tensors, no dropout, not empty)."""
    # Empty calls stay on the explicit path: the fused kernel dies of a division by zero (SIGFPE) at Lq = 0.
    # is_cpu: q.device builds a torch.device (about 4 K instructions), and this runs on every CPU call.
    return q.is_cpu and dropout_p == 0.0 and q.numel() > 0 and dims.seqlen_k > 0


def _prefix_scores(x, prefix: _Prefix, scale, dims: AttnDims):
    """Scores (B, H, c, P) of query rows x (B, H, c, D) against each row's task prefix; slots past a task's
    prefix_lens at -inf."""
    s_pre = prefix.apply(x, lambda rows, t: _gemm_prefix(rows, prefix.k[t], dims, transpose=True),
                         x.shape[:-1] + (prefix.P,)).mul_(scale)
    if prefix.slot_ok is not None:
        s_pre.masked_fill_(~prefix.slot_ok[:, None, None, :], float("-inf"))
    return s_pre


def _prefix_times(x, prefix_kv, prefix: _Prefix, dims: AttnDims, transpose: bool, width: int):
    """x (B, H, c, X) times each row's task block of prefix_kv (T, Hkv, P, D) (transposed: (.., D, P))
    -> (B, H, c, width)."""
    return prefix.apply(x, lambda rows, t: _gemm_prefix(rows, prefix_kv[t], dims, transpose=transpose),
                        x.shape[:-1] + (width,))


def _finite_lse(lse):
    """lse with -inf (a row that sees nothing) raised to the lowest float: exp(s - it) is still 0 for every
    score of such a row (all -inf), where subtracting -inf itself would give NaN. NaN stays NaN."""
    return lse.clamp_min(-FLOAT32_MAX)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype; x itself when it already is (a no-op .to() still costs a dispatch, about a microsecond)."""
    return x if x.dtype == dtype else x.to(dtype)


def _prefix_parts(prefix_idx, prefix_lens, dims: AttnDims) -> list:
    """The fused path's prefix work: (task, its batch rows as an int64 tensor or None for every row, visible
    slots) per task in use that has a visible slot. CPU tensors, read on the host through NumPy (no device
    to wait for, no dispatched op)."""
    if not dims.has_prefix:
        return []
    lens = host_array(prefix_lens) if prefix_lens is not None else None
    if not dims.is_bank:
        n_slots = dims.prefix_len if lens is None else int(lens[0])
        return [(0, None, n_slots)] if n_slots > 0 else []
    idx = host_array(prefix_idx)
    tasks = np.unique(idx)
    if len(tasks) == 1:
        n_slots = dims.prefix_len if lens is None else int(lens[tasks[0]])
        return [(int(tasks[0]), None, n_slots)] if n_slots > 0 else []
    parts = []
    for task in tasks.tolist():
        n_slots = dims.prefix_len if lens is None else int(lens[task])
        if n_slots > 0:
            parts.append((task, torch.from_numpy(np.flatnonzero(idx == task)), n_slots))
    return parts


def _prefix_block(prefix_x, task: int, n_slots: int, n_rows: int, dims: AttnDims):
    """A task's first n_slots prefix keys (or values) as the fused kernel's (n_rows, Hkv, n_slots, D) input: a
    view with batch stride 0 (the kernel reads the same block for every row; nothing is expanded)."""
    stride_p, stride_h, stride_d = prefix_x.stride()[-3:]
    offset = prefix_x.storage_offset() + (task * prefix_x.stride(0) if dims.is_bank else 0)
    return prefix_x.as_strided((n_rows, dims.kv_heads, n_slots, dims.head_dim), (0, stride_h, stride_p, stride_d), offset)


# PyTorch's fused CPU attention through its torch.* binding: about 2 us less per call than torch.ops.aten's
# Python overload dispatch, and a decoding layer calls it twice.
_flash_cpu_kernel = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu",
                            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)


def _flash_cpu(q, k, v, is_causal, mask, scale):
    """PyTorch's fused CPU attention on (B, heads, L, D) views: (out (B, H, Lq, D) in (B, Lq, H, D) memory,
    lse (B, H, Lq), 0 for a row that sees nothing)."""
    return _flash_cpu_kernel(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)


def _forward_fused_cpu(qt, kt, vt, prefix_k, prefix_v, parts, attention_mask, causal, scale, dims: AttnDims,
                       need_lse=True):
    """The own keys and each task's visible prefix slots through the fused kernel, merged by log-sum-exp, on
    heads-first qt (B, H, Lq, D), kt, vt (B, Hkv, Lk, D): (out (B, H, Lq, D) in q's dtype, lse (B, H, Lq);
    need_lse=False: lse may come back None, one op fewer per decoding call)."""
    is_causal, mask, own_hidden = own_key_mask(attention_mask, causal, dims.seqlen_q, dims.seqlen_k, qt.dtype)
    out, lse = _flash_cpu(qt, kt, vt, is_causal, mask, scale)
    if own_hidden is not None:
        lse.masked_fill_(own_hidden, float("-inf"))
    for task, rows, n_slots in parts:
        o_pre, lse_pre = _prefix_part(qt if rows is None else qt[rows], prefix_k, prefix_v, task, n_slots, scale, dims)
        if rows is None:  # the only part (a shared prefix, or a bank with one task in use)
            out, lse = _merge(out, lse, o_pre, lse_pre, with_lse=need_lse)
        else:
            out[rows], lse[rows] = _merge(out[rows], lse[rows], o_pre, lse_pre)
    return out, lse


def forward_heads_first(qt, kt, vt, prefix_k, prefix_v, args: AttnArgs, need_lse: bool = True):
    """``forward_unchecked`` on the fused CPU path (``uses_fused_cpu_kernel``) for heads-first qt (B, H, Lq, D),
    kt, vt (B, Hkv, Lk, D), the transposes of the op's q, k, v, as transformers' attention layers hold them (no
    transposes to take and undo, about 3 us each on torch 2.11): (out (B, Lq, H, D), lse (B, H, Lq) or None
    without need_lse), contiguous, as the custom op's fake promises (out already is: the kernel writes
    (B, Lq, H, D) memory)."""
    prefix_idx, prefix_lens, attention_mask, causal, scale, _, _, dims, _ = args
    parts = _prefix_parts(prefix_idx, prefix_lens, dims)
    if dims.seqlen_q == 1 and qt.dtype == torch.float32 and len(parts) <= 1:
        found = _decode_in_c(qt, kt, vt, prefix_k, prefix_v, parts, attention_mask, scale, dims, need_lse)
        if found is not None:
            return found
    qt, kt, vt, prefix_k, prefix_v = _head_dim_dense(qt, kt, vt, prefix_k, prefix_v)
    out, lse = _forward_fused_cpu(qt, kt, vt, prefix_k, prefix_v, parts, attention_mask, causal, scale, dims, need_lse)
    return out.transpose(1, 2).contiguous(), None if lse is None else lse.contiguous()


def _head_dim_dense(*tensors) -> tuple:
    """The tensors with head_dim (the last dimension) at stride 1: a copy of each that has another (None stays
    None). PyTorch's fused CPU kernels read head_dim as dense and silently compute something else otherwise (SDPA
    itself takes its math path for such inputs); the integrations' tensors always have stride 1 there."""
    if all(x is None or x.stride(-1) == 1 for x in tensors):
        return tensors
    return tuple(x if x is None or x.stride(-1) == 1 else x.contiguous() for x in tensors)


# Multiply-adds of a decoding call, B * H * (visible prefix slots + Lk) * D, up to which the single-threaded C step
# (prefix_attn.decode_cpu) runs it rather than the fused kernel's two calls and merge. Measured on the 2-core CPU
# (torch 2.11, 2 threads, fp32, best of 3 loops, 105 shapes: B 1-32, H 4/Hkv 4 at D 16, H 12/12 and 32/8 at
# D 64, P 8-200, Lk 16-256): up to 2**15 the C step is 1.65-7.1x faster (most 2-4x); from 2**15 to 2**16
# 0.80-2.2x; beyond, the fused kernel's two threads win more often. A whole layer call through the integrations'
# entry at the quick sweep's B 2, H 4, D 16, P 8, 17-48 keys: 23-26 us against 81-83 us (SDPA over PEFT's
# concatenation: 13-15 us).
DECODE_C_MAX_MACS = 1 << 15


def _decode_in_c(qt, kt, vt, prefix_k, prefix_v, parts, attention_mask, scale, dims: AttnDims, need_lse):
    """forward_heads_first's result for a decoding call (Lq = 1, fp32) whose rows all see one task's prefix (or
    none) and whose work is at most DECODE_C_MAX_MACS, computed in C; None otherwise, or without the C function.
    With one query, causal or not, a row sees every visible key."""
    task, rows, n_slots = parts[0] if parts else (0, None, 0)
    if rows is not None or dims.batch * dims.heads * (n_slots + dims.seqlen_k) * dims.head_dim > DECODE_C_MAX_MACS:
        return None
    return decode_cpu.decode(qt, kt, vt, prefix_k, prefix_v, task, n_slots, visible_keys(attention_mask), scale,
                             dims.is_bank, need_lse)


# Query rows x prefix slots from which a prefix part runs as one batch of n * Lq query rows (see _prefix_part).
# The prefix part alone on the 2-core CPU (torch 2.11, fp32, best of 11 interleaved rounds, 54 shapes: H 4 and
# 12, Hkv 2-12, D 16 and 64, B * Lq 2-512, P 8-200): from 1024 on one batch is 0.96-3.6x the speed of B
# batches (decoding, H 12, D 64: B 8, P 200 98 against 250 us; B 32, P 200 265 against 963 us; prefill B 8,
# L 64, P 200 3.3 against 4.1 ms); at 512 the same; below, from 0.49x (B 2 decoding) to 1.46x.
FOLD_MIN_ROWS_X_SLOTS = 1024


def _prefix_part(q_rows, prefix_k, prefix_v, task: int, n_slots: int, scale, dims: AttnDims):
    """(out (n, H, Lq, D) in (n, Lq, H, D) memory, lse (n, H, Lq)) of query rows q_rows (n, H, Lq, D) against
    a task's first n_slots prefix slots, through the fused kernel.

    Every query row sees the same slots, without causality: when the rows' (n, Lq) dimensions merge into one
    (a view), the kernel gets them as one batch of n * Lq query rows, (1, H, n * Lq, D), against the
    (1, Hkv, n_slots, D) block, so that it runs GEMMs over all rows at once instead of n small ones against a
    batch-stride-0 block (below FOLD_MIN_ROWS_X_SLOTS the n small ones cost less)."""
    n, H, Lq, D = q_rows.shape
    if n * Lq * n_slots >= FOLD_MIN_ROWS_X_SLOTS and (n == 1 or Lq == 1 or q_rows.stride(0) == Lq * q_rows.stride(2)):
        rows = q_rows.transpose(1, 2).view(1, n * Lq, H, D).transpose(1, 2)  # the merge is checked above
        out, lse = _flash_cpu(rows, _prefix_block(prefix_k, task, n_slots, 1, dims),
                              _prefix_block(prefix_v, task, n_slots, 1, dims), False, None, scale)
        return out.transpose(1, 2).view(n, Lq, H, D).transpose(1, 2), lse.view(H, n, Lq).transpose(0, 1)
    return _flash_cpu(q_rows, _prefix_block(prefix_k, task, n_slots, n, dims),
                      _prefix_block(prefix_v, task, n_slots, n, dims), False, None, scale)


def _merge(own_out, own_lse, o_pre, lse_pre, with_lse=True):
    """(out, lse; None without with_lse) of the softmax over [prefix; own keys] from its two parts' (out, lse):
    out is the parts' mix with weight sigmoid(own_lse - lse_pre) = exp(own_lse - lse) on the own part (0 for
    a row that sees no own key: lse -inf), computed in fp32 and in place in o_pre (a copy for half-precision
    inputs). Every row of a part sees a prefix slot, so lse_pre and the merged lse are finite."""
    own_weight = torch.sub(own_lse, lse_pre).sigmoid_().unsqueeze_(-1)
    out = _as(o_pre, torch.float32).lerp_(_as(own_out, torch.float32), own_weight)
    return _as(out, own_out.dtype), torch.logaddexp(own_lse, lse_pre) if with_lse else None


def _backward_fused_cpu(dout, qt, kt, vt, out, lse, prefix_k, prefix_v, parts, attention_mask, causal, scale,
                        dims: AttnDims):
    """Gradients from the merged out and lse (no lse gradient), of heads-first qt (B, H, Lq, D), kt, vt
    (B, Hkv, Lk, D) (dq, dk, dv come back heads-first too): the fused kernel's backward, given the whole
    softmax's lse and output, recomputes p = exp(s - lse) and delta = rowsum(dout * out) of the softmax over
    [prefix; keys]; so it runs once on the own keys and once per prefix part, and the parts' gradients add
    up. A part's prefix gradient comes back per batch row and is summed over its rows in fp32."""
    dout, qt, kt, vt, prefix_k, prefix_v = _head_dim_dense(dout, qt, kt, vt, prefix_k, prefix_v)
    is_causal, mask, _ = own_key_mask(attention_mask, causal, dims.seqlen_q, dims.seqlen_k, qt.dtype)
    safe = _finite_lse(lse)
    dot, ot = (_as(x, qt.dtype).transpose(1, 2) for x in (dout, out))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dot, qt, kt, vt, ot, safe, 0.0, is_causal, attn_mask=mask, scale=scale)
    dpk = dpv = None
    if prefix_k is not None:
        # One part with every slot (a shared prefix): its row sums are the gradients, no zeros to add into.
        whole = not dims.is_bank and len(parts) == 1 and parts[0][2] == dims.prefix_len
        if not whole:
            dpk = torch.zeros(prefix_k.shape, dtype=torch.float32)
            dpv = torch.zeros(prefix_v.shape, dtype=torch.float32)
        for task, rows, n_slots in parts:
            n_rows = dims.batch if rows is None else len(rows)
            rows_of = (lambda x: x) if rows is None else (lambda x: x[rows])
            dq_pre, dpk_rows, dpv_rows = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                rows_of(dot), rows_of(qt), _prefix_block(prefix_k, task, n_slots, n_rows, dims),
                _prefix_block(prefix_v, task, n_slots, n_rows, dims), rows_of(ot), rows_of(safe), 0.0, False, scale=scale)
            dq.add_(dq_pre) if rows is None else dq.index_add_(0, rows, dq_pre)
            # (n_rows, Hkv, n_slots, D) -> the task's (n_slots, Hkv, D) slots.
            if whole:
                dpk, dpv = (g.sum(0, dtype=torch.float32).transpose(0, 1) for g in (dpk_rows, dpv_rows))
                continue
            for grad, grad_rows in ((dpk, dpk_rows), (dpv, dpv_rows)):
                (grad[task] if dims.is_bank else grad)[:n_slots].add_(grad_rows.sum(0, dtype=torch.float32).transpose(0, 1))
        dpk, dpv = _as(dpk, prefix_k.dtype).contiguous(), _as(dpv, prefix_v.dtype).contiguous()
    return dq, dk, dv, dpk, dpv


# ---- CPU with dropout: a shared prefix, equal heads, one query chunk (see the module docstring) -----------

def _use_dropout_cpu_path(q, dims: AttnDims, dropout_p: float, prefix_lens) -> bool:
    return (q.is_cpu and dropout_p > 0.0 and q.numel() > 0 and dims.has_prefix and not dims.is_bank
            and prefix_lens is None and dims.group_size == 1 and _chunk_rows(dims) >= dims.seqlen_q)


def _with_prefix(prefix_x, xt):
    """[prefix; x] (B * H, P + Lk, D) fp32, contiguous, of a shared prefix (P, H, D) and heads-first xt
    (B, H, Lk, D): built for one product (see the module docstring), so that scores, outputs and each gradient
    are one GEMM; in this layout the GEMMs read it (or its transpose) in place."""
    both = torch.cat([prefix_x.transpose(0, 1).expand(xt.shape[0], -1, -1, -1), xt], 2)
    return _as(both, torch.float32).view(-1, both.shape[2], both.shape[3])


def _batched_heads(xt):
    """Heads-first (B, H, L, D) -> (B * H, L, D) fp32, contiguous: the GEMMs' batch of (batch, head) matrices; a
    view of xt when it already is fp32 and contiguous, else one copy."""
    B, H, L, D = xt.shape
    return _contiguous_as(xt, torch.float32).view(B * H, L, D)


def _contiguous_as(x, dtype: torch.dtype):
    """x contiguous in dtype, in one op at most (Tensor.to ignores memory_format when the dtype already matches)."""
    return x.contiguous() if x.dtype == dtype else x.to(dtype, memory_format=torch.contiguous_format)


def _heads_first(x, factor: float):
    """(B, L, H, D) -> (B * H, L, D) fp32 times ``factor``, a new buffer (x may be any view, an expanded
    gradient among them, and is never written)."""
    B, L, H, D = x.shape
    y = torch.empty((B * H, L, D), dtype=torch.float32, device=x.device)
    # The product in fp32 (an out= of another dtype would compute it in x's dtype, then cast).
    torch.mul(_as(x, torch.float32).transpose(1, 2), factor, out=y.view(B, H, L, D))
    return y


def _split_heads(y, B: int, dtype: torch.dtype):
    """(B * H, L, D) -> its heads-first (B, H, L, D) view in dtype (a copy only for another dtype): how the
    gradients leave the backward (the custom op, whose fake promises contiguous gradients, makes them so)."""
    return _as(y.view(B, -1, y.shape[1], y.shape[2]), dtype)


def _factor(keep):
    """The bool keep-mask as the uint8 0/1 factor the products take: a float tensor times a bool one takes a
    slower path than times uint8 (measured on CPU: 15 against 6 us at 10k elements, 1.06 against 0.24 ms in
    place at 2M); a view, the same bits."""
    return keep.view(torch.uint8)


def _dropout_cpu_probs(qt, kk, attention_mask, causal, scale, dims: AttnDims, need_lse: bool = True):
    """qt (B * H, Lq, D), kk = [prefix; keys] (B * H, P + Lk, D), fp32 -> (p (B * H, Lq, P + Lk), lse (B * H, Lq),
    None without need_lse). Every row sees the P prefix slots, so none is empty and one softmax gives p;
    lse = max - log(max p)."""
    Lq, P = qt.shape[1], dims.prefix_len
    if causal:
        s = torch.baddbmm(causal_bias(Lq, dims.seqlen_k, P), qt, kk.transpose(1, 2), alpha=scale)
    else:
        s = torch.bmm(qt, kk.transpose(1, 2)).mul_(scale)
    hidden = dropout_bias(attention_mask, P)  # (B, P + Lk) or None
    if hidden is not None:
        s.view(dims.batch, dims.heads, Lq, -1).add_(hidden[:, None, None, :])
    p = torch.softmax(s, dim=-1)
    return p, s.amax(-1).sub_(p.amax(-1).log_()) if need_lse else None


def _forward_dropout_cpu(q, k, v, prefix_k, prefix_v, attention_mask, causal, scale, dropout_p, rng, dims: AttnDims,
                         need_lse: bool = True):
    """(out (B, Lq, H, D) contiguous, lse (B, H, Lq) or None without need_lse) of heads-first q (B, H, Lq, D),
    k, v (B, H, Lk, D)."""
    B, H, Lq, D = q.shape
    seed, offset, key, _ = _keep_key(rng, dropout_p, dims, slice(0, Lq))
    qt = _batched_heads(q)
    p, lse = _dropout_cpu_probs(qt, _with_prefix(prefix_k, k), attention_mask, causal, scale, dims, need_lse)
    keep = _factor(_dropout_cpu_keep(seed, offset, dropout_p, dims))
    # Kept with p (1.25x a score-sized fp32 tensor where SDPA's math path keeps 2.25x: its softmax output, the
    # dropped probabilities and its bool mask); the chunked backward, if it runs, computes them again. Not qt:
    # its copy of q is one op in the backward, and kept in every layer until then it raised the peak of a
    # GPT-2 small training step on CPU (B 4, L 64, P 10) from 0.97x to 1.00x PEFT's.
    _saved_for(rng)[key + ("probs",)] = (p, keep)
    # keep_scale as the GEMM's alpha; beta = 0: the input (any tensor of the output's shape) is not read.
    o = torch.baddbmm(qt, p * keep, _with_prefix(prefix_v, v), beta=0.0, alpha=keep_scale(dropout_p))
    out = _contiguous_as(o.view(B, H, Lq, D).transpose(1, 2), q.dtype)
    return out, None if lse is None else lse.view(B, H, Lq)


def _dropout_cpu_keep(seed: int, offset: int, dropout_p: float, dims: AttnDims) -> torch.Tensor:
    """The keep-mask (B * H, Lq, P + Lk) bool of every query row."""
    return keep_mask_grid(seed, offset, dims.batch * dims.heads, dims.seqlen_q, slice(0, dims.seqlen_q),
                          dims.prefix_len, dims.seqlen_k, dropout_p, torch.device("cpu"))


def _backward_dropout_cpu(dout, dlse, q, k, v, out, prefix_k, prefix_v, attention_mask, causal, scale, dropout_p, rng,
                          dims: AttnDims):
    """The gradients from the forward's p and keep-mask, taken out of _SAVED_KEEP (p is overwritten here;
    a second backward of a retained graph, the custom op's rng_state, or a cleared _SAVED_KEEP compute them
    again by the forward's ops: the same bits). Each buffer is dropped once used: the peak stays below SDPA's
    backward. Every product is one GEMM over the (batch, head) matrices (B * H, ., .), with the softmax scale
    as its alpha. q, k, v heads-first, (B, H, L, D), and so are dq, dk, dv: views of their (B * H, L, D) GEMM
    results (_split_heads)."""
    B, H, Lq, D = q.shape
    qt = _batched_heads(q)
    p, keep = _saved_probs(qt, k, prefix_k, attention_mask, causal, scale, dropout_p, rng, dims)
    # keep_scale folded into dout: dV = (p * keep)^T (dout * s), dP = ((dout * s) V^T) * keep.
    do_s = _heads_first(dout, keep_scale(dropout_p))  # (B * H, Lq, D)
    delta = torch.linalg.vecdot(_as(dout, torch.float32), _as(out, torch.float32))  # (B, Lq, H)
    if dlse is not None:
        delta = delta - dlse.float().transpose(1, 2)
    # dS = p * (dP * keep - delta); the softmax scale that dQ and d[prefix_k; k] both carry is their GEMMs' alpha.
    ds = torch.bmm(do_s, _with_prefix(prefix_v, v).transpose(1, 2))
    ds.mul_(keep).view(B, H, Lq, -1).sub_(delta.transpose(1, 2)[..., None])  # delta per (b, h) row
    ds.mul_(p)
    kk = _with_prefix(prefix_k, k)
    dq = torch.baddbmm(qt, ds, kk, beta=0.0, alpha=scale)
    dk, dpk = _own_and_prefix_grads(torch.baddbmm(kk, ds.transpose(1, 2), qt, beta=0.0, alpha=scale), k, prefix_k)
    del ds, kk
    # p becomes p * keep in place: no third score-sized buffer.
    dv, dpv = _own_and_prefix_grads(torch.bmm(p.mul_(keep).transpose(1, 2), do_s), v, prefix_v)
    return _split_heads(dq, B, q.dtype), dk, dv, dpk, dpv


def _saved_probs(qt, k, prefix_k, attention_mask, causal, scale, dropout_p, rng, dims: AttnDims):
    """(p, keep) (B * H, Lq, P + Lk) of the forward, popped from _SAVED_KEEP, or computed again when they are not
    there."""
    seed, offset, key, _ = _keep_key(rng, dropout_p, dims, slice(0, dims.seqlen_q))
    saved = _SAVED_KEEP.get(id(rng), {}).pop(key + ("probs",), None)
    if saved is not None:
        return saved
    p = _dropout_cpu_probs(qt, _with_prefix(prefix_k, k), attention_mask, causal, scale, dims, need_lse=False)[0]
    return p, _factor(_dropout_cpu_keep(seed, offset, dropout_p, dims))


def _own_and_prefix_grads(d_all, x, prefix_x):
    """d[prefix; x] (B * H, P + Lk, D) fp32 -> (dx (B, H, Lk, D) a view (_split_heads), dprefix (P, H, D) summed
    over the batch), in their inputs' dtypes. The batch-sized prefix rows are what SDPA over the
    concatenation holds in its dK and dV."""
    P = prefix_x.shape[0]
    own = d_all.narrow(1, P, d_all.shape[1] - P)  # narrow: a slice without Python's indexing machinery
    prefix_rows = d_all.narrow(1, 0, P)
    dprefix = prefix_rows.view(x.shape[0], -1, P, prefix_rows.shape[2]).sum(0).transpose(0, 1)
    return _split_heads(own, x.shape[0], x.dtype), _as(dprefix.contiguous(), prefix_x.dtype)


def _accumulate(total, x):
    """A sum over query tiles, started by the first."""
    return x if total is None else total.add_(x)


def _prepare(q, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dims):
    prefix = _Prefix(prefix_k, prefix_v, prefix_idx, prefix_lens, dims, q.device) if dims.has_prefix else None
    return prefix, visible_keys(attention_mask)


def _transposed(q, k, v):
    """The other layout's views: (B, L, H, D) <-> heads-first (B, H, L, D)."""
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def forward_unchecked(q, k, v, prefix_k, prefix_v, args: AttnArgs, rng_state, need_lse: bool = True):
    """(out (B, Lq, H, D), lse); q, k, v in the op's layout, or heads-first with args.heads_first (the fused and
    dropout CPU paths read that layout). need_lse=False lets a path skip the lse (it may then be None): a call
    without autograd that does not return it."""
    prefix_idx, prefix_lens, attention_mask, causal, softmax_scale, dropout_p, _, dims, heads_first = args
    scale = default_scale(dims.head_dim, softmax_scale)
    if uses_fused_cpu_kernel(q, dims, dropout_p):
        return forward_heads_first(*((q, k, v) if heads_first else _transposed(q, k, v)), prefix_k, prefix_v, args,
                                   need_lse)
    if _use_dropout_cpu_path(q, dims, dropout_p, prefix_lens):
        return _forward_dropout_cpu(*((q, k, v) if heads_first else _transposed(q, k, v)), prefix_k, prefix_v,
                                    attention_mask, causal, scale, dropout_p, rng_state, dims, need_lse)
    if heads_first:
        q, k, v = _transposed(q, k, v)
    prefix, key_ok = _prepare(q, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dims)
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
            p.mul_(_keep(rng_state, dropout_p, dims, rows, save=True))  # dropped: 0
        o = _gemm_kv(p[..., P:], vf, dims)
        if prefix is not None:
            o.add_(_prefix_times(p[..., :P], prefix.v, prefix, dims, False, dims.head_dim))
        if dropout_p > 0.0:
            o.mul_(keep_scale(dropout_p))  # the kept values' factor, on (B, H, c, D) rather than the scores
        if one_chunk:
            out, lse = o, lse_c
        else:
            out[:, :, rows], lse[:, :, rows] = o, lse_c
    # Contiguous (B, Lq, H, D), as the custom op's fake promises: torch.compile plans views on it.
    return out.transpose(1, 2).contiguous().to(q.dtype), lse


def backward_unchecked(dout, dlse, q, k, v, out, lse, prefix_k, prefix_v, args: AttnArgs, rng_state):
    """(dq, dk, dv, dprefix_k, dprefix_v), dq, dk, dv in q, k, v's layout (heads-first with args.heads_first),
    possibly as views (the custom op makes them contiguous)."""
    prefix_idx, prefix_lens, attention_mask, causal, softmax_scale, dropout_p, _, dims, heads_first = args
    # The CPU paths' backwards are not differentiable: double backward (create_graph=True) takes the explicit
    # path, and so do lse gradients on the fused one.
    fused = dlse is None and uses_fused_cpu_kernel(q, dims, dropout_p)
    if torch.is_grad_enabled() or not (fused or _use_dropout_cpu_path(q, dims, dropout_p, prefix_lens)):
        if not heads_first:
            return _backward_explicit(dout, dlse, q, k, v, out, lse, prefix_k, prefix_v, args, rng_state)
        dq, dk, dv, dpk, dpv = _backward_explicit(dout, dlse, *_transposed(q, k, v), out, lse, prefix_k, prefix_v, args,
                                                  rng_state)
        return (*_transposed(dq, dk, dv), dpk, dpv)
    # The fused and dropout CPU paths take heads-first tensors and give their gradients so.
    qt, kt, vt = (q, k, v) if heads_first else _transposed(q, k, v)
    scale = default_scale(dims.head_dim, softmax_scale)
    if fused:
        dq, dk, dv, dpk, dpv = _backward_fused_cpu(
            dout, qt, kt, vt, out, lse, prefix_k, prefix_v, _prefix_parts(prefix_idx, prefix_lens, dims),
            attention_mask, causal, scale, dims)
        dq, dk, dv = _as(dq, q.dtype), _as(dk, k.dtype), _as(dv, v.dtype)
    else:
        dq, dk, dv, dpk, dpv = _backward_dropout_cpu(dout, dlse, qt, kt, vt, out, prefix_k, prefix_v, attention_mask,
                                                     causal, scale, dropout_p, rng_state, dims)
    return (*((dq, dk, dv) if heads_first else _transposed(dq, dk, dv)), dpk, dpv)


def _backward_explicit(dout, dlse, q, k, v, out, lse, prefix_k, prefix_v, args: AttnArgs, rng_state):
    """The explicit path's backward (any call; differentiable), of q, k, v in the op's layout."""
    prefix_idx, prefix_lens, attention_mask, causal, softmax_scale, dropout_p, _, dims, _ = args
    scale = default_scale(dims.head_dim, softmax_scale)
    prefix, key_ok = _prepare(q, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dims)
    qf, kf, vf, dof, of = (x.float().transpose(1, 2) for x in (q, k, v, dout, out))  # k, v: (B, Hkv, Lk, D)
    delta = (dof * of).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    chunk = _chunk_rows(dims)
    one_chunk = 0 < dims.seqlen_q <= chunk
    dq = None if one_chunk else torch.empty_like(qf)
    dk = dv = dpk = dpv = None  # sums over chunks, started by the first
    P = dims.prefix_len
    for start in range(0, dims.seqlen_q, chunk):
        rows = slice(start, min(start + chunk, dims.seqlen_q))
        qc, doc = qf[:, :, rows], dof[:, :, rows]
        if dropout_p > 0.0:
            # The kept values' factor folded into dout: dV = (p * keep)^T (dout * s) and
            # dP = ((dout * s) V^T) * keep, with keep the 0/1 mask and s = keep_scale.
            doc = doc * keep_scale(dropout_p)
        p, _ = _probs(qc, kf, prefix, key_ok, causal, scale, dims, rows, lse=lse[:, :, rows].float())
        dp_seq = _gemm_kv(doc, vf.transpose(-1, -2), dims)
        if prefix is not None:
            dp = torch.cat([_prefix_times(doc, prefix.v, prefix, dims, True, P), dp_seq], dim=-1)
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
        dk = _accumulate(dk, torch.matmul(_grouped(ds[..., P:], dims).transpose(-1, -2), _grouped(qc, dims)))
        dv = _accumulate(dv, torch.matmul(_grouped(p_kept[..., P:], dims).transpose(-1, -2), _grouped(doc, dims)))
        if prefix is not None:
            ds_pre, pk_pre = ds[..., :P], p_kept[..., :P]
            dq_c.add_(_prefix_times(ds_pre, prefix.k, prefix, dims, False, dims.head_dim))
            dpk = _accumulate(dpk, prefix.reduce(ds_pre, qc, lambda a, b: _reduce_prefix_grad(a, b, dims)))
            dpv = _accumulate(dpv, prefix.reduce(pk_pre, doc, lambda a, b: _reduce_prefix_grad(a, b, dims)))
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
