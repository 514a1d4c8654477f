"""Every shipped GPU config, run once in Triton's interpreter against the float64 reference.

The rest of the CPU suite runs each kernel with its single 16 x 16 interpreter config, where
BLOCK_M == BLOCK_N and every tile size is the same: a bug that only shows with unequal or larger
tiles (a causal diagonal ending at BLOCK_N instead of BLOCK_M, a prefix tile of 32 or 64 slots, a
64-row prefix-gradient item, 64-row decode tiles, 256-key decode splits) would pass it. Here each
config of FWD_GPU_CONFIGS / BWD_GPU_CONFIGS is forced in turn (as tests/test_gpu.py's one_config
does on a GPU), together with the GPU values of the launchers' block constants, on shapes that
cross every block, ragged tail and causal diagonal of those tiles.
"""
import pytest
import torch

import prefix_attn.triton_launch as launch
from csrc_triton.attn_bwd import BWD_GPU_CONFIGS, bwd_kernel
from csrc_triton.attn_fwd import FWD_GPU_CONFIGS, prefix_attn_fwd_kernel
from csrc_triton.common import INTERPRET
from tests.helpers import Case, check_against_reference

pytestmark = pytest.mark.skipif(not INTERPRET, reason="interpreter runs (tests/test_gpu.py covers the GPU)")

# The launchers' block constants as they are on a GPU (the interpreter uses 16 for each).
GPU_PREFIX_BLOCKS = (16, 32, 64)  # _block_p: min(64, max(16, next_pow2(P)))
GPU_LAUNCH_CONSTANTS = dict(PREFIX_GRAD_BLOCK_M=64, PREPROCESS_BLOCK_M=128)
GPU_DECODE_CONSTANTS = dict(DECODE_BLOCK_R=64, DECODE_BLOCK_N=64, DECODE_MIN_SPLIT=256)


@pytest.fixture
def force(monkeypatch):
    """force(fwd_config, bwd_config, block_p, **launcher constants) for one test; restored after."""
    saved = [(k, k.configs, dict(k.cache)) for k in (prefix_attn_fwd_kernel, bwd_kernel)]

    def apply(fwd_config=None, bwd_config=None, block_p=None, **constants):
        for kernel, config in ((prefix_attn_fwd_kernel, fwd_config), (bwd_kernel, bwd_config)):
            if config is not None:
                kernel.configs = [config]
                kernel.cache.clear()
        if block_p is not None:
            monkeypatch.setattr(launch, "_block_p", lambda prefix_len: block_p)
        for name, value in constants.items():
            assert hasattr(launch, name), name
            monkeypatch.setattr(launch, name, value)
        # Plans hold the block constants they were built with: build new ones.
        monkeypatch.setattr(launch, "_BACKWARD_PLANS", {})
        monkeypatch.setattr(launch, "_FORWARD_PLANS", {})

    yield apply
    for kernel, configs, cache in saved:
        kernel.configs = configs
        kernel.cache.clear()
        kernel.cache.update(cache)


# Lq = 150 and Lk = 170 cross two 128-row/key tiles with ragged tails, and the causal diagonal
# (shift Lk - Lq = 20) crosses key-block boundaries inside 128-row query tiles; P = 70 crosses
# prefix tiles of 16, 32 and 64 slots; D varies (40 is not a power of two).
N_RUNS = max(len(FWD_GPU_CONFIGS), len(BWD_GPU_CONFIGS))
CASES = [
    Case(B=2, Lq=150, Lk=170, H=1, D=64, P=70, mask="left"),
    Case(B=2, Lq=150, Lk=170, H=1, D=40, P=70, T=2, prefix_lens=True),
    Case(B=2, Lq=150, Lk=150, H=1, D=32, P=70, mask="holes"),
    Case(B=1, Lq=150, Lk=170, H=2, D=64, P=70),
    Case(B=2, Lq=150, Lk=170, H=1, D=16, P=70, T=2, mask="right"),
    Case(B=2, Lq=150, Lk=170, H=1, D=48, P=70, causal=False),
    Case(B=2, Lq=150, Lk=170, H=1, D=64, P=70, T=2, prefix_lens=True, mask="left"),
]
assert len(CASES) == N_RUNS


@pytest.mark.parametrize("index", range(N_RUNS))
def test_every_gpu_config_in_the_interpreter(force, index):
    fwd = FWD_GPU_CONFIGS[index % len(FWD_GPU_CONFIGS)]
    bwd = BWD_GPU_CONFIGS[index % len(BWD_GPU_CONFIGS)]
    force(fwd, bwd, GPU_PREFIX_BLOCKS[index % len(GPU_PREFIX_BLOCKS)], **GPU_LAUNCH_CONSTANTS)
    case = CASES[index]
    check_against_reference(case, torch.float32, "triton", with_dlse=index % 2 == 0)
    # The forced configs are what ran (pruning keeps the only config left, whatever it prunes).
    assert prefix_attn_fwd_kernel.best_config.kwargs == fwd.kwargs
    assert bwd_kernel.best_config.kwargs == bwd.kwargs


def test_every_config_is_covered():
    """The runs above reach every config, both orders of BLOCK_M and BLOCK_N, and every prefix tile."""
    runs = range(N_RUNS)
    assert {i % len(FWD_GPU_CONFIGS) for i in runs} == set(range(len(FWD_GPU_CONFIGS)))
    assert {i % len(BWD_GPU_CONFIGS) for i in runs} == set(range(len(BWD_GPU_CONFIGS)))
    assert {GPU_PREFIX_BLOCKS[i % 3] for i in runs} == set(GPU_PREFIX_BLOCKS)
    assert any(c.kwargs["BLOCK_M"] > c.kwargs["BLOCK_N"] for c in FWD_GPU_CONFIGS)
    assert any(c.kwargs["BLOCK_M2"] > c.kwargs["BLOCK_N2"] for c in BWD_GPU_CONFIGS)
    assert any(c.kwargs["BLOCK_M1"] < c.kwargs["BLOCK_N1"] for c in BWD_GPU_CONFIGS)
    for c in [*FWD_GPU_CONFIGS, *BWD_GPU_CONFIGS]:  # every tile is crossed (two blocks or more) by Lq and Lk
        assert all(min(case.Lq, case.Lk) > max(c.kwargs.values()) for case in CASES if case.causal)


# Decode: B * Lq = 80 stacked rows cross a 64-row tile (tiles of 4 sequences of 16 rows, and of 21
# sequences of 3 rows: 63 rows, a ragged tile); P = 300 and Lk = 300 are cut into two 256-key splits
# made of 64-key blocks (B * H is small, so the splits are wanted), merged by the last arrival.
DECODE_CASES = [
    Case(B=5, Lq=16, Lk=300, H=1, D=64, P=300, mask="left"),
    Case(B=5, Lq=3, Lk=300, H=1, D=32, P=300, T=2, prefix_lens=True),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_gpu_constants_in_the_interpreter(force, monkeypatch, case):
    force(block_p=64, **GPU_LAUNCH_CONSTANTS, **GPU_DECODE_CONSTANTS)
    plans = []
    real = launch._decode_plan

    def spy(*args):
        plans.append(real(*args))
        return plans[-1]

    monkeypatch.setattr(launch, "_decode_plan", spy)
    check_against_reference(case, torch.float32, "triton")
    # The decode path ran with 64-row tiles, the prefix and the keys each cut into two splits of
    # 64-key blocks.
    assert plans and all(plan.constexprs["BLOCK_R"] == 64 and plan.constexprs["BLOCK_N"] == 64 for plan in plans)
    plan = plans[0]
    slots_per_split, keys_per_split = plan.sizes[12], plan.sizes[14]  # after out's strides, B, H, Lq, Lk, P, ...
    assert (plan.n_psplits, plan.n_ssplits) == (2, 2), plan
    assert slots_per_split % 64 == 0 and keys_per_split % 64 == 0
    assert plan.seqs_per_tile == 64 // case.Lq
