"""Decode-path kernel (a few queries per sequence, e.g. one token per generation step): one launch.

A step's attention is bound by reading K/V from memory. One grid (n_items, heads) holds two kinds
of programs, prefix programs first:

1. prefix programs (tile, split): the query rows of the sequences that use one task's prefix are
   stacked into tiles of whole sequences (at most BLOCK_R rows, a tensor-core M dimension), so the
   prefix K/V is read once per tile rather than once per sequence (Hydragen / cascade inference).
   The prefix is also split along P (``slots_per_split``) so that a long prefix still fills the GPU.
2. sequence programs (split, sequence): flash-decoding over one sequence's own keys, cut into
   splits of ``keys_per_split`` so that short batches fill the GPU.

Grouped KV heads (H query heads, Hkv KV heads, group_size = H / Hkv): axis 1 of the grid runs over
KV heads (times chunks of a group), and the query heads of a group are stacked with the query rows,
so that every KV head of the prefix and of the cache is read once per group (per chunk when
Lq * group_size rows do not fit one tile), never once per query head and never expanded.

Each program ends with a normalised partial output (fp32) and its lse in log2 units (-inf for an
empty part). With a single part (no prefix, one key split) the program writes the output itself.
Otherwise it stores its part in the workspace (n_parts, B, Lq, H, D) / (n_parts, B, H, Lq) (prefix
splits first, then key splits) and arrives at the counter of its tile (tile, head): the program
that arrives last merges the whole tile by log-sum-exp, reading every part in the fixed order
0..n_parts-1 (so the result never depends on which program came last: deterministic, and the same
bits as a separate merge launch), writes out and lse, and sets the counter back to 0 for the next
launch (see prefix_attn.triton_launch._arrival_counters for who owns the counters).

Memory ordering on a GPU (the interpreter runs programs one at a time and cannot show a race).
Programs never wait for each other (no spinning, so no assumption that programs are co-resident);
the only cross-program communication is "parts, then arrival":
- arriving program: every thread stores its part rows; ``tl.debug_barrier()`` (bar.sync) orders all
  those stores before the arrival; one thread then does ``atomic_add(counter, 1, sem="acq_rel",
  scope="gpu")``: a gpu-scope release is cumulative, so it publishes the whole CTA's stores that
  the barrier ordered before it.
- last program: the same atomic, as an acquire, synchronises with every earlier arrival's release
  (the counter's read-modify-writes form one release sequence). Triton hands a scalar atomic's
  result to every thread through shared memory behind a barrier, so every thread's later loads of
  the parts are ordered after the acquire. The loads also go through L2 (``.cg``), never a stale L1.
This is the pattern of CUTLASS's split-K / stream-K semaphores (arrive: __syncthreads, then a
release by one thread; wait: an acquire by one thread, then __syncthreads).
"""
import triton
import triton.language as tl

from csrc_triton.common import LN2_C, key_visibility, online_softmax_step, pick_configs, task_piece_range

# One kernel holds both kinds of program, so every program gets the registers of the larger one
# (the 64-row prefix tile and the tile merge). Eight warps spread that tile: no spills at head dim
# 128 on sm_80 or sm_90 (four warps spill there), and the sequence programs, which are memory
# bound, get more loads in flight. Two stages: the loops are a few blocks long (a 200-slot prefix
# is 4 blocks of 64), and less shared memory lets two programs share an SM at head dim 128.
DECODE_GPU_CONFIG = triton.Config({}, num_warps=8, num_stages=2)
DECODE_INTERPRETER_CONFIG = triton.Config({}, num_warps=4, num_stages=1)


@triton.jit
def _online_softmax_range(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                          key_start, key_end, n_keys, query_pos, key_valid_ptr, stride_valid_n, qk_scale,
                          offs_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax (log2 domain) over keys [key_start, key_end), every block masked: decode is
    memory bound, the masks cost nothing that matters."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(key_start, key_end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < key_end
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # Keys past this range's end are other splits' (or past n_keys): hidden like a ragged tail.
        visible = key_visibility(cols, tl.minimum(key_end, n_keys), query_pos, key_valid_ptr, stride_valid_n, BLOCK_N,
                                 True, HAS_KEY_MASK, CAUSAL)
        qk = tl.where(visible, qk, float("-inf"))
        p, alpha, l_i, m_new = online_softmax_step(qk, m_i, l_i)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _normalise(acc, l_i, m_i):
    """(acc / l, lse in log2 units), lse = -inf for a part that saw no key."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    return acc / l_safe[:, None], tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))


@triton.jit
def _store_final(Out, Lse, b, i, h, row_ok, out, lse2, stride_ob, stride_om, stride_oh, stride_od, H, Lq,
                 offs_d, HEAD_DIM: tl.constexpr):
    """The output rows (b, i, h) in Out's dtype and their lse (B, H, Lq), natural log."""
    tl.store(Out + b[:, None] * stride_ob + i[:, None] * stride_om + h[:, None] * stride_oh
             + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + (b * H + h) * Lq + i, lse2 * LN2_C, mask=row_ok)


@triton.jit
def _lse_offset(n_parts, B, Lq, H, HEAD_DIM: tl.constexpr):
    """Where the lse parts start in the workspace: after the n_parts * B * Lq * H * D outputs (int64;
    tl.cast, not .to: an argument equal to 1 arrives as a constexpr integer)."""
    return tl.cast(n_parts, tl.int64) * B * Lq * H * HEAD_DIM


@triton.jit
def _store_part(Work, lse_offset, part, b, i, h, row_ok, out, lse2, B, H, Lq, offs_d, HEAD_DIM: tl.constexpr):
    """A normalised partial output and its log2 lse, at rows (part, b, i, h) of the workspace."""
    part = part.to(tl.int64)
    row = ((part * B + b) * Lq + i) * H + h  # (part, b, i, h) row of the (n_parts, B, Lq, H, D) outputs
    tl.store(Work + row[:, None] * HEAD_DIM + offs_d[None, :], out,
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Work + lse_offset + ((part * B + b) * H + h) * Lq + i, lse2, mask=row_ok)


@triton.jit
def _tile_rows(ROW_ORDER, seq_lo, seq_hi, Lq, heads_per_chunk, first_head, BLOCK_R: tl.constexpr,
               HAS_BANK: tl.constexpr):
    """The stacked rows of a tile of sequences [seq_lo, seq_hi) (task order): each sequence brings
    Lq * heads_per_chunk rows (query position i, then query head of the chunk). Returns
    (row_ok, b, i, h) with b and h int64."""
    rows_per_seq = Lq * heads_per_chunk
    rows = seq_lo * rows_per_seq + tl.arange(0, BLOCK_R)
    row_ok = rows < seq_hi * rows_per_seq
    seq = tl.where(row_ok, rows // rows_per_seq, 0)
    if HAS_BANK:
        b = tl.load(ROW_ORDER + seq, mask=row_ok, other=0).to(tl.int64)
    else:
        b = seq.to(tl.int64)
    within = rows % rows_per_seq
    return row_ok, b, within // heads_per_chunk, first_head + (within % heads_per_chunk).to(tl.int64)


@triton.jit
def _merge_tile(Work, lse_offset, Out, Lse, ROW_ORDER, seq_lo, seq_hi, first_head, heads_per_chunk, n_parts,
                B, H, Lq, stride_ob, stride_om, stride_oh, stride_od,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_BANK: tl.constexpr):
    """out = sum_parts exp2(lse_p - lse) * out_p and lse = log-sum-exp of the parts, for the rows of
    a tile; parts read in the fixed order 0..n_parts-1."""
    row_ok, b, i, h = _tile_rows(ROW_ORDER, seq_lo, seq_hi, Lq, heads_per_chunk, first_head, BLOCK_R, HAS_BANK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for part in range(0, n_parts):
        # b is int64: so is every offset below. .cg: through L2, the point of coherence.
        lse_p = tl.load(Work + lse_offset + ((part * B + b) * H + h) * Lq + i, mask=row_ok, other=float("-inf"),
                        cache_modifier=".cg")
        row = ((part * B + b) * Lq + i) * H + h
        out_p = tl.load(Work + row[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse_p)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_sub)
        w = tl.math.exp2(lse_p - m_sub)
        acc = acc * alpha[:, None] + w[:, None] * out_p
        total = total * alpha + w
        m = m_new
    empty = total == 0.0
    total_safe = tl.where(empty, 1.0, total)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    _store_final(Out, Lse, b, i, h, row_ok, acc / total_safe[:, None],
                 tl.where(empty, float("-inf"), m_sub + tl.math.log2(total_safe)),
                 stride_ob, stride_om, stride_oh, stride_od, H, Lq, offs_d, HEAD_DIM)


@triton.jit
def _arrive(Arrivals, Work, lse_offset, Out, Lse, ROW_ORDER, tile, seq_lo, seq_hi, first_head, heads_per_chunk,
            n_psplits, n_ssplits, B, H, Lq, stride_ob, stride_om, stride_oh, stride_od,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_BANK: tl.constexpr):
    """Count this program's part in at its (tile, head chunk); the last of its parts merges the tile.

    A tile of sequences [seq_lo, seq_hi) receives n_psplits prefix parts and n_ssplits parts per
    sequence. See the module docstring for the memory ordering."""
    expected = n_psplits + n_ssplits * (seq_hi - seq_lo)
    tl.debug_barrier()  # every thread's part stores, before the release below
    counter = Arrivals + tile * tl.num_programs(1) + tl.program_id(1)
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if arrived == expected - 1:
        _merge_tile(Work, lse_offset, Out, Lse, ROW_ORDER, seq_lo, seq_hi, first_head, heads_per_chunk,
                    n_psplits + n_ssplits, B, H, Lq, stride_ob, stride_om, stride_oh, stride_od,
                    HEAD_DIM, BLOCK_D, BLOCK_R, HAS_BANK)
        # Every part of this tile has arrived: nobody touches the counter again in this launch.
        tl.store(counter, 0)


@triton.jit
def _prefix_program(
    Q, PK, PV, PREFIX_LENS, ROW_ORDER, TASK_ROW_START, TASK_TILE_START, TILE_TASK, Out, Lse, Work, Arrivals,
    stride_qb, stride_qm, stride_qh, stride_qd, stride_pkt, stride_pkp, stride_pkh, stride_pkd,
    stride_pvt, stride_pvp, stride_pvh, stride_pvd, stride_ob, stride_om, stride_oh, stride_od,
    B, H, Lq, P, seqs_per_tile, n_tiles, n_psplits, slots_per_split, n_ssplits, qk_scale, item, kv_head,
    first_head, heads_per_chunk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BANK: tl.constexpr, HAS_PREFIX_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Prefix split ``item // n_tiles`` of KV head kv_head for the stacked rows of tile
    ``item % n_tiles``: every query row of the tile's sequences at the chunk's query heads."""
    tile = item % n_tiles
    split = item // n_tiles
    task, seq_lo, seq_hi = task_piece_range(TILE_TASK, TASK_TILE_START, TASK_ROW_START, tile, 1, seqs_per_tile, B,
                                            HAS_BANK)
    if task >= 0:  # a bank's plan has more tiles than it uses
        offs_d = tl.arange(0, BLOCK_D)
        row_ok, b, i, h = _tile_rows(ROW_ORDER, seq_lo, seq_hi, Lq, heads_per_chunk, first_head, BLOCK_R, HAS_BANK)
        q = tl.load(Q + b[:, None] * stride_qb + i[:, None] * stride_qm + h[:, None] * stride_qh
                    + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        n_prefix = P
        if HAS_PREFIX_LENS:
            n_prefix = tl.load(PREFIX_LENS + task).to(tl.int32)
        slot_lo = split * slots_per_split
        slot_hi = tl.minimum(slot_lo + slots_per_split, n_prefix)
        m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_R,), tl.float32)
        acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        acc, l_i, m_i = _online_softmax_range(
            acc, l_i, m_i, q, PK + task * stride_pkt + kv_head * stride_pkh,
            PV + task * stride_pvt + kv_head * stride_pvh, stride_pkp, stride_pkd, stride_pvp, stride_pvd,
            slot_lo, slot_hi, n_prefix, i, PK, 0, qk_scale, offs_d, HEAD_DIM, BLOCK_N, False, False, DOT_PRECISION)
        out, lse2 = _normalise(acc, l_i, m_i)
        lse_offset = _lse_offset(n_psplits + n_ssplits, B, Lq, H, HEAD_DIM)  # lse parts follow the outputs
        _store_part(Work, lse_offset, split, b, i, h, row_ok, out, lse2, B, H, Lq, offs_d, HEAD_DIM)
        _arrive(Arrivals, Work, lse_offset, Out, Lse, ROW_ORDER, tile, seq_lo, seq_hi, first_head, heads_per_chunk,
                n_psplits, n_ssplits, B, H, Lq, stride_ob, stride_om, stride_oh, stride_od,
                HEAD_DIM, BLOCK_D, BLOCK_R, HAS_BANK)


@triton.jit
def _sequence_program(
    Q, K, V, PREFIX_IDX, KEY_MASK, ROW_ORDER, TASK_ROW_START, TASK_TILE_START, TILE_TASK, Out, Lse, Work, Arrivals,
    stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd, stride_maskb, stride_maskn,
    stride_ob, stride_om, stride_oh, stride_od, B, H, Lq, Lk, seqs_per_tile, n_psplits, n_ssplits, keys_per_split,
    qk_scale, item, kv_head, first_head, heads_per_chunk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_BANK: tl.constexpr, HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Key split ``item // B`` of KV head kv_head of the sequence at place ``item % B`` of task
    order: its Lq query rows at the chunk's query heads, stacked (the cache is read once per chunk)."""
    split = item // B
    pos = item % B  # the sequence's place in task order (batch order without a bank)
    if HAS_BANK:
        b = tl.load(ROW_ORDER + pos).to(tl.int64)
    else:
        b = pos.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_M)  # (i, query head of the chunk), the head fastest
    row_ok = rows < Lq * heads_per_chunk
    i = rows // heads_per_chunk
    h = first_head + (rows % heads_per_chunk).to(tl.int64)
    q = tl.load(Q + b * stride_qb + i[:, None] * stride_qm + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    key_lo = split * keys_per_split
    key_hi = tl.minimum(key_lo + keys_per_split, Lk)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    acc, l_i, m_i = _online_softmax_range(
        acc, l_i, m_i, q, K + b * stride_kb + kv_head * stride_kh, V + b * stride_vb + kv_head * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd, key_lo, key_hi, Lk, Lk - Lq + i,
        KEY_MASK + b * stride_maskb, stride_maskn, qk_scale, offs_d, HEAD_DIM, BLOCK_N, CAUSAL, HAS_KEY_MASK,
        DOT_PRECISION)
    out, lse2 = _normalise(acc, l_i, m_i)
    bs = tl.zeros((BLOCK_M,), tl.int64) + b
    if n_psplits + n_ssplits == 1:  # no prefix and one key split: this program is the whole answer
        _store_final(Out, Lse, bs, i, h, row_ok, out, lse2, stride_ob, stride_om, stride_oh, stride_od, H, Lq,
                     offs_d, HEAD_DIM)
    else:
        lse_offset = _lse_offset(n_psplits + n_ssplits, B, Lq, H, HEAD_DIM)  # lse parts follow the outputs
        _store_part(Work, lse_offset, n_psplits + split, bs, i, h, row_ok, out, lse2, B, H, Lq, offs_d, HEAD_DIM)
        # The tile holding this sequence: tiles cut each task's run of sequences every seqs_per_tile.
        if HAS_BANK:
            task = tl.load(PREFIX_IDX + b).to(tl.int64)
            tile = tl.load(TASK_TILE_START + task) + (pos - tl.load(TASK_ROW_START + task)) // seqs_per_tile
        else:
            tile = pos // seqs_per_tile
        _, seq_lo, seq_hi = task_piece_range(TILE_TASK, TASK_TILE_START, TASK_ROW_START, tile, 1, seqs_per_tile, B,
                                             HAS_BANK)
        _arrive(Arrivals, Work, lse_offset, Out, Lse, ROW_ORDER, tile, seq_lo, seq_hi, first_head, heads_per_chunk,
                n_psplits, n_ssplits, B, H, Lq, stride_ob, stride_om, stride_oh, stride_od,
                HEAD_DIM, BLOCK_D, BLOCK_R, HAS_BANK)


@triton.autotune(configs=pick_configs([DECODE_GPU_CONFIG], DECODE_INTERPRETER_CONFIG), key=[])
@triton.jit
def decode_kernel(
    Q, K, V, PK, PV, PREFIX_IDX, PREFIX_LENS, KEY_MASK, ROW_ORDER, TASK_ROW_START, TASK_TILE_START, TILE_TASK,
    Out, Lse, Work, Arrivals,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_pkt, stride_pkp, stride_pkh, stride_pkd,
    stride_pvt, stride_pvp, stride_pvh, stride_pvd,
    stride_maskb, stride_maskn,
    stride_ob, stride_om, stride_oh, stride_od,
    B, H, Lq, Lk, P, seqs_per_tile, n_tiles, n_psplits, slots_per_split, n_ssplits, keys_per_split,
    group_size, heads_per_chunk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BANK: tl.constexpr, HAS_PREFIX_LENS: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (n_tiles * n_psplits + n_ssplits * B, Hkv * group_size // heads_per_chunk): prefix
    programs (tile, split) first, then sequence programs (split, sequence in task order); axis 1 is
    (KV head, chunk of heads_per_chunk of its group_size query heads), whose query rows are stacked
    so that each KV head (prefix and cache) is read once per chunk, not once per query head.
    Without a prefix n_psplits is 0; tiles then group sequences in batch order for the merge only.
    Optional inputs (PK, PV, PREFIX_IDX, PREFIX_LENS, KEY_MASK, the bank tables) may be the integer
    0 where their flag is off: they are read only under HAS_PREFIX / HAS_BANK / HAS_PREFIX_LENS /
    HAS_KEY_MASK. With a single part (n_psplits + n_ssplits == 1) Work and Arrivals are never touched."""
    pid = tl.program_id(0)
    chunks_per_group = group_size // heads_per_chunk
    chunk = tl.program_id(1)
    kv_head = (chunk // chunks_per_group).to(tl.int64)
    first_head = kv_head * group_size + (chunk % chunks_per_group) * heads_per_chunk
    n_prefix_items = n_tiles * n_psplits
    if HAS_PREFIX:  # without a prefix the prefix programs are not even compiled
        if pid < n_prefix_items:
            _prefix_program(
                Q, PK, PV, PREFIX_LENS, ROW_ORDER, TASK_ROW_START, TASK_TILE_START, TILE_TASK, Out, Lse, Work, Arrivals,
                stride_qb, stride_qm, stride_qh, stride_qd, stride_pkt, stride_pkp, stride_pkh, stride_pkd,
                stride_pvt, stride_pvp, stride_pvh, stride_pvd, stride_ob, stride_om, stride_oh, stride_od,
                B, H, Lq, P, seqs_per_tile, n_tiles, n_psplits, slots_per_split, n_ssplits, qk_scale, pid, kv_head,
                first_head, heads_per_chunk, HEAD_DIM, BLOCK_D, BLOCK_R, BLOCK_N, HAS_BANK, HAS_PREFIX_LENS,
                DOT_PRECISION)
        else:
            _sequence_program(
                Q, K, V, PREFIX_IDX, KEY_MASK, ROW_ORDER, TASK_ROW_START, TASK_TILE_START, TILE_TASK, Out, Lse, Work,
                Arrivals, stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                stride_vb, stride_vn, stride_vh, stride_vd, stride_maskb, stride_maskn,
                stride_ob, stride_om, stride_oh, stride_od, B, H, Lq, Lk, seqs_per_tile, n_psplits, n_ssplits,
                keys_per_split, qk_scale, pid - n_prefix_items, kv_head, first_head, heads_per_chunk,
                HEAD_DIM, BLOCK_D, BLOCK_R, BLOCK_M, BLOCK_N, HAS_BANK, HAS_KEY_MASK, CAUSAL, DOT_PRECISION)
    else:
        _sequence_program(
            Q, K, V, PREFIX_IDX, KEY_MASK, ROW_ORDER, TASK_ROW_START, TASK_TILE_START, TILE_TASK, Out, Lse, Work,
            Arrivals, stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
            stride_vb, stride_vn, stride_vh, stride_vd, stride_maskb, stride_maskn,
            stride_ob, stride_om, stride_oh, stride_od, B, H, Lq, Lk, seqs_per_tile, n_psplits, n_ssplits,
            keys_per_split, qk_scale, pid, kv_head, first_head, heads_per_chunk,
            HEAD_DIM, BLOCK_D, BLOCK_R, BLOCK_M, BLOCK_N, False, HAS_KEY_MASK, CAUSAL, DOT_PRECISION)
