"""Forward kernel of prefix attention: one online-softmax pass over [prefix slots; own keys].

Every query row reads its task's prefix block (shared by the batch) and then its own sequence's
keys where they lie in memory; the concatenation is never built. Scores are scaled by
softmax_scale * log2(e) so that the softmax runs on exp2; the running max m, sum l and the
accumulator stay in fp32.
"""
import triton
import triton.language as tl

from csrc_triton.common import (
    LN2_C, dropout_keep_tile, key_stage_bounds, key_visibility, launch_arg, locate_prefix, online_softmax_step,
    pick_configs, tuning_prune,
)


@triton.jit
def attend_key_range(
    acc, l_i, m_i, q,
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    key_start, key_end, n_keys,
    query_pos, key_valid_ptr, stride_valid_n,
    seed, drop_row_counter, drop_col_base, keep_threshold,
    qk_scale,
    offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over the key blocks [key_start, key_end) of one range (prefix or sequence).

    CHECK_BOUNDS masks keys >= n_keys (ragged tail); CAUSAL masks key j > query_pos[i];
    HAS_KEY_MASK reads the per-key padding mask. Fully visible blocks run with all three off.
    """
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(key_start, key_end, BLOCK_N):
        cols = start_n + offs_n
        if CHECK_BOUNDS:
            load_mask = (cols[:, None] < n_keys) & d_ok[None, :]
        else:
            load_mask = d_ok[None, :]
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=load_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if CHECK_BOUNDS or CAUSAL or HAS_KEY_MASK:
            visible = key_visibility(cols, n_keys, query_pos, key_valid_ptr, stride_valid_n, BLOCK_N,
                                     CHECK_BOUNDS, HAS_KEY_MASK, CAUSAL)
            qk = tl.where(visible, qk, float("-inf"))
        p, alpha, l_i, m_new = online_softmax_step(qk, m_i, l_i)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = dropout_keep_tile(seed, drop_row_counter, drop_col_base + start_n, keep_threshold, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=load_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Named configs (BLOCK_M, BLOCK_N, num_warps, num_stages), best first: the first surviving one is
# what runs without autotuning. On an H100 (bf16, D = 64, L = 512..2048) autotuning picked the
# 64 x 64 tile every time (benchmarks/results/NVIDIA_H100_80GB_HBM3/2026-11-22-run3-e34d600).
FWD_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=4),
]
FWD_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)


def fwd_configs_for(configs, seqlen_q_bucket: int, block_d: int):
    """The configs worth trying, best first. Short query lengths (decode-like calls) take 64-row
    tiles. Head dims above 64 need 8 warps for 128-row tiles (4 warps spill the 128 x BLOCK_D fp32
    accumulator) and at most 64-wide key tiles."""
    kept = list(configs)
    if seqlen_q_bucket <= 64:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] <= 64] or kept
    if block_d > 64:
        kept = [c for c in kept if c.kwargs["BLOCK_N"] <= 64 and (c.kwargs["BLOCK_M"] <= 64 or c.num_warps == 8)]
    return kept


def prune_fwd_configs(configs, named_args, **kwargs):
    return fwd_configs_for(configs, launch_arg(named_args, kwargs, "TUNE_LQ"), launch_arg(named_args, kwargs, "BLOCK_D"))


@triton.autotune(
    configs=pick_configs(FWD_GPU_CONFIGS, FWD_INTERPRETER_CONFIG),
    key=["TUNE_LQ", "TUNE_LK", "BLOCK_D", "BLOCK_P", "CAUSAL", "HAS_KEY_MASK", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": tuning_prune(prune_fwd_configs)},
)
@triton.jit
def prefix_attn_fwd_kernel(
    Q, K, V, PK, PV, PREFIX_IDX, PREFIX_LENS, KEY_MASK, RNG, Out, Lse,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_pkt, stride_pkp, stride_pkh, stride_pkd,
    stride_pvt, stride_pvp, stride_pvh, stride_pvd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_maskb, stride_maskn,
    H, group_size, Lq, Lk, P, drop_groups_per_row, keep_threshold,
    qk_scale, dropout_scale,
    TUNE_LQ, TUNE_LK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_PREFIX: tl.constexpr, HAS_BANK: tl.constexpr, HAS_PREFIX_LENS: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), B * H). Writes Out (B, Lq, H, D) and Lse (B, H, Lq) natural log.

    Grouped heads: K, V and the prefix have H / group_size heads; query head h reads KV head
    h // group_size. group_size = 1 (equal heads) is specialised to a constant by the launch."""
    # Causal: the last query blocks see the most keys; launch them first so that the short ones
    # fill the tail of the schedule.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    h_kv = h // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    seed = 0
    drop_row_counter = offs_m.to(tl.int64)
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        drop_row_counter = tl.load(RNG + 1) + ((b * H + h) * Lq + offs_m) * drop_groups_per_row
    # Dropout columns: prefix slot s is column s, own key j is column P8 + j (P rounded up to 8).
    seq_col_base = (P + 7) // 8 * 8
    query_pos = Lk - Lq + offs_m  # bottom-right alignment

    if HAS_PREFIX:
        PKt, PVt, n_prefix = locate_prefix(PK, PV, PREFIX_IDX, PREFIX_LENS, b, h_kv, P, stride_pkt, stride_pkh,
                                           stride_pvt, stride_pvh, HAS_BANK, HAS_PREFIX_LENS)
        full_end = n_prefix // BLOCK_P * BLOCK_P
        acc, l_i, m_i = attend_key_range(
            acc, l_i, m_i, q, PKt, PVt, stride_pkp, stride_pkd, stride_pvp, stride_pvd,
            0, full_end, n_prefix, query_pos, KEY_MASK, 0,
            seed, drop_row_counter, 0, keep_threshold, qk_scale,
            offs_d, HEAD_DIM, BLOCK_D, BLOCK_P,
            False, False, False, HAS_DROPOUT, DOT_PRECISION,
        )
        acc, l_i, m_i = attend_key_range(
            acc, l_i, m_i, q, PKt, PVt, stride_pkp, stride_pkd, stride_pvp, stride_pvd,
            full_end, n_prefix, n_prefix, query_pos, KEY_MASK, 0,
            seed, drop_row_counter, 0, keep_threshold, qk_scale,
            offs_d, HEAD_DIM, BLOCK_D, BLOCK_P,
            True, False, False, HAS_DROPOUT, DOT_PRECISION,
        )

    Kb = K + b * stride_kb + h_kv * stride_kh
    Vb = V + b * stride_vb + h_kv * stride_vh
    mask_row = KEY_MASK + b * stride_maskb
    # Blocks every row of the tile sees whole, then the diagonal blocks with the causal mask.
    full_end, diag_end = key_stage_bounds(Lk - Lq + pid_m * BLOCK_M, Lk, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = attend_key_range(
        acc, l_i, m_i, q, Kb, Vb, stride_kn, stride_kd, stride_vn, stride_vd,
        0, full_end, Lk, query_pos, mask_row, stride_maskn,
        seed, drop_row_counter, seq_col_base, keep_threshold, qk_scale,
        offs_d, HEAD_DIM, BLOCK_D, BLOCK_N,
        False, False, HAS_KEY_MASK, HAS_DROPOUT, DOT_PRECISION,
    )
    acc, l_i, m_i = attend_key_range(
        acc, l_i, m_i, q, Kb, Vb, stride_kn, stride_kd, stride_vn, stride_vd,
        full_end, diag_end, Lk, query_pos, mask_row, stride_maskn,
        seed, drop_row_counter, seq_col_base, keep_threshold, qk_scale,
        offs_d, HEAD_DIM, BLOCK_D, BLOCK_N,
        True, CAUSAL, HAS_KEY_MASK, HAS_DROPOUT, DOT_PRECISION,
    )

    # A row that sees nothing (all keys masked, no prefix) returns zeros and lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (dropout_scale / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2_C)
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(Lse + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)
