"""Gradient of the shared prefix K/V, reduced across the batch without float atomics.

These are jitted helpers of the backward kernel (``attn_bwd.bwd_kernel``): its programs past the
sequence programs each take one piece of the prefix-gradient work.

The work for one (task, KV head, prefix block) is the list of items (sequence row, query head of
the KV head's group, query block) of every sequence that uses that task's prefix: with grouped
heads (query head h reads KV head h // group_size) the group's query heads are summed like the
sequences. The list is cut into pieces of ``items_per_piece`` items, so that even a prefix of one
block with 12 heads fills the GPU. Each piece writes its fp32 partial dK/dV of the block to a
workspace (n_pieces, Hkv, P_pad, D), then increments an int32 counter of its (task, prefix block,
KV head); the piece that arrives last sums all pieces of the task in piece order and writes
dprefix. The sum's order never depends on which piece arrives
last (it reloads every partial, its own included): results are bitwise repeatable.

With a bank, rows are taken sorted by task (``ROW_ORDER``) and every piece belongs to one task:
``PIECE_TASK[piece]`` names it (-1: unused piece), ``TASK_PIECE_START`` and ``TASK_ROW_START``
(T + 1 entries) delimit each task's pieces and sorted rows. Every task has at least one piece (an
empty piece for a task no sequence uses), so that its dprefix is written (zeros).

Memory ordering on a GPU (the interpreter runs programs one at a time and cannot show a race):

- A piece's partial is stored by all threads of the program; ``tl.debug_barrier()`` (bar.sync)
  then orders every thread's stores before the counter increment, which one thread issues with
  ``sem="acq_rel", scope="gpu"``: its release half is cumulative, so it publishes all the
  program's stores (ordered before it by the barrier) to every SM.
- The increments of one counter are read-modify-writes of one location, so they form a release
  sequence: the last piece's increment (acquire) synchronises with every earlier piece's release.
  A barrier after it orders the other threads' loads after the acquire, and the loads use
  ``cache_modifier=".cg"`` (L2, never a stale L1 line: L1 is not coherent across SMs).
- Counters must be 0 when the backward kernel starts: ``bwd_preprocess_kernel`` (the launch before
  it, on the same stream) zeroes them, so nothing is reset on the host and no counter outlives its
  call (see prefix_attn.triton_launch.backward_unchecked for why that is graph and stream safe).
"""
import triton
import triton.language as tl

from csrc_triton.common import dropout_keep_tile, task_piece_range


@triton.jit
def prefix_piece_grads(
    pid, Q, PK, PV, dOut, LseLog2, Delta, PREFIX_LENS, RNG,
    ROW_ORDER, TASK_ROW_START, TASK_PIECE_START, PIECE_TASK,
    dPK_ws, dPV_ws, Counters, dPK, dPV,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_pkt, stride_pkp, stride_pkh, stride_pkd,
    stride_pvt, stride_pvp, stride_pvh, stride_pvd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    H, group_size, Lq, P, P_pad, n_pblocks, n_query_blocks, items_per_piece, n_items, n_pieces,
    drop_groups_per_row, keep_threshold, qk_scale, softmax_scale, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BANK: tl.constexpr, HAS_PREFIX_LENS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program ``pid`` of n_pieces * n_pblocks * Hkv (prefix block fastest, then KV head, then
    piece): the partial dK/dV of one piece, and dprefix of its (task, block, KV head) when it
    arrives last. H is the query heads, Hkv = H // group_size.

    Items are (sequence row, query head in the group, query block), n_query_blocks * group_size
    per row, query block fastest. dPK, dPV: contiguous (T, P, Hkv, D) in the prefix's dtype.
    Workspaces (n_pieces, Hkv, P_pad, D) fp32; Counters (T, n_pblocks, Hkv) int32, zero at launch."""
    kv_heads = H // group_size
    pblock = pid % n_pblocks
    h_kv = ((pid // n_pblocks) % kv_heads).to(tl.int64)
    piece = pid // (n_pblocks * kv_heads)
    items_per_row = n_query_blocks * group_size
    task, item_lo, item_hi = task_piece_range(PIECE_TASK, TASK_PIECE_START, TASK_ROW_START, piece, items_per_row,
                                              items_per_piece, n_items, HAS_BANK)
    if task >= 0:
        n_prefix = P
        if HAS_PREFIX_LENS:
            n_prefix = tl.load(PREFIX_LENS + task).to(tl.int32)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        slots = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
        slot_ok = slots < n_prefix
        kv_mask = slot_ok[:, None] & d_ok[None, :]
        pk = tl.load(PK + task * stride_pkt + h_kv * stride_pkh + slots[:, None] * stride_pkp + offs_d[None, :] * stride_pkd,
                     mask=kv_mask, other=0.0)
        pv = tl.load(PV + task * stride_pvt + h_kv * stride_pvh + slots[:, None] * stride_pvp + offs_d[None, :] * stride_pvd,
                     mask=kv_mask, other=0.0)
        dpk = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
        dpv = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
        seed = 0
        drop_offset = 0
        if HAS_DROPOUT:
            seed = tl.load(RNG)
            drop_offset = tl.load(RNG + 1)

        for item in range(item_lo, item_hi):
            row = item // items_per_row
            h = h_kv * group_size + (item // n_query_blocks) % group_size
            if HAS_BANK:
                b = tl.load(ROW_ORDER + row).to(tl.int64)
            else:
                b = tl.cast(row, tl.int64)
            offs_m = (item % n_query_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Lq
            qd_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=qd_mask, other=0.0)
            do = tl.load(dOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                         + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
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

        ws_mask = (slots[:, None] < P_pad) & d_ok[None, :]
        tile = slots[:, None] * HEAD_DIM + offs_d[None, :]
        ws = (tl.cast(piece, tl.int64) * kv_heads + h_kv) * P_pad * HEAD_DIM + tile
        tl.store(dPK_ws + ws, dpk * softmax_scale, mask=ws_mask)
        tl.store(dPV_ws + ws, dpv, mask=ws_mask)

        # ---- last arrival reduces (see the module docstring for the memory ordering) ----
        if HAS_BANK:
            piece_lo = tl.load(TASK_PIECE_START + task)
            piece_hi = tl.load(TASK_PIECE_START + task + 1)
        else:
            piece_lo = 0
            piece_hi = n_pieces
        tl.debug_barrier()  # every thread's partial stores before the release below
        counter = Counters + (task * n_pblocks + pblock) * kv_heads + h_kv
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()  # every thread's loads below after the acquire above
        if arrived == piece_hi - piece_lo - 1:
            acc_k = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
            acc_v = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
            # Pieces in order, whichever arrived last. They are independent loads: pipeline them
            # (the loop is latency bound for small P).
            for other in tl.range(piece_lo, piece_hi, num_stages=3):
                ws = (tl.cast(other, tl.int64) * kv_heads + h_kv) * P_pad * HEAD_DIM + tile
                acc_k += tl.load(dPK_ws + ws, mask=ws_mask, other=0.0, cache_modifier=".cg")
                acc_v += tl.load(dPV_ws + ws, mask=ws_mask, other=0.0, cache_modifier=".cg")
            # dPK, dPV are the launcher's contiguous (T, P, Hkv, D) allocations.
            out = ((task * P + slots[:, None]) * kv_heads + h_kv) * HEAD_DIM + offs_d[None, :]
            out_mask = (slots[:, None] < P) & d_ok[None, :]
            tl.store(dPK + out, acc_k.to(dPK.dtype.element_ty), mask=out_mask)
            tl.store(dPV + out, acc_v.to(dPV.dtype.element_ty), mask=out_mask)
