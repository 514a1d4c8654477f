"""Gradient of the shared prefix K/V, reduced across the batch without atomics.

The work for one (head, prefix block) is the list of items (sequence row, query block) of every
sequence that uses that prefix. The list is cut into pieces of ``items_per_piece`` items, so that
even a prefix of one block with 12 heads fills the GPU. Stage 1 (``prefix_grad_partial_kernel``)
runs one program per (piece, prefix block, head) and writes an fp32 partial dK/dV of the block
to a workspace whose size depends on the number of pieces, not on B * P. Stage 2
(``prefix_grad_reduce_kernel``) sums each task's pieces in a fixed order: results are bitwise
repeatable.

With a bank, rows are taken sorted by task (``ROW_ORDER``) and every piece belongs to one task:
``PIECE_TASK[piece]`` names it (-1: unused piece), ``TASK_PIECE_START`` and ``TASK_ROW_START``
(T + 1 entries) delimit each task's pieces and sorted rows.
"""
import triton
import triton.language as tl

from csrc_triton.common import dropout_keep_tile, task_piece_range


@triton.jit
def prefix_grad_partial_kernel(
    Q, PK, PV, dOut, LseLog2, Delta, PREFIX_LENS, RNG,
    ROW_ORDER, TASK_ROW_START, TASK_PIECE_START, PIECE_TASK,
    dPK_ws, dPV_ws,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_pkt, stride_pkp, stride_pkh, stride_pkd,
    stride_pvt, stride_pvp, stride_pvh, stride_pvd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    H, Lq, P, P_pad, n_query_blocks, items_per_piece, n_items, drop_groups_per_row, keep_threshold,
    qk_scale, softmax_scale, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BANK: tl.constexpr, HAS_PREFIX_LENS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (n_pieces, cdiv(P, BLOCK_P), H). Workspaces are (n_pieces, H, P_pad, D) fp32."""
    piece = tl.program_id(0)
    pblock = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    task, item_lo, item_hi = task_piece_range(PIECE_TASK, TASK_PIECE_START, TASK_ROW_START, piece, n_query_blocks,
                                              items_per_piece, n_items, HAS_BANK)
    if task < 0:
        return
    n_prefix = P
    if HAS_PREFIX_LENS:
        n_prefix = tl.load(PREFIX_LENS + task).to(tl.int32)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    slots = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
    slot_ok = slots < n_prefix
    kv_mask = slot_ok[:, None] & d_ok[None, :]
    pk = tl.load(PK + task * stride_pkt + h * stride_pkh + slots[:, None] * stride_pkp + offs_d[None, :] * stride_pkd,
                 mask=kv_mask, other=0.0)
    pv = tl.load(PV + task * stride_pvt + h * stride_pvh + slots[:, None] * stride_pvp + offs_d[None, :] * stride_pvd,
                 mask=kv_mask, other=0.0)
    dpk = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    dpv = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    seed = 0
    drop_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        drop_offset = tl.load(RNG + 1)

    for item in range(item_lo, item_hi):
        row = item // n_query_blocks
        if HAS_BANK:
            b = tl.load(ROW_ORDER + row).to(tl.int64)
        else:
            b = tl.cast(row, tl.int64)
        offs_m = (item % n_query_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=qd_mask, other=0.0)
        do = tl.load(dOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=qd_mask, other=0.0)
        rows = (b * H + h) * Lq + offs_m
        lse2 = tl.load(LseLog2 + rows, mask=m_ok, other=float("inf"))
        delta = tl.load(Delta + rows, mask=m_ok, other=0.0)
        qk_t = tl.dot(pk, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.where(slot_ok[:, None], tl.math.exp2(qk_t - lse2[None, :]), 0.0)
        dp_t = tl.dot(pv, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep_t = tl.trans(dropout_keep_tile(seed, drop_offset + rows * drop_groups_per_row, pblock * BLOCK_P,
                                                keep_threshold, BLOCK_P))
            p_kept = tl.where(keep_t, p_t * dropout_scale, 0.0)
            dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
        else:
            p_kept = p_t
        dpv = tl.dot(p_kept.to(do.dtype), do, dpv, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dpk = tl.dot(ds_t.to(q.dtype), q, dpk, input_precision=DOT_PRECISION)

    ws = (piece.to(tl.int64) * H + h) * P_pad * HEAD_DIM + slots[:, None] * HEAD_DIM + offs_d[None, :]
    ws_mask = (slots[:, None] < P_pad) & d_ok[None, :]
    tl.store(dPK_ws + ws, dpk * softmax_scale, mask=ws_mask)
    tl.store(dPV_ws + ws, dpv, mask=ws_mask)


@triton.jit
def prefix_grad_reduce_kernel(
    dPK_ws, dPV_ws, TASK_PIECE_START, dPK, dPV,
    stride_dpkt, stride_dpkp, stride_dpkh, stride_dpkd,
    stride_dpvt, stride_dpvp, stride_dpvh, stride_dpvd,
    H, P, P_pad, n_pieces,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, HAS_BANK: tl.constexpr,
):
    """Grid (T, cdiv(P, BLOCK_P), H): dPK[t], dPV[t] = sum of task t's pieces, in piece order."""
    task = tl.program_id(0).to(tl.int64)
    pblock = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    if HAS_BANK:
        piece_lo = tl.load(TASK_PIECE_START + task)
        piece_hi = tl.load(TASK_PIECE_START + task + 1)
    else:
        piece_lo = 0
        piece_hi = n_pieces
    offs_d = tl.arange(0, BLOCK_D)
    slots = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
    ws_mask = (slots[:, None] < P_pad) & (offs_d[None, :] < HEAD_DIM)
    acc_k = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    acc_v = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    # Pieces are independent loads: pipeline them (the loop is latency bound for small P).
    for piece in tl.range(piece_lo, piece_hi, num_stages=3):
        ws = (piece * H + h) * P_pad * HEAD_DIM + slots[:, None] * HEAD_DIM + offs_d[None, :]
        acc_k += tl.load(dPK_ws + ws, mask=ws_mask, other=0.0)
        acc_v += tl.load(dPV_ws + ws, mask=ws_mask, other=0.0)
    out_mask = (slots[:, None] < P) & (offs_d[None, :] < HEAD_DIM)
    tl.store(dPK + task * stride_dpkt + h * stride_dpkh + slots[:, None] * stride_dpkp + offs_d[None, :] * stride_dpkd,
             acc_k.to(dPK.dtype.element_ty), mask=out_mask)
    tl.store(dPV + task * stride_dpvt + h * stride_dpvh + slots[:, None] * stride_dpvp + offs_d[None, :] * stride_dpvd,
             acc_v.to(dPV.dtype.element_ty), mask=out_mask)
