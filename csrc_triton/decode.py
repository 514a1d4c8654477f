"""Decode-path kernels (a few queries per sequence, e.g. one token per generation step).

A step's attention is bound by reading K/V from memory. Three kernels:

1. ``decode_prefix_kernel``: the query rows of all sequences that use one task's prefix are
   stacked into tiles of BLOCK_R rows (a tensor-core M dimension), so the prefix K/V is read once
   per tile rather than once per sequence (Hydragen / cascade inference). The prefix is also split
   along P (``slots_per_split``) so that a long prefix still fills the GPU.
2. ``decode_seq_kernel``: flash-decoding over each sequence's own keys: the keys are cut into
   splits of ``keys_per_split`` so that short batches fill the GPU.
3. ``decode_merge_kernel``: log-sum-exp merge of every part in fp32.

Each part writes a normalised partial output (fp32) and its lse in log2 units; an empty part
writes lse = -inf. Parts live in one workspace (n_parts, B, Lq, H, D) / (n_parts, B, H, Lq): the
prefix splits first, then the sequence splits.
"""
import triton
import triton.language as tl

from csrc_triton.common import LN2_C, key_visibility, online_softmax_step, task_piece_range


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
def _store_part(OutPart, LsePart, part, b, i, h, row_ok, acc, l_i, m_i, B, H, Lq,
                offs_d, HEAD_DIM: tl.constexpr):
    """Normalised partial output and its lse (log2 units; -inf for an empty part)."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    part = part.to(tl.int64)
    row = ((part * B + b) * Lq + i) * H + h  # (part, b, i, h) row of the (n_parts, B, Lq, H, D) workspace
    tl.store(OutPart + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(LsePart + ((part * B + b) * H + h) * Lq + i, lse2, mask=row_ok)


@triton.jit
def decode_prefix_kernel(
    Q, PK, PV, PREFIX_LENS, ROW_ORDER, TASK_ROW_START, TASK_TILE_START, TILE_TASK, OutPart, LsePart,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_pkt, stride_pkp, stride_pkh, stride_pkd,
    stride_pvt, stride_pvp, stride_pvh, stride_pvd,
    B, H, Lq, P, n_rows, slots_per_split, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_BANK: tl.constexpr, HAS_PREFIX_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (n_tiles, n_prefix_splits, H). Rows are (b, i) query rows, taken in task order."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    task, row_lo, row_hi = task_piece_range(TILE_TASK, TASK_TILE_START, TASK_ROW_START, tile, Lq, BLOCK_R, n_rows,
                                            HAS_BANK)
    if task < 0:
        return
    rows = row_lo + tl.arange(0, BLOCK_R)
    row_ok = rows < row_hi
    seq = tl.where(row_ok, rows // Lq, 0)
    if HAS_BANK:
        b = tl.load(ROW_ORDER + seq, mask=row_ok, other=0).to(tl.int64)
    else:
        b = seq.to(tl.int64)
    i = rows % Lq
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b[:, None] * stride_qb + i[:, None] * stride_qm + h * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    n_prefix = P
    if HAS_PREFIX_LENS:
        n_prefix = tl.load(PREFIX_LENS + task).to(tl.int32)
    slot_lo = split * slots_per_split
    slot_hi = tl.minimum(slot_lo + slots_per_split, n_prefix)
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    acc, l_i, m_i = _online_softmax_range(
        acc, l_i, m_i, q, PK + task * stride_pkt + h * stride_pkh, PV + task * stride_pvt + h * stride_pvh,
        stride_pkp, stride_pkd, stride_pvp, stride_pvd, slot_lo, slot_hi, n_prefix, i, PK, 0, qk_scale,
        offs_d, HEAD_DIM, BLOCK_P, False, False, DOT_PRECISION)
    _store_part(OutPart, LsePart, split, b, i, h, row_ok, acc, l_i, m_i, B, H, Lq, offs_d, HEAD_DIM)


@triton.jit
def decode_seq_kernel(
    Q, K, V, KEY_MASK, OutPart, LsePart,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_maskb, stride_maskn,
    B, H, Lq, Lk, keys_per_split, first_part, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (n_seq_splits, B * H): split s attends keys [s * keys_per_split, (s + 1) * keys_per_split)."""
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    i = tl.arange(0, BLOCK_M)
    row_ok = i < Lq
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + i[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    key_lo = split * keys_per_split
    key_hi = tl.minimum(key_lo + keys_per_split, Lk)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    acc, l_i, m_i = _online_softmax_range(
        acc, l_i, m_i, q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd, key_lo, key_hi, Lk, Lk - Lq + i,
        KEY_MASK + b * stride_maskb, stride_maskn, qk_scale, offs_d, HEAD_DIM, BLOCK_N, CAUSAL, HAS_KEY_MASK,
        DOT_PRECISION)
    _store_part(OutPart, LsePart, first_part + split, b, i, h, row_ok, acc, l_i, m_i, B, H, Lq, offs_d, HEAD_DIM)


@triton.jit
def decode_merge_kernel(
    OutPart, LsePart, Out, Lse,
    stride_ob, stride_om, stride_oh, stride_od,
    B, H, Lq, n_parts,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (B * H,): out = sum_parts exp2(lse_p - lse) * out_p, lse = log-sum-exp of the parts."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    i = tl.arange(0, BLOCK_M)
    row_ok = i < Lq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for part in range(0, n_parts):
        lse_p = tl.load(LsePart + ((part * B + b) * H + h) * Lq + i, mask=row_ok, other=float("-inf"))
        row = ((part * B + b) * Lq + i) * H + h
        out_p = tl.load(OutPart + row[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0)
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
    tl.store(Out + b * stride_ob + h * stride_oh + i[:, None] * stride_om + offs_d[None, :] * stride_od,
             (acc / total_safe[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * Lq + i, tl.where(empty, float("-inf"), (m_sub + tl.math.log2(total_safe)) * LN2_C),
             mask=row_ok)
