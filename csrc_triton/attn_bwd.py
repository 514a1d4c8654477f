"""Backward kernels of prefix attention (FlashAttention-2 style, scores recomputed): two launches.

1. ``bwd_preprocess_kernel``: delta = rowsum(dO * O) - dLSE and the lse in log2 units, with empty
   rows (lse = -inf) turned to +inf so that recomputed probabilities are 0 there; it also zeroes
   the prefix-gradient counters that the next launch counts with.
2. ``bwd_kernel``: its sequence programs compute dK/dV of the sequence's key block j of a KV head
   (key-stationary, one flat loop over the queries of the group's query heads: grouped heads are
   summed in a fixed order, no atomics) and dQ of query block j of a query head (query-stationary,
   over the prefix and the sequence keys). With equal heads one program does both halves for block j
   (causal work per key block falls as per query block grows, so each program does about the same
   work); with grouped heads the halves are separate programs (see ``bwd_kernel``). Its programs
   after those each take one piece of the prefix gradient, reduced across the batch per task in a
   fixed order by the piece that arrives last (``prefix_grad.py``).
"""
import triton
import triton.language as tl

from csrc_triton.common import (
    LOG2E_C, device_capability, dropout_keep_tile, key_stage_bounds, key_visibility, launch_arg, locate_prefix,
    pick_configs, tuning_prune,
)
from csrc_triton.prefix_grad import prefix_piece_grads


@triton.jit
def scratch_sections(Scratch, n_rows, ws_size):
    """(Delta, LseLog2, dPK_ws, dPV_ws, Counters) inside the backward's one fp32 scratch buffer:
    n_rows, n_rows, ws_size, ws_size fp32 elements, then the int32 counters (layout owned by
    prefix_attn.triton_launch._backward_plan)."""
    Delta = Scratch
    LseLog2 = Scratch + n_rows
    dPK_ws = Scratch + 2 * tl.cast(n_rows, tl.int64)
    dPV_ws = dPK_ws + tl.cast(ws_size, tl.int64)
    Counters = (dPV_ws + tl.cast(ws_size, tl.int64)).to(tl.pointer_type(tl.int32))
    return Delta, LseLog2, dPK_ws, dPV_ws, Counters


@triton.jit
def bwd_preprocess_kernel(
    Out, dOut, Lse, dLse, Scratch,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dlb, stride_dlh, stride_dlm,
    H, Lq, n_rows, ws_size, n_counters,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), B * H). Also zeroes the prefix-gradient counters of the scratch
    (grid-stride over all programs) for the backward kernel launched after it on the same stream."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Delta, LseLog2, _, _, Counters = scratch_sections(Scratch, n_rows, ws_size)
    COUNTER_BLOCK: tl.constexpr = 256
    n_programs = tl.num_programs(0) * tl.num_programs(1)
    for start in range((pid_bh * tl.num_programs(0) + pid_m) * COUNTER_BLOCK, n_counters, n_programs * COUNTER_BLOCK):
        offs_c = start + tl.arange(0, COUNTER_BLOCK)
        tl.store(Counters + offs_c, tl.zeros((COUNTER_BLOCK,), tl.int32), mask=offs_c < n_counters)

    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = pid_bh.to(tl.int64) * Lq + offs_m
    row_ok = offs_m < Lq
    if HAS_DLSE:
        # d lse_i / d s_ij = p_ij, so a gradient on lse enters exactly as -delta does. Any strides
        # (autograd hands over the gradient of lse.sum() as a stride-0 expansion): no copy.
        delta -= tl.load(dLse + b * stride_dlb + h * stride_dlh + offs_m * stride_dlm, mask=row_ok,
                         other=0.0).to(tl.float32)
    lse = tl.load(Lse + row, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_C)
    tl.store(Delta + row, delta, mask=row_ok)
    tl.store(LseLog2 + row, lse2, mask=row_ok)


@triton.jit
def accumulate_dkdv(
    dk, dv, k, v,
    Q, dO, LseLog2, Delta, stride_qm, stride_qd, stride_dom, stride_dod, stride_qh, stride_doh, group_size,
    q_start, q_end, Lq, key_cols, query_shift,
    seed, drop_counter_base, drop_groups_per_row, drop_col_start, keep_threshold, dropout_scale,
    qk_scale,
    offs_d, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one key tile (BLOCK_N keys) over the query blocks [q_start, q_end) of each of the
    group_size query heads of its KV head (Q, dO, LseLog2, Delta and drop_counter_base at the first
    one; head g is g * stride_qh, g * stride_doh and g * Lq rows further), summed in head order.

    One flat loop over (head, query block): a loop over heads around the block loop kept the
    accumulators and key tiles live across two loop levels and spilled registers (grouped heads only;
    group_size = 1 is a constant and the loop is the plain block loop).
    CAUSAL masks query i (key position i + query_shift) from keys after it. Queries >= Lq load
    lse = +inf, so p = 0 there. Keys out of range or padded are not masked here: row j of dK/dV
    depends on key j alone, so the caller zeroes those rows once at the end.
    """
    d_ok = offs_d < HEAD_DIM
    n_blocks = tl.cdiv(tl.maximum(q_end - q_start, 0), BLOCK_M)
    for it in range(0, group_size * n_blocks):
        if group_size == 1:
            g = 0
            start_m = q_start + it * BLOCK_M
        else:
            g = it // n_blocks
            start_m = q_start + (it - g * n_blocks) * BLOCK_M
        Qg = Q + g * stride_qh
        dOg = dO + g * stride_doh
        head_row = g * Lq
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        q = tl.load(Qg + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lse2 = tl.load(LseLog2 + head_row + offs_m, mask=m_ok, other=float("inf"))
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(qk_t - lse2[None, :])
        if CAUSAL:
            p_t = tl.where(key_cols[:, None] <= offs_m[None, :] + query_shift, p_t, 0.0)
        do = tl.load(dOg + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            row_counter = drop_counter_base + (head_row + offs_m).to(tl.int64) * drop_groups_per_row
            keep_t = tl.trans(dropout_keep_tile(seed, row_counter, drop_col_start, keep_threshold, BLOCK_N))
            p_kept = tl.where(keep_t, p_t * dropout_scale, 0.0)
            dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
        else:
            p_kept = p_t
        dv = tl.dot(p_kept.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(Delta + head_row + offs_m, mask=m_ok, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def accumulate_dq(
    dq, q, do, lse2, delta,
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    key_start, key_end, n_keys,
    query_pos, key_valid_ptr, stride_valid_n,
    seed, drop_row_counter, drop_col_base, keep_threshold, dropout_scale,
    qk_scale,
    offs_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of one query tile over the key blocks [key_start, key_end) of one range (unscaled)."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(key_start, key_end, BLOCK_N):
        cols = start_n + offs_n
        if CHECK_BOUNDS:
            load_mask = (cols[:, None] < n_keys) & d_ok[None, :]
        else:
            load_mask = d_ok[None, :]
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=load_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=load_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])
        if CHECK_BOUNDS or CAUSAL or HAS_KEY_MASK:
            visible = key_visibility(cols, n_keys, query_pos, key_valid_ptr, stride_valid_n, BLOCK_N,
                                     CHECK_BOUNDS, HAS_KEY_MASK, CAUSAL)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep_tile(seed, drop_row_counter, drop_col_base + start_n, keep_threshold, BLOCK_N)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


# (BLOCK_M1, BLOCK_N1) tile the dK/dV part, (BLOCK_M2, BLOCK_N2) the dQ part; BLOCK_N1 == BLOCK_M2
# so that program j owns key block j and query block j. Best first (what runs without
# autotuning): on an H100 (bf16, D = 64) autotuning picked 64 x 64 / 64 x 64 at L = 1024 and 2048,
# the 8-warp 128-key tile at L = 512 (run3-e34d600).
BWD_GPU_CONFIGS = [
    triton.Config({"BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}, num_warps=4, num_stages=3),
]
BWD_INTERPRETER_CONFIG = triton.Config(
    {"BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 16}, num_warps=4, num_stages=1)


def bwd_configs_for(configs, block_d: int, capability: int):
    """The configs worth trying at this head-dim tile on this GPU generation, best first.

    Head dims above 64: 8-warp 128-key tiles on Hopper, 64-key 4-warp tiles before it (the dK, dV
    accumulators spill otherwise)."""
    if block_d <= 64:
        return list(configs)
    if capability >= 90:
        return [c for c in configs if c.num_warps == 8 or c.kwargs["BLOCK_N1"] <= 64 and c.kwargs["BLOCK_M1"] <= 32]
    return [c for c in configs if c.kwargs["BLOCK_N1"] <= 64 and c.kwargs["BLOCK_M1"] <= 32]


def prune_bwd_configs(configs, named_args, **kwargs):
    return bwd_configs_for(configs, launch_arg(named_args, kwargs, "BLOCK_D"), device_capability(named_args["Q"]))


@triton.autotune(
    configs=pick_configs(BWD_GPU_CONFIGS, BWD_INTERPRETER_CONFIG),
    key=["TUNE_LQ", "TUNE_LK", "BLOCK_D", "BLOCK_P", "CAUSAL", "HAS_KEY_MASK", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": tuning_prune(prune_bwd_configs)},
)
@triton.jit
def bwd_kernel(
    Q, K, V, PK, PV, PREFIX_IDX, PREFIX_LENS, KEY_MASK, RNG,
    dOut, Scratch, dQ, dK, dV,
    ROW_ORDER, TASK_ROW_START, TASK_PIECE_START, PIECE_TASK, dPK, dPV,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_pkt, stride_pkp, stride_pkh, stride_pkd,
    stride_pvt, stride_pvp, stride_pvh, stride_pvd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    stride_maskb, stride_maskn,
    H, group_size, Lq, Lk, P, drop_groups_per_row, keep_threshold,
    qk_scale, softmax_scale, dropout_scale,
    B, n_rows, ws_size, P_pad, n_pblocks, n_prefix_query_blocks, items_per_piece, n_items, n_pieces,
    TUNE_LQ, TUNE_LK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_PREFIX: tl.constexpr, HAS_BANK: tl.constexpr, HAS_PREFIX_LENS: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_MP: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    """Grid (n_seq + n_pieces * n_pblocks * Hkv,), Hkv = H // group_size the KV heads (query head h reads
    KV head h // group_size), n_blocks = max(cdiv(Lk, BLOCK_N1), cdiv(Lq, BLOCK_M2)) and
    n_seq = n_blocks * B * Hkv with equal heads, n_blocks * B * (Hkv + H) with grouped heads.

    Programs [0, n_seq) are the sequence programs, block index fastest. Equal heads (group_size = 1,
    which the launch specialises to a constant): program j of (b, head) computes dK/dV of key block j
    and dQ of query block j (causal work per key block falls as per query block grows, so each program
    does about the same work). Grouped heads: the first n_blocks * B * Hkv programs compute dK/dV of key
    block j of (b, KV head), summed over the group's query heads in a fixed order (no atomics); the next
    n_blocks * B * H compute dQ of query block j of one (b, query head). Apart, neither half holds the
    other's tiles, and the dQ half needs no loop over the group's heads (a loop nest that spilled
    registers). Each program after the sequence programs takes one piece of the prefix gradient
    (prefix_grad.prefix_piece_grads, BLOCK_MP query rows per item): the heavy programs come first, the
    light prefix pieces fill the tail of the schedule.
    """
    n_blocks = tl.maximum(tl.cdiv(Lk, BLOCK_N1), tl.cdiv(Lq, BLOCK_M2))
    kv_heads = H // group_size
    n_kv_programs = n_blocks * B * kv_heads
    if group_size == 1:
        n_seq = n_kv_programs
    else:
        n_seq = n_kv_programs + n_blocks * B * H
    pid = tl.program_id(0)
    Delta, LseLog2, dPK_ws, dPV_ws, Counters = scratch_sections(Scratch, n_rows, ws_size)
    if HAS_PREFIX:
        if pid >= n_seq:
            prefix_piece_grads(
                pid - n_seq, Q, PK, PV, dOut, LseLog2, Delta, PREFIX_LENS, RNG,
                ROW_ORDER, TASK_ROW_START, TASK_PIECE_START, PIECE_TASK,
                dPK_ws, dPV_ws, Counters, dPK, dPV,
                stride_qb, stride_qm, stride_qh, stride_qd,
                stride_pkt, stride_pkp, stride_pkh, stride_pkd,
                stride_pvt, stride_pvp, stride_pvh, stride_pvd,
                stride_dob, stride_dom, stride_doh, stride_dod,
                H, group_size, Lq, P, P_pad, n_pblocks, n_prefix_query_blocks, items_per_piece, n_items, n_pieces,
                drop_groups_per_row, keep_threshold, qk_scale, softmax_scale, dropout_scale,
                HEAD_DIM, BLOCK_D, BLOCK_P, BLOCK_MP, HAS_BANK, HAS_PREFIX_LENS, HAS_DROPOUT, DOT_PRECISION,
            )
            return
    # Which half: with equal heads both (dq_program is the constant False), with grouped heads dK/dV
    # programs first, then dQ programs. h: the dQ program's query head, or the group's first one.
    dq_program = (group_size != 1) & (pid >= n_kv_programs)
    do_dkdv = (group_size == 1) | (pid < n_kv_programs)
    do_dq = (group_size == 1) | dq_program
    bh = tl.where(dq_program, pid - n_kv_programs, pid) // n_blocks
    heads = tl.where(dq_program, H, kv_heads)
    b = (bh // heads).to(tl.int64)
    h = tl.where(dq_program, bh % heads, bh % heads * group_size).to(tl.int64)
    h_kv = h // group_size
    pid = pid % n_blocks  # the block index (n_kv_programs is a multiple of n_blocks)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    query_shift = Lk - Lq  # query i sits at key position i + query_shift

    mask_row = KEY_MASK + b * stride_maskb
    seed = 0
    drop_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        drop_offset = tl.load(RNG + 1)
    seq_col_base = (P + 7) // 8 * 8

    # ---- dK, dV of key block pid of KV head h_kv: summed over the group's query heads in head order
    # (sequence keys only; the prefix's are reduced elsewhere) ----
    n_start = pid * BLOCK_N1
    if do_dkdv and n_start < Lk:
        key_cols = n_start + tl.arange(0, BLOCK_N1)
        key_in = key_cols < Lk
        key_ok = key_in
        if HAS_KEY_MASK:
            key_ok = key_ok & (tl.load(mask_row + key_cols * stride_maskn, mask=key_in, other=0) != 0)
        kv_mask = key_in[:, None] & d_ok[None, :]
        k = tl.load(K + b * stride_kb + h_kv * stride_kh + key_cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b * stride_vb + h_kv * stride_vh + key_cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        dk = tl.zeros((BLOCK_N1, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N1, BLOCK_D), tl.float32)
        # Queries before n_start - shift see none of these keys; from diag_end on they see all.
        q_first = tl.maximum(n_start - query_shift, 0) // BLOCK_M1 * BLOCK_M1
        diag_end = tl.minimum(tl.maximum(n_start + BLOCK_N1 - query_shift, 0), Lq)
        diag_end = (diag_end + BLOCK_M1 - 1) // BLOCK_M1 * BLOCK_M1
        Qb = Q + b * stride_qb + h * stride_qh  # h: the group's first query head
        dOb = dOut + b * stride_dob + h * stride_doh
        row0 = (b * H + h) * Lq
        drop_counter_base = drop_offset + row0 * drop_groups_per_row
        if CAUSAL:
            dk, dv = accumulate_dkdv(
                dk, dv, k, v, Qb, dOb, LseLog2 + row0, Delta + row0, stride_qm, stride_qd, stride_dom,
                stride_dod, stride_qh, stride_doh, group_size, q_first, diag_end, Lq, key_cols, query_shift,
                seed, drop_counter_base, drop_groups_per_row, seq_col_base + n_start, keep_threshold,
                dropout_scale, qk_scale, offs_d, HEAD_DIM, BLOCK_M1, BLOCK_N1, True, HAS_DROPOUT, DOT_PRECISION,
            )
            q_rest = diag_end
        else:
            q_rest = 0
        dk, dv = accumulate_dkdv(
            dk, dv, k, v, Qb, dOb, LseLog2 + row0, Delta + row0, stride_qm, stride_qd, stride_dom, stride_dod,
            stride_qh, stride_doh, group_size, q_rest, Lq, Lq, key_cols, query_shift,
            seed, drop_counter_base, drop_groups_per_row, seq_col_base + n_start, keep_threshold, dropout_scale,
            qk_scale, offs_d, HEAD_DIM, BLOCK_M1, BLOCK_N1, False, HAS_DROPOUT, DOT_PRECISION,
        )
        # A padded key is seen by no query: its gradient rows are zero.
        dk = tl.where(key_ok[:, None], dk * softmax_scale, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
        tl.store(dK + b * stride_dkb + h_kv * stride_dkh + key_cols[:, None] * stride_dkn
                 + offs_d[None, :] * stride_dkd, dk.to(dK.dtype.element_ty), mask=kv_mask)
        tl.store(dV + b * stride_dvb + h_kv * stride_dvh + key_cols[:, None] * stride_dvn
                 + offs_d[None, :] * stride_dvd, dv.to(dV.dtype.element_ty), mask=kv_mask)

    # ---- dQ of query block pid of query head h: over the prefix slots, then the sequence keys ----
    m_start = pid * BLOCK_M2
    if do_dq and m_start < Lq:
        offs_m = m_start + tl.arange(0, BLOCK_M2)
        m_ok = offs_m < Lq
        qd_mask = m_ok[:, None] & d_ok[None, :]
        query_pos = offs_m + query_shift
        Kb = K + b * stride_kb + h_kv * stride_kh
        Vb = V + b * stride_vb + h_kv * stride_vh
        full_end, diag_end = key_stage_bounds(m_start + query_shift, Lk, BLOCK_M2, BLOCK_N2, CAUSAL)
        Qb = Q + b * stride_qb + h * stride_qh
        dOb = dOut + b * stride_dob + h * stride_doh
        row0 = (b * H + h) * Lq
        q = tl.load(Qb + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
        do = tl.load(dOb + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
        lse2 = tl.load(LseLog2 + row0 + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(Delta + row0 + offs_m, mask=m_ok, other=0.0)
        drop_row_counter = drop_offset + (row0 + offs_m.to(tl.int64)) * drop_groups_per_row
        dq = tl.zeros((BLOCK_M2, BLOCK_D), tl.float32)
        if HAS_PREFIX:
            PKt, PVt, n_prefix = locate_prefix(PK, PV, PREFIX_IDX, PREFIX_LENS, b, h_kv, P, stride_pkt,
                                               stride_pkh, stride_pvt, stride_pvh, HAS_BANK, HAS_PREFIX_LENS)
            p_full_end = n_prefix // BLOCK_P * BLOCK_P
            dq = accumulate_dq(
                dq, q, do, lse2, delta, PKt, PVt, stride_pkp, stride_pkd, stride_pvp, stride_pvd,
                0, p_full_end, n_prefix, query_pos, KEY_MASK, 0,
                seed, drop_row_counter, 0, keep_threshold, dropout_scale, qk_scale,
                offs_d, HEAD_DIM, BLOCK_P, False, False, False, HAS_DROPOUT, DOT_PRECISION,
            )
            dq = accumulate_dq(
                dq, q, do, lse2, delta, PKt, PVt, stride_pkp, stride_pkd, stride_pvp, stride_pvd,
                p_full_end, n_prefix, n_prefix, query_pos, KEY_MASK, 0,
                seed, drop_row_counter, 0, keep_threshold, dropout_scale, qk_scale,
                offs_d, HEAD_DIM, BLOCK_P, True, False, False, HAS_DROPOUT, DOT_PRECISION,
            )
        dq = accumulate_dq(
            dq, q, do, lse2, delta, Kb, Vb, stride_kn, stride_kd, stride_vn, stride_vd,
            0, full_end, Lk, query_pos, mask_row, stride_maskn,
            seed, drop_row_counter, seq_col_base, keep_threshold, dropout_scale, qk_scale,
            offs_d, HEAD_DIM, BLOCK_N2, False, False, HAS_KEY_MASK, HAS_DROPOUT, DOT_PRECISION,
        )
        dq = accumulate_dq(
            dq, q, do, lse2, delta, Kb, Vb, stride_kn, stride_kd, stride_vn, stride_vd,
            full_end, diag_end, Lk, query_pos, mask_row, stride_maskn,
            seed, drop_row_counter, seq_col_base, keep_threshold, dropout_scale, qk_scale,
            offs_d, HEAD_DIM, BLOCK_N2, True, CAUSAL, HAS_KEY_MASK, HAS_DROPOUT, DOT_PRECISION,
        )
        dq = dq * softmax_scale
        tl.store(dQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm
                 + offs_d[None, :] * stride_dqd, dq.to(dQ.dtype.element_ty), mask=qd_mask)
