"""Launchers of the Triton kernels: validate, allocate, launch. Nothing here computes attention.

Tensors follow the contract (batch, seqlen, heads, head_dim) with any strides; nothing is copied.
"""
import functools
import weakref
from typing import NamedTuple, Optional

import torch

from csrc_triton.attn_bwd import bwd_kernel, bwd_preprocess_kernel
from csrc_triton.attn_fwd import prefix_attn_fwd_kernel
from csrc_triton.common import INTERPRET, LOG2E
from csrc_triton.decode import decode_kernel
from csrc_triton.dropout_mask import dropout_mask_kernel
from prefix_attn._launch import BoundLaunch, launcher
from prefix_attn.args import AttnArgs
from prefix_attn.checks import (
    AttnDims, check_attention_inputs, check_prefix_values, check_row_offsets_fit_int32, check_triton_device,
    default_scale, graph_capturing, version_counter,
)
from prefix_attn.dropout import groups_per_row, keep_scale, keep_threshold, padded_prefix

# Query rows per item of the prefix-gradient pieces, and rows per preprocess program.
PREFIX_GRAD_BLOCK_M = 16 if INTERPRET else 64
PREPROCESS_BLOCK_M = 16 if INTERPRET else 128
# Prefix-gradient programs per SM the backward launch adds.
PREFIX_GRAD_WAVES = 4
# The decode path serves calls with at most this many queries per sequence and no dropout.
DECODE_MAX_QUERIES = 16
DECODE_BLOCK_M = 16  # query rows of one sequence per program (>= DECODE_MAX_QUERIES)
DECODE_BLOCK_R = 16 if INTERPRET else 64  # stacked query rows per prefix tile
DECODE_BLOCK_N = 16 if INTERPRET else 64  # keys (or prefix slots) per inner step
DECODE_MIN_SPLIT = 16 if INTERPRET else 256  # fewest keys per split-KV part
DECODE_WAVES = 4  # programs per SM the decode splits aim for


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 2 under the interpreter (small, but several pieces)."""
    if device.type != "cuda":
        return 2
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting: exact unless the user allowed tf32.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


def _as_bank(prefix: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if prefix is None else (prefix if prefix.dim() == 4 else prefix.unsqueeze(0))


def _mask_arg(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Triton loads bool as int1 awkwardly; a uint8 view of the same bytes costs nothing.
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        return attention_mask.view(torch.uint8)
    return attention_mask


def _block_p(prefix_len: int) -> int:
    """Prefix tile: as small as the prefix (>= 16, the smallest tensor-core tile), at most 64."""
    if INTERPRET:
        return 16
    return min(64, max(16, _next_pow2(prefix_len)))


def _tune_bucket(n: int) -> int:
    # Autotune once per power-of-two bucket of the sequence length, not per exact length.
    return max(16, _next_pow2(n))


def _prefix_strides(x: Optional[torch.Tensor]):
    """(task, slot, head, dim) strides of a prefix (P, H, D) or bank (T, P, H, D), without a view."""
    if x is None:
        return (0, 0, 0, 0)
    return tuple(x.stride()) if x.dim() == 4 else (0, *x.stride())


def _launch_common(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal, softmax_scale,
                   dropout_p, rng_state, dims: AttnDims):
    """Arguments every attention kernel takes in the same order, and its constexprs."""
    pk, pv = prefix_k, prefix_v
    mask = _mask_arg(attention_mask)
    dummy = q  # stands for absent optional tensors; never read by the kernels
    P = dims.prefix_len
    scale = default_scale(dims.head_dim, softmax_scale)
    has_dropout = dropout_p > 0.0
    pointers = (
        q, k, v, pk if dims.has_prefix else dummy, pv if dims.has_prefix else dummy,
        prefix_idx if prefix_idx is not None else dummy,
        prefix_lens if prefix_lens is not None else dummy,
        mask if mask is not None else dummy,
        rng_state if has_dropout else dummy,
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *_prefix_strides(pk), *_prefix_strides(pv))
    mask_strides = tuple(mask.stride()) if mask is not None else (0, 0)
    sizes = (dims.heads, dims.group_size, dims.seqlen_q, dims.seqlen_k, P, groups_per_row(P, dims.seqlen_k),
             keep_threshold(dropout_p))
    constexprs = _attention_constexprs(dims.head_dim, P, dims.has_prefix, dims.is_bank,
                                       prefix_lens is not None, mask is not None, bool(causal), has_dropout,
                                       _dot_precision(q.dtype))
    tune = (_tune_bucket(dims.seqlen_q), _tune_bucket(dims.seqlen_k))
    return pointers, strides, mask_strides, sizes, scale, constexprs, tune


@functools.lru_cache(maxsize=None)
def _attention_constexprs(head_dim, prefix_len, has_prefix, is_bank, has_lens, has_mask, causal, has_dropout,
                          precision) -> dict:
    """The constexprs of the attention kernels for one kind of call (one shared dict: read only)."""
    return dict(
        HEAD_DIM=head_dim, BLOCK_D=max(16, _next_pow2(head_dim)), BLOCK_P=_block_p(prefix_len),
        HAS_PREFIX=has_prefix, HAS_BANK=is_bank and has_prefix, HAS_PREFIX_LENS=has_lens and has_prefix,
        HAS_KEY_MASK=has_mask, CAUSAL=causal, HAS_DROPOUT=has_dropout, DOT_PRECISION=precision,
    )


def validate(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p,
             softmax_scale) -> AttnDims:
    """Everything the kernels rely on, checked before any launch."""
    dims = check_attention_inputs(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask,
                                  dropout_p, softmax_scale)
    check_triton_device(q.device)
    check_prefix_values(prefix_idx, prefix_lens, dims)
    check_row_offsets_fit_int32(q=q, k=k, v=v, prefix_k=_as_bank(prefix_k), prefix_v=_as_bank(prefix_v))
    return dims


def prefix_attn_fwd(q, k, v, prefix_k=None, prefix_v=None, prefix_idx=None, prefix_lens=None,
                    attention_mask=None, causal=True, softmax_scale=None, dropout_p=0.0, rng_state=None):
    """Forward launcher. Returns out (B, Lq, H, D) in q's dtype and lse (B, H, Lq) fp32 (natural log).

    rng_state: (2,) int64 [seed, offset] on q's device, required when dropout_p > 0.
    """
    dims = validate(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p, softmax_scale)
    if dropout_p > 0.0 and (rng_state is None or rng_state.shape != (2,)):
        raise ValueError("rng_state must be a (2,) int64 tensor [seed, offset] when dropout_p > 0")
    args = AttnArgs(prefix_idx, prefix_lens, attention_mask, bool(causal), default_scale(dims.head_dim, softmax_scale),
                    float(dropout_p), "triton", dims)
    return forward_unchecked(q, k, v, prefix_k, prefix_v, args, rng_state)


def forward_unchecked(q, k, v, prefix_k, prefix_v, args: AttnArgs, rng_state, need_lse: bool = True):
    """The forward launch for inputs already validated (``args.dims`` from check_attention_inputs). The kernels
    write lse in any case (need_lse is the torch backend's option)."""
    prefix_idx, prefix_lens, attention_mask, causal, softmax_scale, dropout_p, _, dims, _ = args
    B, Lq, H, D = q.shape
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if Lq <= DECODE_MAX_QUERIES and dropout_p == 0.0:
        return decode_forward(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal,
                              softmax_scale, dims, out, lse)
    mask = _mask_arg(attention_mask)
    plan = _forward_plan(q, k, v, prefix_k, prefix_v, prefix_lens is not None, mask, causal, softmax_scale, dropout_p,
                         dims)
    dummy = q  # stands for absent optional tensors; never read by the kernels
    plan.launch(q, k, v, prefix_k if dims.has_prefix else dummy, prefix_v if dims.has_prefix else dummy,
                prefix_idx if prefix_idx is not None else dummy, prefix_lens if prefix_lens is not None else dummy,
                mask if mask is not None else dummy, rng_state if dropout_p > 0.0 else dummy, out, lse)
    return out, lse


class _ForwardPlan(NamedTuple):
    """The forward launch with its integer and float arguments, constexprs and grid bound: they depend
    only on shapes, strides and options, so they are built once per kind of call (``_forward_plan``)."""

    launch: BoundLaunch


# (kind of call) -> _ForwardPlan; see _forward_plan.
_FORWARD_PLANS: dict = {}
_MAX_FORWARD_PLANS = 1024


def _forward_plan(q, k, v, prefix_k, prefix_v, has_lens: bool, mask, causal, softmax_scale, dropout_p,
                  dims: AttnDims) -> _ForwardPlan:
    """The cached plan of this kind of call. Its key holds everything the plan reads: shapes and
    strides, dtype, the options, and torch's tf32 switch for fp32 inputs (the dots' precision)."""
    key = (q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype,
           None if prefix_k is None else (prefix_k.shape, prefix_k.stride(), prefix_v.stride()),
           None if mask is None else mask.stride(), has_lens, causal, softmax_scale, dropout_p,
           q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)
    plan = _FORWARD_PLANS.get(key)
    if plan is None:
        B, Lq, H, _ = q.shape
        _, strides, mask_strides, sizes, scale, cx, tune = _launch_common(
            q, k, v, prefix_k, prefix_v, None, q if has_lens else None, mask, causal, softmax_scale, dropout_p, None,
            dims)
        out_strides = (Lq * H * dims.head_dim, H * dims.head_dim, dims.head_dim, 1)  # a fresh contiguous tensor
        ints = (*strides, *out_strides, *mask_strides, *sizes, scale * LOG2E, keep_scale(dropout_p), *tune)
        n_bh = B * H

        def grid(meta):
            return (_cdiv(Lq, meta["BLOCK_M"]), n_bh)

        if len(_FORWARD_PLANS) >= _MAX_FORWARD_PLANS:
            _FORWARD_PLANS.clear()
        plan = _FORWARD_PLANS[key] = _ForwardPlan(BoundLaunch(prefix_attn_fwd_kernel, grid, ints, cx))
    return plan


def _task_pieces(dims: AttnDims, prefix_idx, device, units_per_row: int, units_per_piece: int,
                 every_task: bool = False):
    """Cut each task's work into pieces of ``units_per_piece`` units, ``units_per_row`` per sequence,
    sequences taken in task order. Returns (n_pieces, tables): n_pieces an upper bound known without
    reading prefix_idx (no host sync, CUDA-graph safe), and for a bank the device tables
    (row_order, task_row_start, task_piece_start, piece_task) the kernels read. every_task: a task
    that no sequence uses still gets one (empty) piece."""
    n_units = dims.batch * units_per_row
    if not dims.is_bank:
        return _cdiv(n_units, units_per_piece), None
    # Every layer of a forward passes the same prefix_idx: its tables are built once (per plan).
    plan = (dims.num_tasks, dims.batch, units_per_row, units_per_piece, every_task)
    entry = _TASK_TABLES.get(id(prefix_idx))
    capturing = graph_capturing(prefix_idx.device)  # a graph must rebuild them from prefix_idx
    if entry is not None and entry[0]() is prefix_idx and entry[1] == version_counter(prefix_idx) and not capturing:
        found = entry[2].get(plan)
        if found is not None:
            return found
    result = _build_task_pieces(dims, prefix_idx, device, units_per_row, units_per_piece, every_task)
    version = version_counter(prefix_idx)
    if version is not None and not capturing:
        if entry is None or entry[0]() is not prefix_idx or entry[1] != version:
            key = id(prefix_idx)
            entry = _TASK_TABLES[key] = (
                weakref.ref(prefix_idx, lambda _ref, key=key: _TASK_TABLES.pop(key, None)), version, {})
        entry[2][plan] = result
    return result


# prefix_idx tensor id -> (weak reference, version counter, {plan: (n_pieces, tables)}).
_TASK_TABLES: dict = {}


def _build_task_pieces(dims: AttnDims, prefix_idx, device, units_per_row: int, units_per_piece: int,
                       every_task: bool = False):
    n_units = dims.batch * units_per_row
    T = dims.num_tasks
    idx = prefix_idx.to(torch.int64)
    row_order = torch.argsort(idx, stable=True)
    # Not bincount: on CUDA it reads the maximum on the host, which CUDA-graph capture forbids.
    counts = torch.zeros(T, dtype=torch.int64, device=device).scatter_add_(0, idx, torch.ones_like(idx))
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    task_row_start = torch.cat([zero, torch.cumsum(counts, 0)])
    pieces = (counts * units_per_row + units_per_piece - 1) // units_per_piece
    if every_task:
        pieces = pieces.clamp_(min=1)
    task_piece_start = torch.cat([zero, torch.cumsum(pieces, 0)])
    # Sum over tasks of ceil(units_t / size) <= total / size + tasks present (+ the empty ones).
    n_pieces = _cdiv(n_units, units_per_piece) + (T if every_task else min(T, dims.batch))
    piece_ids = torch.arange(n_pieces, device=device, dtype=torch.int64)
    piece_task = torch.searchsorted(task_piece_start[1:], piece_ids, right=True)
    piece_task = torch.where(piece_task < T, piece_task, torch.full_like(piece_task, -1))
    return n_pieces, (row_order, task_row_start, task_piece_start, piece_task)


def _decode_splits(total: int, parallel: int, min_per_split: int, block: int, sms: int,
                   waves: int = DECODE_WAVES) -> tuple[int, int]:
    """(n_splits, per_split) that cut ``total`` keys so that parallel * n_splits fills the GPU
    (``waves`` programs per SM), each split at least ``min_per_split`` long and a multiple of ``block``."""
    if total <= 0:
        return 0, block
    want = max(1, _cdiv(waves * sms, max(1, parallel)))
    n_splits = max(1, min(want, _cdiv(total, min_per_split)))
    per_split = _cdiv(_cdiv(total, n_splits), block) * block
    return _cdiv(total, per_split), per_split


class _DecodePlan(NamedTuple):
    seqs_per_tile: int  # whole sequences per tile of stacked rows: a sequence's rows merge in one tile
    n_tiles: int  # for a bank an upper bound, known without reading prefix_idx (see _task_pieces)
    heads_per_chunk: int  # query heads of a KV head's group stacked in one program's rows
    n_psplits: int  # prefix splits (0 without a prefix)
    n_ssplits: int  # key splits of each sequence's cache
    n_counters: int  # arrival counters, one per (tile, KV head, chunk); 0 with a single part
    work_size: int  # fp32 workspace elements: n_parts partial outputs and lse; 0 with a single part
    grid: tuple
    sizes: tuple  # the kernel's trailing integer arguments, from out's strides to heads_per_chunk
    constexprs: dict  # one shared dict per plan: read only


def _heads_per_chunk(group_size: int, rows_per_head: int, max_rows: int) -> int:
    """The largest divisor of group_size whose query rows (rows_per_head each) fit one tile."""
    return max(c for c in range(1, group_size + 1) if group_size % c == 0 and c * rows_per_head <= max_rows)


@functools.lru_cache(maxsize=4096)
def _decode_plan(B: int, Lq: int, H: int, Hkv: int, D: int, Lk: int, P: int, T: int, is_bank: bool, has_lens: bool,
                 has_mask: bool, causal: bool, precision: str, sms: int, block_r: int, block_n: int, min_split: int,
                 waves: int) -> _DecodePlan:
    """Everything of a decode launch that depends only on sizes and flags, computed once per kind
    of call (a decode step repeats them but for the cache length). The block constants are
    arguments so that a test that changes them never meets a stale plan.

    Grouped heads (H = group_size * Hkv): the query heads of a group are stacked with the query
    rows, in chunks of heads_per_chunk heads so that a sequence's rows (Lq per head) fit one tile;
    axis 1 of the grid runs over (KV head, chunk)."""
    group_size = H // Hkv
    heads_per_chunk = _heads_per_chunk(group_size, Lq, block_r)
    rows_per_seq = Lq * heads_per_chunk
    n_heads = Hkv * (group_size // heads_per_chunk)  # programs along axis 1
    seqs_per_tile = block_r // rows_per_seq
    n_tiles = _cdiv(B, seqs_per_tile) + (min(T, B) if is_bank else 0)
    n_psplits, slots_per_split = (_decode_splits(P, n_tiles * n_heads, min_split, block_n, sms, waves) if P
                                  else (0, block_n))
    n_ssplits, keys_per_split = _decode_splits(Lk, B * n_heads, min_split, block_n, sms, waves)
    n_parts = n_psplits + n_ssplits
    several = n_parts > 1
    out_strides = (Lq * H * D, H * D, D, 1)  # out is allocated contiguous by forward_unchecked
    sizes = (*out_strides, B, H, Lq, Lk, P, seqs_per_tile, n_tiles, n_psplits, slots_per_split, n_ssplits,
             keys_per_split, group_size, heads_per_chunk)
    constexprs = dict(HEAD_DIM=D, BLOCK_D=max(16, _next_pow2(D)), BLOCK_R=block_r,
                      BLOCK_M=max(DECODE_BLOCK_M, _next_pow2(rows_per_seq)), BLOCK_N=block_n, HAS_PREFIX=P > 0,
                      HAS_BANK=is_bank, HAS_PREFIX_LENS=has_lens, HAS_KEY_MASK=has_mask, CAUSAL=causal,
                      DOT_PRECISION=precision)
    return _DecodePlan(seqs_per_tile, n_tiles, heads_per_chunk, n_psplits, n_ssplits,
                       n_tiles * n_heads if several else 0, n_parts * B * Lq * H * (D + 1) if several else 0,
                       (n_tiles * n_psplits + n_ssplits * B, n_heads), sizes, constexprs)


# (device index, raw stream) -> int32 arrival counters of the decode kernel, all zero between launches.
_ARRIVALS: dict = {}


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` zeroed int32 arrival counters for one decode launch on the current stream.

    The decode kernel's last arrival at each counter sets it back to 0, so a buffer is zero again
    when its launch ends and is kept, without a memset per call, for the next launch. Kernels on
    one stream run one after another, so the buffer is kept per (device, stream): launches on two
    streams never share counters. While a CUDA graph is captured a fresh zeroed buffer is taken
    instead: the memset is recorded into the graph, and the buffer lives in the graph's own pool, so
    every graph has its own counters, zeroed at each replay, whatever stream replays it and however
    a previous replay ended. (A kernel that faults leaves counters set, but it also leaves the CUDA
    context unusable; the interpreter's case is handled in decode_forward.)
    """
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(max(n, 1), dtype=torch.int32, device=device)
        key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
    else:  # CPU tensors: the interpreter (or the host benchmark's fake driver)
        key = (-1, 0)
    counters = _ARRIVALS.get(key)
    if counters is None or counters.numel() < n:
        counters = _ARRIVALS[key] = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
    return counters


def decode_forward(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, causal, softmax_scale,
                   dims: AttnDims, out, lse):
    """Forward for a few queries per sequence (Lq <= DECODE_MAX_QUERIES), memory-bound, in one
    launch: the prefix is read once per tile of stacked query rows of one task, each sequence's
    keys with split-KV, and the parts are merged by log-sum-exp in fp32 by the last program to
    finish each tile (csrc_triton/decode.py). Same results as the main forward kernel.

    Grouped KV heads (k, v (B, Lk, Hkv, D), prefix (..., P, Hkv, D), H % Hkv == 0) are computed
    here: the query heads of a group are stacked with the query rows, so each KV head, of the
    prefix and of the cache, is read once per group (or chunk of it), never expanded in memory.

    Absent optional tensors are passed as the integer 0: the kernel reads them only under the
    constexpr flag that says they are there, and fewer tensor arguments cost less per launch."""
    B, Lq, H, D = q.shape
    has_prefix = dims.has_prefix
    is_bank = has_prefix and dims.is_bank
    has_lens = has_prefix and prefix_lens is not None
    mask = _mask_arg(attention_mask)
    device = q.device
    plan = _decode_plan(B, Lq, H, dims.kv_heads, D, dims.seqlen_k, dims.prefix_len, dims.num_tasks, is_bank, has_lens,
                        mask is not None, bool(causal), _dot_precision(q.dtype), num_sms(device), DECODE_BLOCK_R,
                        DECODE_BLOCK_N, DECODE_MIN_SPLIT, DECODE_WAVES)
    if is_bank:
        n_tiles, tables = _task_pieces(dims, prefix_idx, device, 1, plan.seqs_per_tile)
        assert n_tiles == plan.n_tiles, (n_tiles, plan.n_tiles)
    else:
        tables = (0, 0, 0, 0)
    if plan.work_size:
        work = torch.empty(plan.work_size, dtype=torch.float32, device=device)
        arrivals = _arrival_counters(device, plan.n_counters)
    else:  # a single part: the kernel writes out and lse itself, and touches neither
        work, arrivals = lse, lse
    if has_prefix:
        prefix_args = (prefix_k, prefix_v, prefix_idx if is_bank else 0, prefix_lens if has_lens else 0)
        prefix_strides = (*_prefix_strides(prefix_k), *_prefix_strides(prefix_v))
    else:
        prefix_args, prefix_strides = (0, 0, 0, 0), (0,) * 8
    args = (q, k, v, *prefix_args, mask if mask is not None else 0, *tables, out, lse, work, arrivals,
            *q.stride(), *k.stride(), *v.stride(), *prefix_strides, *(mask.stride() if mask is not None else (0, 0)),
            *plan.sizes, default_scale(D, softmax_scale) * LOG2E)
    if not plan.work_size:
        launcher(decode_kernel)(plan.grid, args, plan.constexprs)
        return out, lse
    try:
        launcher(decode_kernel)(plan.grid, args, plan.constexprs)
    except BaseException:
        # A launch that failed part-way (the interpreter runs programs one at a time) may leave
        # counters set: drop them rather than hand them to the next launch.
        for key, counters in list(_ARRIVALS.items()):
            if counters is arrivals:
                del _ARRIVALS[key]
        raise
    return out, lse


def _prefix_grad_split(dims: AttnDims, device, block_m: int, block_p: int, items_per_piece=None):
    """(query blocks per row, items per piece) of the prefix-gradient work: items (sequence row, query
    head of a KV head's group, query block), n_query_blocks * group_size per row, for each (prefix
    block, KV head)."""
    n_query_blocks = _cdiv(dims.seqlen_q, block_m)
    if items_per_piece is None:
        n_pblocks = _cdiv(dims.prefix_len, block_p)
        target_pieces = max(1, _cdiv(PREFIX_GRAD_WAVES * num_sms(device), n_pblocks * dims.kv_heads))
        items_per_piece = max(1, _cdiv(dims.batch * n_query_blocks * dims.group_size, target_pieces))
    return n_query_blocks, items_per_piece


def prefix_attn_bwd(dout, dlse, q, k, v, out, lse, prefix_k=None, prefix_v=None, prefix_idx=None, prefix_lens=None,
                    attention_mask=None, causal=True, softmax_scale=None, dropout_p=0.0, rng_state=None, items_per_piece=None):
    """Backward launcher. Returns dq, dk, dv (shapes of q, k, v) and dprefix_k, dprefix_v (shape of
    prefix_k, or None without a prefix). The prefix gradient is reduced over the batch (per task)
    in a fixed order, without float atomics: results are bitwise repeatable.

    dlse: gradient of the lse output (B, H, Lq) or None. items_per_piece overrides the split of the
    prefix-gradient reduction (tests use it to force many pieces).
    """
    dims = validate(q, k, v, prefix_k, prefix_v, prefix_idx, prefix_lens, attention_mask, dropout_p, softmax_scale)
    if dout.shape != q.shape:
        raise ValueError(f"dout must have q's shape {tuple(q.shape)}, got {tuple(dout.shape)}")
    if dlse is not None and dlse.shape != lse.shape:
        raise ValueError(f"dlse must have lse's shape {tuple(lse.shape)}, got {tuple(dlse.shape)}")
    args = AttnArgs(prefix_idx, prefix_lens, attention_mask, bool(causal), default_scale(dims.head_dim, softmax_scale),
                    float(dropout_p), "triton", dims)
    return backward_unchecked(dout, dlse, q, k, v, out, lse, prefix_k, prefix_v, args, rng_state, items_per_piece)


class _BackwardPlan:
    """Everything of a backward launch that depends only on shapes, strides, dtypes and options:
    built once per kind of call (``_backward_plan``), so that a call only allocates and launches.

    The one fp32 scratch buffer holds, in order: delta and the log2 lse (B * H * Lq each), the
    prefix-gradient partials of K and V (n_pieces * Hkv * P_pad * D each) and the int32 counters
    (T * n_pblocks * Hkv) of the last-arrival reduction (csrc_triton.attn_bwd.scratch_sections).
    Grouped heads: dK/dV and prefix programs are per KV head and sum their group's query heads; dQ programs
    are per query head.
    """

    __slots__ = ("grad_shapes", "scratch_numel", "preprocess", "main", "prefix_split")

    def __init__(self, q, k, v, dout, out, dlse, prefix_k, prefix_v, mask, causal, softmax_scale, dropout_p,
                 has_lens, rng_state, dims: AttnDims, items_per_piece):
        B, Lq, H, D = q.shape
        Lk, P, Hkv = dims.seqlen_k, dims.prefix_len, dims.kv_heads
        device = q.device
        self.grad_shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape),
                            tuple(prefix_k.shape) if dims.has_prefix else None)
        n_rows = B * H * Lq
        # Without a prefix the preprocess writes delta and lse only; the counters section is empty.
        pointers, strides, mask_strides, sizes, scale, cx, tune = _launch_common(
            q, k, v, prefix_k, prefix_v, None, q if has_lens else None, mask, causal, softmax_scale, dropout_p,
            rng_state, dims)
        if dims.has_prefix:
            block_p = cx["BLOCK_P"]
            n_qblocks, ipp = _prefix_grad_split(dims, device, PREFIX_GRAD_BLOCK_M, block_p, items_per_piece)
            n_pblocks = _cdiv(P, block_p)
            n_items = B * n_qblocks * dims.group_size
            if dims.is_bank:  # the bound _task_pieces gives, known without reading prefix_idx
                n_pieces = _cdiv(n_items, ipp) + dims.num_tasks
            else:
                n_pieces = _cdiv(n_items, ipp)
            p_pad = n_pblocks * block_p
            n_counters = dims.num_tasks * n_pblocks * Hkv
        else:
            n_qblocks = ipp = n_pblocks = n_items = n_pieces = p_pad = n_counters = 0
        self.prefix_split = (n_qblocks * dims.group_size, ipp)  # (items per sequence row, items per piece)
        ws_size = n_pieces * Hkv * p_pad * D
        self.scratch_numel = 2 * n_rows + 2 * ws_size + n_counters  # int32 counters: one fp32 slot each
        dlse_strides = tuple(dlse.stride()) if dlse is not None else (0, 0, 0)
        self.preprocess = BoundLaunch(
            bwd_preprocess_kernel, (_cdiv(Lq, PREPROCESS_BLOCK_M), B * H),
            (*out.stride(), *dout.stride(), *dlse_strides, H, Lq, n_rows, ws_size, n_counters),
            dict(HEAD_DIM=D, BLOCK_D=cx["BLOCK_D"], BLOCK_M=PREPROCESS_BLOCK_M, HAS_DLSE=dlse is not None))
        dq_strides = (Lq * H * D, H * D, D, 1)  # the grads are fresh contiguous tensors
        dk_strides = (Lk * k.shape[2] * D, k.shape[2] * D, D, 1)
        ints = (*strides, *dout.stride(), *dq_strides, *dk_strides, *dk_strides, *mask_strides, *sizes,
                scale * LOG2E, scale, keep_scale(dropout_p),
                B, n_rows, ws_size, p_pad, n_pblocks, n_qblocks, ipp, n_items, n_pieces, *tune)
        n_prefix_programs = n_pieces * n_pblocks * Hkv
        # Sequence programs per block index: one per (sequence, KV head), and with grouped heads one more
        # per (sequence, query head) for dQ (csrc_triton.attn_bwd.bwd_kernel).
        n_bh = B * Hkv + (B * H if dims.group_size > 1 else 0)

        def grid(meta):
            return (max(_cdiv(Lk, meta["BLOCK_N1"]), _cdiv(Lq, meta["BLOCK_M2"])) * n_bh + n_prefix_programs,)

        self.main = BoundLaunch(bwd_kernel, grid, ints, dict(cx, BLOCK_MP=PREFIX_GRAD_BLOCK_M))


# (kind of call) -> _BackwardPlan; see _backward_plan.
_BACKWARD_PLANS: dict = {}
_MAX_BACKWARD_PLANS = 1024


def _backward_plan(dout, dlse, q, k, v, out, prefix_k, prefix_v, mask, causal, softmax_scale, dropout_p,
                   has_lens, rng_state, dims, items_per_piece) -> _BackwardPlan:
    """The cached plan of this kind of call. The key holds everything the plan reads: shapes and
    strides of every tensor whose strides it passes, dtype, device (its SM count), the options, and
    torch's tf32 switch for fp32 inputs (the dots' precision)."""
    key = (q.shape, k.shape, q.stride(), k.stride(), v.stride(), dout.stride(), out.stride(), q.dtype, q.device,
           None if prefix_k is None else (prefix_k.shape, prefix_k.stride(), prefix_v.stride()),
           None if mask is None else mask.stride(), None if dlse is None else dlse.stride(),
           causal, softmax_scale, dropout_p, has_lens, items_per_piece,
           q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        if len(_BACKWARD_PLANS) >= _MAX_BACKWARD_PLANS:
            _BACKWARD_PLANS.clear()
        plan = _BACKWARD_PLANS[key] = _BackwardPlan(
            q, k, v, dout, out, dlse, prefix_k, prefix_v, mask, causal, softmax_scale, dropout_p, has_lens,
            rng_state, dims, items_per_piece)
    return plan


def backward_unchecked(dout, dlse, q, k, v, out, lse, prefix_k, prefix_v, args: AttnArgs, rng_state,
                       items_per_piece=None):
    """The backward for inputs already validated: two launches (preprocess, then the sequence
    and prefix-gradient programs), no host sync, nothing read back from the device.

    Scratch (delta, lse, prefix partials, counters) is one allocation per call from torch's
    stream-ordered caching allocator, and its counters are zeroed by the preprocess launch on the
    same stream: so concurrent backwards on other streams never share counters, and a CUDA graph
    replays the zeroing with the rest (no host-side reset, no persistent workspace to guard).
    """
    prefix_idx, prefix_lens, attention_mask, causal, softmax_scale, dropout_p, _, dims, _ = args
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # see _mask_arg
    plan = _backward_plan(dout, dlse, q, k, v, out, prefix_k, prefix_v, mask, causal, softmax_scale, dropout_p,
                          prefix_lens is not None, rng_state, dims, items_per_piece)
    device = q.device
    q_shape, k_shape, v_shape, p_shape = plan.grad_shapes
    dq = torch.empty(q_shape, dtype=q.dtype, device=device)
    dk = torch.empty(k_shape, dtype=k.dtype, device=device)
    dv = torch.empty(v_shape, dtype=v.dtype, device=device)
    dpk = dpv = None
    if p_shape is not None:
        # Two buffers: the custom op's outputs must not alias each other.
        dpk = torch.empty(p_shape, dtype=prefix_k.dtype, device=device)
        dpv = torch.empty(p_shape, dtype=prefix_v.dtype, device=device)
    if dq.numel() == 0 or dims.seqlen_k == 0:  # nothing attends: every gradient is zero (or empty)
        for g in (dq, dk, dv, dpk, dpv):
            if g is not None:
                g.zero_()
        return dq, dk, dv, dpk, dpv

    scratch = torch.empty(plan.scratch_numel, dtype=torch.float32, device=device)
    plan.preprocess(out, dout, lse, dlse if dlse is not None else lse, scratch)
    if p_shape is not None:
        tables = None
        if dims.is_bank:
            items_per_row, ipp = plan.prefix_split
            _, tables = _task_pieces(dims, prefix_idx, device, items_per_row, ipp, every_task=True)
        tables = tables if tables is not None else (q,) * 4
    else:
        tables = (q,) * 4
        dpk = dpv = q  # never written: no prefix programs
    dummy = q  # stands for absent optional tensors; never read by the kernels
    plan.main(q, k, v, prefix_k if prefix_k is not None else dummy, prefix_v if prefix_v is not None else dummy,
              prefix_idx if prefix_idx is not None else dummy, prefix_lens if prefix_lens is not None else dummy,
              mask if mask is not None else dummy, rng_state if dropout_p > 0.0 else dummy,
              dout, scratch, dq, dk, dv, *tables, dpk, dpv)
    if p_shape is None:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv


def dropout_keep_mask_triton(rng_state: torch.Tensor, batch: int, heads: int, seqlen_q: int, n_prefix: int,
                             seqlen_k: int, dropout_p: float) -> torch.Tensor:
    """The keep-mask (B, H, Lq, P + Lk) bool as the Triton kernels draw it (debugging and tests)."""
    check_triton_device(rng_state.device)
    n_rows = batch * heads * seqlen_q
    n_cols = n_prefix + seqlen_k
    mask = torch.zeros((n_rows, n_cols), dtype=torch.int8, device=rng_state.device)
    block_m, block_n = 16, 64
    cols8 = padded_prefix(n_prefix) + seqlen_k
    if n_rows and n_cols:
        dropout_mask_kernel[(_cdiv(n_rows, block_m), _cdiv(cols8, block_n))](
            rng_state, mask, n_rows, n_prefix, seqlen_k, groups_per_row(n_prefix, seqlen_k),
            keep_threshold(dropout_p), BLOCK_M=block_m, BLOCK_N=block_n,
        )
    return mask.bool().reshape(batch, heads, seqlen_q, n_cols)


__all__ = ["prefix_attn_fwd", "prefix_attn_bwd", "forward_unchecked", "backward_unchecked",
           "dropout_keep_mask_triton", "validate", "num_sms"]
