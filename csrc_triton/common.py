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
    if INTERPRET:
        return [interpreter_config]
    return list(gpu_configs) if AUTOTUNE else list(gpu_configs[:1])


@triton.jit
def dropout_keep_tile(seed, row_counter, col_start, keep_threshold, BLOCK_N: tl.constexpr):
    """Keep-mask (rows, BLOCK_N) of attention dropout.

    Element (row, col) draws Philox4x32-10 at counter ``row_counter[row] + col // 4`` and takes
    output ``col % 4`` of the four; it is kept when its top 31 bits are >= keep_threshold
    (= floor(dropout_p * 2**31)). ``col_start`` must be a multiple of 4. prefix_attn.dropout
    mirrors this bit for bit in PyTorch.
    """
    BLOCK_M: tl.constexpr = row_counter.shape[0]
    groups = col_start // 4 + tl.arange(0, BLOCK_N // 4)
    counter = row_counter[:, None] + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    # (M, N/4, 2, 2) -> (M, N): column 4g + 2a + b takes output 2a + b.
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return (bits >> 1).to(tl.int32) >= keep_threshold
