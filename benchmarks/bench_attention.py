"""Op-level benchmark: the fused prefix attention against the concat baselines.

Sweeps over L, P, B and heads in GPT-2 shapes (D = 64, bf16 on GPU) and in Llama shapes (grouped KV
heads: H = 32, Hkv = 8, D = 128, as Llama-3 8B); modes fwd, bwd, fwd+bwd; median (p20, p80) ms,
TFLOP/s of useful work and peak memory per provider.
"""
import dataclasses
from typing import Iterator

import torch

from benchmarks.measure import host_us_per_call, kernel_time_ms, on_gpu, peak_memory_mb, time_ms
from benchmarks.providers import PROVIDERS, unavailable_reason

MODES = ("fwd", "bwd", "fwd+bwd")
# FLOPs of the backward relative to the forward: 5 matmuls against 2.
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


@dataclasses.dataclass(frozen=True)
class AttnShape:
    B: int
    H: int
    L: int
    P: int
    D: int = 64
    Hkv: int = 0  # KV heads (grouped heads); 0 (the default) becomes H: as many as the query heads

    def __post_init__(self):
        if not self.Hkv:
            object.__setattr__(self, "Hkv", self.H)

    @property
    def kv_heads(self) -> int:
        return self.Hkv

    def visible_pairs(self) -> int:
        """Query-key pairs a causal call computes usefully: every prefix slot plus keys <= i."""
        return self.L * self.P + self.L * (self.L + 1) // 2

    def flops(self, mode: str) -> float:
        return 4.0 * self.B * self.H * self.D * self.visible_pairs() * MODE_FLOP_FACTOR[mode]


def sweeps(quick: bool, device) -> dict[str, list[AttnShape]]:
    """Named sweeps of shapes; each becomes one plot."""
    if not on_gpu(device):  # small enough for a 2-core CPU in a few minutes
        return {
            "attn_vs_P": [AttnShape(2, 4, 128, P) for P in (0, 16, 64)],
            "attn_vs_L": [AttnShape(2, 4, L, 16) for L in ((64, 128) if quick else (64, 128, 256))],
            "attn_gqa_vs_P": [AttnShape(2, 4, 128, P, D=32, Hkv=2) for P in (16, 64)],
        }
    if quick:
        return {
            "attn_vs_P": [AttnShape(8, 12, 1024, P) for P in (0, 10, 64, 256)],
            "attn_vs_L": [AttnShape(8, 12, L, 10) for L in (512, 1024, 2048)],
            "attn_llama_vs_P": [AttnShape(4, 32, 2048, P, D=128, Hkv=8) for P in (10, 128)],
        }
    return {
        "attn_vs_P": [AttnShape(8, 12, 1024, P) for P in (0, 10, 32, 64, 128, 256)],
        "attn_vs_L": [AttnShape(8, 12, L, 10) for L in (512, 1024, 2048)],
        "attn_vs_B": [AttnShape(B, 12, 512, 64) for B in (8, 16, 32)],
        "attn_H25_vs_P": [AttnShape(8, 25, 1024, P) for P in (10, 200)],
        "attn_llama_vs_P": [AttnShape(4, 32, 2048, P, D=128, Hkv=8) for P in (10, 32, 128, 512)],
        "attn_llama_vs_L": [AttnShape(4, 32, L, 32, D=128, Hkv=8) for L in (1024, 4096)],
    }


def _inputs(shape: AttnShape, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(True)

    q = rand(shape.B, shape.L, shape.H, shape.D)
    k, v = (rand(shape.B, shape.L, shape.kv_heads, shape.D) for _ in range(2))
    pk = pv = None
    if shape.P:
        pk, pv = rand(shape.P, shape.kv_heads, shape.D), rand(shape.P, shape.kv_heads, shape.D)
    return q, k, v, pk, pv


def run(quick: bool, device, providers=None, dtype=None) -> Iterator[dict]:
    """Yield one record per (sweep, shape, provider, mode); skipped providers yield a record with
    'skipped' set to the reason."""
    dtype = dtype or (torch.bfloat16 if on_gpu(device) else torch.float32)
    providers = providers or list(PROVIDERS)
    for sweep, shapes in sweeps(quick, device).items():
        for shape in shapes:
            inputs = _inputs(shape, dtype, device)
            grads_of = [t for t in inputs if t is not None]
            dout = torch.randn_like(inputs[0])
            for name in providers:
                base = dict(bench=sweep, provider=name, dtype=str(dtype).replace("torch.", ""),
                            **dataclasses.asdict(shape))
                reason = unavailable_reason(name, device)
                if reason:
                    yield {**base, "mode": "all", "skipped": reason}
                    continue
                fn = PROVIDERS[name]
                try:
                    yield from _measure(fn, inputs, dout, grads_of, shape, device, base)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    yield {**base, "mode": "all", "skipped": "out of memory"}


def _measure(fn, inputs, dout, grads_of, shape, device, base):
    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def fwd_bwd():
        fn(*inputs).backward(dout)

    out = fn(*inputs)

    def bwd():
        out.backward(dout, retain_graph=True)

    closures = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
    for mode in MODES:
        ms = time_ms(closures[mode], device, grad_to_none=grads_of)
        mem = peak_memory_mb(closures[mode], device) if mode != "bwd" else float("nan")
        kernel_ms, per_kernel = kernel_time_ms(closures[mode], device, grad_to_none=grads_of)
        yield {**base, "mode": mode, "ms_p50": ms[0], "ms_p20": ms[1], "ms_p80": ms[2],
               "tflops": shape.flops(mode) / ms[0] / 1e9, "peak_mem_mb": mem,
               "kernel_ms": kernel_ms, "kernel_tflops": shape.flops(mode) / kernel_ms / 1e9,
               "host_us": host_us_per_call(closures[mode], device, calls=50, grad_to_none=grads_of),
               "kernels": {k: round(v, 5) for k, v in per_kernel.items()}}
    for t in grads_of:
        t.grad = None
