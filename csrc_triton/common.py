"""Jitted helpers shared by the attention kernels, and the interpreter switch for configs."""
import os

import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 the kernels run on CPU tensors one program at a time: autotuning is
# meaningless there, so every kernel collapses to one small config (which also makes tiny test
# shapes span several blocks and ragged tails).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = 1.4426950408889634  # host side: the launchers fold it into the softmax scale
LOG2E_C = tl.constexpr(LOG2E)  # kernel side
LN2_C = tl.constexpr(0.6931471805599453)


# PREFIX_ATTN_AUTOTUNE=0 skips autotuning and runs each kernel's first (default) config: the
# tests set it, since tuning every test shape would cost minutes of compilation.
AUTOTUNE = os.environ.get("PREFIX_ATTN_AUTOTUNE", "1") != "0"


def pick_configs(gpu_configs, interpreter_config):
    """The named config list for a GPU, or the single config the interpreter runs."""
    return [interpreter_config] if INTERPRET else list(gpu_configs)


def tuning_prune(prune):
    """Wrap a config pruning function: with autotuning off, keep only the first surviving config
    (the configs are listed best-first for each case the pruning distinguishes)."""

    def pruned(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs) or list(configs[:1])
        return kept if AUTOTUNE else kept[:1]

    return pruned


def launch_arg(named_args, kwargs, name):
    """An argument of a launch, given positionally or by keyword."""
    return kwargs[name] if name in kwargs else named_args[name]


def device_capability(tensor) -> int:
    """Compute capability (e.g. 90) of the GPU holding ``tensor``; 0 off CUDA."""
    import torch

    if not tensor.is_cuda:
        return 0
    major, minor = torch.cuda.get_device_capability(tensor.device)
    return 10 * major + minor


# Attention dropout draws 16-bit decisions, eight per Philox4x32-10 call (two per output word):
# columns are taken in groups of 8, so tile starts must be multiples of 8.


@triton.jit
def dropout_keep_tile(seed, row_counter, col_start, keep_threshold, BLOCK_N: tl.constexpr):
    """Keep-mask (rows, BLOCK_N) of attention dropout.

    Columns [col_start, col_start + BLOCK_N) of each row, col_start a multiple of 8: column c draws
    Philox4x32-10 (``tl.randint4x``, key ``seed``) at counter ``row_counter[row] + c // 8`` and
    takes the 16-bit half ``c % 8`` of the four output words in the order built below; it is kept
    when that value is >= keep_threshold (= round(dropout_p * 65536)). prefix_attn.dropout mirrors
    this bit for bit in PyTorch.
    """
    BLOCK_M: tl.constexpr = row_counter.shape[0]
    groups = col_start // 8 + tl.arange(0, BLOCK_N // 8)
    r0, r1, r2, r3 = tl.randint4x(seed, row_counter[:, None] + groups[None, :])
    w01 = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))
    w23 = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))
    bits = tl.reshape(tl.join(w01, w23), (BLOCK_M, BLOCK_N))
    return bits.to(tl.int32) >= keep_threshold


@triton.jit
def locate_prefix(PK, PV, PREFIX_IDX, PREFIX_LENS, b, h, P,
                  stride_pkt, stride_pkh, stride_pvt, stride_pvh,
                  HAS_BANK: tl.constexpr, HAS_PREFIX_LENS: tl.constexpr):
    """(K, V pointers of the prefix sequence ``b`` uses at head ``h``, its number of slots)."""
    task = 0
    if HAS_BANK:
        task = tl.load(PREFIX_IDX + b).to(tl.int64)
    n_prefix = P
    if HAS_PREFIX_LENS:
        n_prefix = tl.load(PREFIX_LENS + task).to(tl.int32)
    return PK + task * stride_pkt + h * stride_pkh, PV + task * stride_pvt + h * stride_pvh, n_prefix


@triton.jit
def key_stage_bounds(first_query_pos, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(full_end, diag_end) of a query tile whose first row sits at key position first_query_pos:
    key blocks [0, full_end) are visible to every row (no causal mask), [full_end, diag_end) need it."""
    if CAUSAL:
        full_end = tl.minimum(first_query_pos + 1, Lk) // BLOCK_N * BLOCK_N
        diag_end = tl.minimum(first_query_pos + BLOCK_M, Lk)
    else:
        full_end = Lk // BLOCK_N * BLOCK_N
        diag_end = Lk
    return full_end, diag_end


@triton.jit
def key_visibility(cols, n_keys, query_pos, key_valid_ptr, stride_valid_n, BLOCK_N: tl.constexpr,
                   CHECK_BOUNDS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """Which of the keys ``cols`` (BLOCK_N,) each query sees: (1 or rows, BLOCK_N) int1.

    CHECK_BOUNDS hides keys >= n_keys (a ragged tail), HAS_KEY_MASK reads the per-key padding mask
    (never past n_keys), CAUSAL hides key j > query_pos[i]. Shared by forward, backward and decode.
    """
    visible = tl.full((1, BLOCK_N), 1, tl.int1)
    if CHECK_BOUNDS:
        visible = visible & (cols[None, :] < n_keys)
    if HAS_KEY_MASK:
        key_ok = tl.load(key_valid_ptr + cols * stride_valid_n, mask=cols < n_keys, other=0)
        visible = visible & (key_ok[None, :] != 0)
    if CAUSAL:
        visible = visible & (cols[None, :] <= query_pos[:, None])
    return visible


@triton.jit
def online_softmax_step(qk, m_i, l_i):
    """One key block of the online softmax (log2 domain): (p, alpha, l_new, m_new) for the block's
    scores qk (rows, keys), the running row max m_i and sum l_i. The caller rescales its
    accumulator by alpha and adds p @ V."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so that exp2 gives
    # 0 rather than NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def task_piece_range(PIECE_TASK, TASK_PIECE_START, TASK_ROW_START, piece, units_per_row, units_per_piece,
                     n_units, HAS_BANK: tl.constexpr):
    """(task, unit_lo, unit_hi) of one piece of the work plan of prefix_attn.triton_launch._task_pieces:
    units are ``units_per_row`` per sequence, sequences taken in task order, and a piece never
    spans two tasks. task is -1 for an unused piece of a bank plan (the caller returns)."""
    if HAS_BANK:
        task = tl.load(PIECE_TASK + piece).to(tl.int64)
        local = piece - tl.load(TASK_PIECE_START + tl.maximum(task, 0))
        lo = tl.load(TASK_ROW_START + tl.maximum(task, 0)) * units_per_row + local * units_per_piece
        hi = tl.minimum(lo + units_per_piece, tl.load(TASK_ROW_START + tl.maximum(task, 0) + 1) * units_per_row)
    else:
        task = 0
        lo = piece * units_per_piece
        hi = tl.minimum(lo + units_per_piece, n_units)
    return task, lo, hi
