"""Debug kernel: writes the attention-dropout keep-mask exactly as the attention kernels draw it."""
import triton
import triton.language as tl

from csrc_triton.common import dropout_keep_tile


@triton.jit
def dropout_mask_kernel(
    RNG, Mask, n_rows, n_cols_prefix, n_cols_seq, drop_groups_per_row, keep_threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(n_rows, BLOCK_M), cdiv(P8 + Lk, BLOCK_N)); Mask is (n_rows, P + Lk) int8.

    Rows are (b, h, i) flattened; column c < P8 is prefix slot c, c >= P8 is key c - P8, where
    P8 is P rounded up to a multiple of 8 (the kernels' dropout column layout).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_start = tl.program_id(1) * BLOCK_N
    cols = col_start + tl.arange(0, BLOCK_N)
    row_counter = tl.load(RNG + 1) + rows.to(tl.int64) * drop_groups_per_row
    keep = dropout_keep_tile(tl.load(RNG), row_counter, col_start, keep_threshold, BLOCK_N)
    seq_col_base = (n_cols_prefix + 7) // 8 * 8
    out_col = tl.where(cols < seq_col_base, cols, cols - seq_col_base + n_cols_prefix)
    col_ok = (cols < n_cols_prefix) | ((cols >= seq_col_base) & (cols - seq_col_base < n_cols_seq))
    tl.store(Mask + rows[:, None].to(tl.int64) * (n_cols_prefix + n_cols_seq) + out_col[None, :],
             keep.to(tl.int8), mask=(rows[:, None] < n_rows) & col_ok[None, :])
