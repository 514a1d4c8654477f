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

from csrc_triton.attn_bwd import BWD_GPU_CONFIGS, bwd_kernel, bwd_preprocess_kernel
from csrc_triton.attn_fwd import FWD_GPU_CONFIGS, prefix_attn_fwd_kernel
from csrc_triton.decode import DECODE_GPU_CONFIG, decode_kernel
from csrc_triton.dropout_mask import dropout_mask_kernel

INT_ARGS = {"B", "H", "Lq", "Lk", "P", "P_pad", "TUNE_LQ", "TUNE_LK", "drop_groups_per_row", "keep_threshold",
            "n_query_blocks", "items_per_piece", "n_items", "n_pieces", "n_rows", "n_cols_prefix", "n_cols_seq",
            "slots_per_split", "keys_per_split", "first_part", "n_parts", "n_rows", "ws_size", "n_counters",
            "n_pblocks", "n_prefix_query_blocks", "seqs_per_tile", "n_tiles", "n_psplits", "n_ssplits", "group_size",
            "heads_per_chunk"}
DEFAULT_MARK = " (default)"  # the config a launch uses without autotuning
DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


@dataclasses.dataclass
class CompiledKernel:
    name: str
    cap: int
    variant: str
    ptx: str
    regs: int
    shared: int
    stack: int  # bytes of stack frame per thread: where ptxas spills registers
    local_ops: int  # local-memory loads/stores (LDL/STL) in the SASS: spill traffic

    @property
    def uses_wgmma(self) -> bool:
        return "wgmma.mma_async" in self.ptx

    @property
    def uses_mma(self) -> bool:
        return "mma.sync" in self.ptx or self.uses_wgmma


def _jit_fn(kernel):
    return kernel.fn if isinstance(kernel, Autotuner) else kernel  # autotuned kernels wrap the JITFunction


def _is_unit_stride(name):
    # The last (head_dim) stride of every tensor, and the key-mask stride, are 1 in practice: a
    # launch then specializes them to the constant 1, as this check does.
    return name.startswith("stride_") and (name.endswith("d") or name == "stride_maskn")


def _signature(fn, types, constexprs):
    """Signature, constexprs and attributes as a real launch specializes them: unit strides become
    constants, pointers and the other strides carry 16-divisibility (contiguous (B, L, H, D)
    tensors with H * D a multiple of 16, and torch's 16-byte aligned allocations)."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif _is_unit_stride(name):
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = types(name)
            if sig[name].startswith("*") or name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resource_usage(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, static shared bytes, stack bytes, LDL/STL count) of a cubin, from cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
        sass = subprocess.run([_cuobjdump(), "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    shared = int(re.search(r"SHARED:(\d+)", text).group(1))
    stack = int(re.search(r"STACK:(\d+)", text).group(1))
    local_ops = len(re.findall(r"\b(?:LDL|STL)\b", sass))
    return regs, shared, stack, local_ops


def compile_kernel(kernel, name, cap, types, constexprs, num_warps=4, num_stages=3, variant=""):
    fn = _jit_fn(kernel)
    signature, consts, attrs = _signature(fn, types, constexprs)
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    regs, shared_static, stack, local_ops = resource_usage(compiled.asm["cubin"])
    shared = max(shared_static, compiled.metadata.shared)
    return CompiledKernel(name, cap, variant, compiled.asm["ptx"], regs, shared, stack, local_ops)


def _attn_types(dtype):
    ptr = DTYPES[dtype]

    def types(name):
        if name in ("PREFIX_IDX", "PREFIX_LENS", "RNG", "ROW_ORDER", "TASK_ROW_START", "TASK_PIECE_START",
                    "PIECE_TASK", "TASK_TILE_START", "TILE_TASK"):
            return "*i64"
        if name == "KEY_MASK":
            return "*u8"
        if name == "Arrivals":
            return "*i32"
        if name in ("Lse", "LseLog2", "Delta", "dLse", "dPK_ws", "dPV_ws", "OutPart", "LsePart", "Scratch", "Work"):
            return "*fp32"
        if name in ("qk_scale", "softmax_scale", "dropout_scale"):
            return "fp32"
        if name.startswith("stride_") or name in INT_ARGS:
            return "i32"
        return ptr

    return types


def _attn_constexprs(head_dim, block_p, dropout, bank, causal=True, key_mask=True, grouped=False):
    """The forward/backward constexprs. Equal heads: a launch passes group_size = 1, which Triton
    specialises to the constant 1 (the group loops fold away); grouped heads (GQA/MQA) pass
    group_size >= 2 as an ordinary i32 argument (grouped=True)."""
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    cx = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_P=block_p, HAS_PREFIX=True, HAS_BANK=bank,
              HAS_PREFIX_LENS=bank, HAS_KEY_MASK=key_mask, CAUSAL=causal, HAS_DROPOUT=dropout,
              DOT_PRECISION="ieee")
    return cx if grouped else dict(cx, group_size=1)


def _bwd_constexprs(cx):
    """The backward kernel's constexprs: the attention ones and the prefix-gradient item rows
    (prefix_attn.triton_launch.PREFIX_GRAD_BLOCK_M on a GPU)."""
    return dict(cx, BLOCK_MP=64)


KERNELS = {
    "fwd": prefix_attn_fwd_kernel, "bwd": bwd_kernel, "bwd_preprocess": bwd_preprocess_kernel,
    "dropout_mask": dropout_mask_kernel, "decode": decode_kernel,
}


def compile_specs(caps=(80, 90)):
    """(kernel, cap, dtype, constexprs, num_warps, num_stages, variant) of every compile to check.

    Every shipped config of the attention kernels that autotuning may pick at head dims 64 and 128
    (fp16), one config per head dim 40/80/96 and per bf16, and the features that change code
    (dropout, bank, prefix_lens) once per target and dtype.
    """
    from csrc_triton.attn_bwd import bwd_configs_for
    from csrc_triton.attn_fwd import fwd_configs_for

    specs = []
    for cap in caps:  # the first config of each list is the default (untuned) one: variant "default"
        for head_dim in (64, 128, 40, 80, 96):
            dtypes = ("fp16", "bf16") if head_dim == 64 else ("fp16",)
            all_configs = head_dim in (64, 128)
            for dtype in dtypes:
                cx = _attn_constexprs(head_dim, 16, dropout=False, bank=False)
                fwd = fwd_configs_for(FWD_GPU_CONFIGS, 1024, cx["BLOCK_D"])
                bwd = bwd_configs_for(BWD_GPU_CONFIGS, cx["BLOCK_D"], cap)
                if not (all_configs and dtype == "fp16"):
                    fwd, bwd = fwd[:1], bwd[:1]
                for i, cfg in enumerate(fwd):
                    specs.append(("fwd", cap, dtype, {**cx, **cfg.kwargs}, cfg.num_warps, cfg.num_stages,
                                  f"{dtype} d{head_dim} {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} "
                                  f"w{cfg.num_warps}s{cfg.num_stages}{DEFAULT_MARK if i == 0 else ''}"))
                for i, cfg in enumerate(bwd):
                    k = cfg.kwargs
                    specs.append(("bwd", cap, dtype, {**_bwd_constexprs(cx), **k}, cfg.num_warps, cfg.num_stages,
                                  f"{dtype} d{head_dim} {k['BLOCK_M1']}x{k['BLOCK_N1']}/{k['BLOCK_M2']}x{k['BLOCK_N2']} "
                                  f"w{cfg.num_warps}s{cfg.num_stages}{DEFAULT_MARK if i == 0 else ''}"))
                # The prefix-gradient programs at the largest prefix tile (the 16-slot one is above).
                cfg = bwd[0]
                specs.append(("bwd", cap, dtype, {**_bwd_constexprs(_attn_constexprs(head_dim, 64, False, False)),
                                                  **cfg.kwargs}, cfg.num_warps, cfg.num_stages,
                              f"{dtype} d{head_dim} P-tile 64{DEFAULT_MARK}"))
        for dtype in ("fp16", "bf16"):
            cx = _attn_constexprs(64, 64, dropout=True, bank=True)
            fcfg, bcfg = FWD_GPU_CONFIGS[0], BWD_GPU_CONFIGS[0]
            specs.append(("fwd", cap, dtype, {**cx, **fcfg.kwargs}, fcfg.num_warps, fcfg.num_stages,
                          f"{dtype} d64 dropout+bank+lens"))
            specs.append(("bwd", cap, dtype, {**_bwd_constexprs(cx), **bcfg.kwargs}, bcfg.num_warps,
                          bcfg.num_stages, f"{dtype} d64 dropout+bank+lens"))
            # Grouped heads (group_size an i32): the default configs at head dims 64 and 128 (Llama's),
            # with and without the features that change code.
            for head_dim in (64, 128):
                for features in (dict(dropout=False, bank=False), dict(dropout=True, bank=True)):
                    gcx = _attn_constexprs(head_dim, 16 if head_dim == 128 else 64, grouped=True, **features)
                    fcfg = fwd_configs_for(FWD_GPU_CONFIGS, 1024, gcx["BLOCK_D"])[0]
                    bcfg = bwd_configs_for(BWD_GPU_CONFIGS, gcx["BLOCK_D"], cap)[0]
                    what = "dropout+bank+lens" if features["dropout"] else "plain"
                    specs.append(("fwd", cap, dtype, {**gcx, **fcfg.kwargs}, fcfg.num_warps, fcfg.num_stages,
                                  f"{dtype} d{head_dim} GQA {what}{DEFAULT_MARK}"))
                    specs.append(("bwd", cap, dtype, {**_bwd_constexprs(gcx), **bcfg.kwargs}, bcfg.num_warps,
                                  bcfg.num_stages, f"{dtype} d{head_dim} GQA {what}{DEFAULT_MARK}"))
            specs.append(("bwd_preprocess", cap, dtype, dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=128, HAS_DLSE=True),
                          4, 3, dtype))
        specs.append(("dropout_mask", cap, "fp32", dict(BLOCK_M=16, BLOCK_N=64), 4, 3, ""))
        for dtype in ("fp16", "bf16"):
            for head_dim in (64, 128):
                block_d = max(16, 1 << (head_dim - 1).bit_length())
                # a shared prefix (the default launch of GPT-2 decoding), a bank with lengths and a
                # key mask, no prefix at all (absent tensors passed as the integer 0), and grouped
                # heads whose sequence programs stack 64 rows (Lq * query heads of a group)
                for kind, prefix, bank, mask, block_m in (
                        ("shared", True, False, False, 16), ("bank+lens+mask", True, True, True, 16),
                        ("no prefix", False, False, True, 16), ("grouped heads, 64-row", True, True, True, 64)):
                    cx = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=64, BLOCK_M=block_m, BLOCK_N=64,
                              HAS_PREFIX=prefix, HAS_BANK=bank, HAS_PREFIX_LENS=bank, HAS_KEY_MASK=mask, CAUSAL=True,
                              DOT_PRECISION="ieee")
                    specs.append(("decode", cap, dtype, cx, DECODE_GPU_CONFIG.num_warps, DECODE_GPU_CONFIG.num_stages,
                                  f"{dtype} d{head_dim} {kind}{DEFAULT_MARK if kind == 'shared' else ''}"))
    return specs


def _decode_types(dtype, constexprs):
    """The decode launcher passes absent optional tensors as the integer 0 (see decode_forward)."""
    types = _attn_types(dtype)
    absent = set()
    if not constexprs["HAS_PREFIX"]:
        absent |= {"PK", "PV"}
    if not constexprs["HAS_BANK"]:
        absent |= {"PREFIX_IDX", "ROW_ORDER", "TASK_ROW_START", "TASK_TILE_START", "TILE_TASK"}
    if not constexprs["HAS_PREFIX_LENS"]:
        absent.add("PREFIX_LENS")
    if not constexprs["HAS_KEY_MASK"]:
        absent.add("KEY_MASK")
    return lambda name: "i32" if name in absent else types(name)


def _compile_spec(spec):
    name, cap, dtype, constexprs, num_warps, num_stages, variant = spec
    types = _decode_types(dtype, constexprs) if name == "decode" else _attn_types(dtype)
    return compile_kernel(KERNELS[name], name, cap, types, constexprs, num_warps, num_stages, variant)


def compile_all(caps=(80, 90), jobs=1):
    """Compile every spec of compile_specs(), in ``jobs`` processes."""
    specs = compile_specs(caps)
    if jobs <= 1:
        return [_compile_spec(s) for s in specs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_spec, specs))


def format_table(results) -> str:
    lines = [f"{'kernel':<22}{'sm':>4}  {'variant':<46}{'regs':>6}{'shared':>9}{'stack B':>9}{'LDL/STL':>9}"
             "  tensor cores"]
    for r in results:
        tc = "wgmma" if r.uses_wgmma else ("mma.sync" if r.uses_mma else "-")
        lines.append(f"{r.name:<22}{r.cap:>4}  {r.variant:<46}{r.regs:>6}{r.shared:>9}{r.stack:>9}{r.local_ops:>9}"
                     f"  {tc}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(compile_all(jobs=os.cpu_count() or 1)))
