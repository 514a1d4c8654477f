"""Compile every kernel and shipped config for real GPU targets, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` runs the whole NVIDIA
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) on a machine with no GPU; cuobjdump on the cubin
reports registers, shared memory and local memory (spills). Used by tests/test_gpu_compile.py and
runnable as a script: ``python -m tests.gpu_compile`` prints the resource table.
"""
import dataclasses
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from csrc_triton.attn_bwd import BWD_GPU_CONFIGS, bwd_preprocess_kernel, bwd_seq_kernel
from csrc_triton.attn_fwd import FWD_GPU_CONFIGS, prefix_attn_fwd_kernel
from csrc_triton.dropout_mask import dropout_mask_kernel
from csrc_triton.prefix_grad import prefix_grad_partial_kernel, prefix_grad_reduce_kernel

INT_ARGS = {"H", "Lq", "Lk", "P", "P_pad", "TUNE_LQ", "TUNE_LK", "drop_groups_per_row", "keep_threshold",
            "n_query_blocks", "items_per_piece", "n_items", "n_pieces", "n_rows", "n_cols_prefix", "n_cols_seq"}
DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


@dataclasses.dataclass
class CompiledKernel:
    name: str
    cap: int
    variant: str
    ptx: str
    regs: int
    shared: int
    local: int  # bytes of local memory per thread: spills

    @property
    def uses_wgmma(self) -> bool:
        return "wgmma.mma_async" in self.ptx

    @property
    def uses_mma(self) -> bool:
        return "mma.sync" in self.ptx or self.uses_wgmma


def _jit_fn(kernel):
    return kernel.fn if isinstance(kernel, Autotuner) else kernel  # autotuned kernels wrap the JITFunction


def _signature(fn, types, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types(name)
    return sig


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resource_usage(cubin: bytes) -> tuple[int, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    shared = int(re.search(r"SHARED:(\d+)", text).group(1))
    local = int(re.search(r"LOCAL:(\d+)", text).group(1))
    return regs, shared, local


def compile_kernel(kernel, name, cap, types, constexprs, num_warps=4, num_stages=3, variant=""):
    fn = _jit_fn(kernel)
    src = ASTSource(fn=fn, signature=_signature(fn, types, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    regs, shared_static, local = resource_usage(compiled.asm["cubin"])
    shared = max(shared_static, compiled.metadata.shared)
    return CompiledKernel(name, cap, variant, compiled.asm["ptx"], regs, shared, local)


def _attn_types(dtype):
    ptr = DTYPES[dtype]

    def types(name):
        if name in ("PREFIX_IDX", "PREFIX_LENS", "RNG", "ROW_ORDER", "TASK_ROW_START", "TASK_PIECE_START",
                    "PIECE_TASK"):
            return "*i64"
        if name == "KEY_MASK":
            return "*u8"
        if name in ("Lse", "LseLog2", "Delta", "dLse", "dPK_ws", "dPV_ws"):
            return "*fp32"
        if name in ("qk_scale", "softmax_scale", "dropout_scale"):
            return "fp32"
        if name.startswith("stride_") or name in INT_ARGS:
            return "i32"
        return ptr

    return types


def _attn_constexprs(head_dim, block_p, dropout, bank, causal=True, key_mask=True):
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_P=block_p, HAS_PREFIX=True, HAS_BANK=bank,
                HAS_PREFIX_LENS=bank, HAS_KEY_MASK=key_mask, CAUSAL=causal, HAS_DROPOUT=dropout,
                DOT_PRECISION="ieee")


def compile_all(caps=(80, 90), dtypes=("fp16", "bf16"), head_dims=(64, 128, 80)):
    """Every kernel and every shipped config, for each target, dtype and head dim.

    Variants: fp16/bf16 x head dims x configs for the hot kernels (no dropout, shared prefix, the
    training case) plus one variant with dropout, bank and prefix_lens per target.
    """
    results = []
    for cap in caps:
        for dtype in dtypes:
            types = _attn_types(dtype)
            for head_dim in head_dims:
                cx = _attn_constexprs(head_dim, 16, dropout=False, bank=False)
                for i, cfg in enumerate(FWD_GPU_CONFIGS):
                    results.append(compile_kernel(
                        prefix_attn_fwd_kernel, "fwd", cap, types, {**cx, **cfg.kwargs}, cfg.num_warps,
                        cfg.num_stages, f"{dtype} d{head_dim} cfg{i}"))
                for i, cfg in enumerate(BWD_GPU_CONFIGS):
                    results.append(compile_kernel(
                        bwd_seq_kernel, "bwd_seq", cap, types, {**cx, **cfg.kwargs}, cfg.num_warps,
                        cfg.num_stages, f"{dtype} d{head_dim} cfg{i}"))
                block_d = cx["BLOCK_D"]
                results.append(compile_kernel(
                    prefix_grad_partial_kernel, "prefix_grad_partial", cap, types,
                    dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_P=64, BLOCK_M=64, HAS_BANK=False,
                         HAS_PREFIX_LENS=False, HAS_DROPOUT=False, DOT_PRECISION="ieee"),
                    variant=f"{dtype} d{head_dim}"))
            # Rare features: dropout, bank, prefix_lens, one config each.
            cx = _attn_constexprs(64, 64, dropout=True, bank=True)
            fcfg, bcfg = FWD_GPU_CONFIGS[0], BWD_GPU_CONFIGS[0]
            results.append(compile_kernel(prefix_attn_fwd_kernel, "fwd", cap, types, {**cx, **fcfg.kwargs},
                                          fcfg.num_warps, fcfg.num_stages, f"{dtype} d64 dropout+bank"))
            results.append(compile_kernel(bwd_seq_kernel, "bwd_seq", cap, types, {**cx, **bcfg.kwargs},
                                          bcfg.num_warps, bcfg.num_stages, f"{dtype} d64 dropout+bank"))
            results.append(compile_kernel(
                prefix_grad_partial_kernel, "prefix_grad_partial", cap, types,
                dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_P=16, BLOCK_M=64, HAS_BANK=True, HAS_PREFIX_LENS=True,
                     HAS_DROPOUT=True, DOT_PRECISION="ieee"), variant=f"{dtype} d64 dropout+bank"))
            results.append(compile_kernel(
                prefix_grad_reduce_kernel, "prefix_grad_reduce", cap, types,
                dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_P=64, HAS_BANK=True), variant=dtype))
            results.append(compile_kernel(
                bwd_preprocess_kernel, "bwd_preprocess", cap, types,
                dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=128, HAS_DLSE=True), variant=dtype))
        results.append(compile_kernel(
            dropout_mask_kernel, "dropout_mask", cap, _attn_types("fp32"),
            dict(BLOCK_M=16, BLOCK_N=64), variant=""))
    return results


def format_table(results) -> str:
    lines = [f"{'kernel':<22}{'sm':>4}  {'variant':<28}{'regs':>6}{'shared':>9}{'spill B':>9}  tensor cores"]
    for r in results:
        tc = "wgmma" if r.uses_wgmma else ("mma.sync" if r.uses_mma else "-")
        lines.append(f"{r.name:<22}{r.cap:>4}  {r.variant:<28}{r.regs:>6}{r.shared:>9}{r.local:>9}  {tc}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(compile_all()))
