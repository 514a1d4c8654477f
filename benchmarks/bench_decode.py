"""Decode-step attention benchmark: one query per sequence against [shared prefix; its own cache].

Providers: prefix_attn (the decode path: prefix read once per tile of stacked rows, split-KV over
each cache), concat_sdpa and concat_eager (the batch-expanded prefix concatenated with every cache,
as PEFT's generate does per beam), prefix_attn_torch on CPU. Reports ms per step, the bytes a step
must move (prefix K/V once per task plus every sequence's cache) and the GB/s achieved on them.
"""
import dataclasses
from typing import Iterator

import torch

from benchmarks.measure import kernel_time_ms, on_gpu, peak_memory_mb, time_ms
from benchmarks.providers import concat_eager, concat_sdpa, fused_torch, fused_triton, unavailable_reason

PROVIDERS = {"prefix_attn": fused_triton, "prefix_attn_torch": fused_torch, "concat_sdpa": concat_sdpa,
             "concat_eager": concat_eager}


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    B: int
    P: int
    L: int  # cache length (keys of the sequence itself, the new token included)
    H: int = 12
    D: int = 64

    def bytes_to_move(self, element_size: int) -> int:
        """Prefix K/V once (one task) + every sequence's K/V cache + q and out."""
        kv = 2 * self.H * self.D * element_size
        return kv * (self.P + self.B * self.L) + 2 * self.B * self.H * self.D * element_size


def shapes(quick: bool, device) -> dict[str, list[DecodeShape]]:
    if not on_gpu(device):
        return {"decode_vs_B": [DecodeShape(B, 64, 128, H=4) for B in ((1, 8) if quick else (1, 8, 32))]}
    if quick:
        return {"decode_vs_B": [DecodeShape(B, 2048, 1024) for B in (8, 128)],
                "decode_vs_P": [DecodeShape(128, P, 1024) for P in (16, 2048)]}
    return {
        "decode_vs_B": [DecodeShape(B, P, L) for P in (256, 2048) for L in (128, 1024) for B in (1, 8, 32, 128, 256)],
        "decode_vs_P": [DecodeShape(B, P, L) for B in (32, 128) for L in (128, 1024) for P in (16, 256, 2048, 8192)],
    }


def run(quick: bool, device, providers=None, dtype=None, copy_gbps=None) -> Iterator[dict]:
    dtype = dtype or (torch.bfloat16 if on_gpu(device) else torch.float32)
    providers = [p for p in (providers or PROVIDERS) if p in PROVIDERS]
    for sweep, points in shapes(quick, device).items():
        for s in points:
            g = torch.Generator(device="cpu").manual_seed(0)

            def rand(*shape):
                return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

            q = rand(s.B, 1, s.H, s.D)
            k, v = rand(s.B, s.L, s.H, s.D), rand(s.B, s.L, s.H, s.D)
            pk, pv = rand(s.P, s.H, s.D), rand(s.P, s.H, s.D)
            nbytes = s.bytes_to_move(q.element_size())
            for name in providers:
                base = dict(bench=sweep, provider=name, mode="decode", dtype=str(dtype).replace("torch.", ""),
                            B=s.B, H=s.H, L=s.L, P=s.P, D=s.D)
                reason = unavailable_reason(name, device)
                if reason:
                    yield {**base, "skipped": reason}
                    continue
                fn = PROVIDERS[name]

                def step():
                    with torch.no_grad():
                        return fn(q, k, v, pk, pv)

                try:
                    ms = time_ms(step, device)
                    kernel_ms, _ = kernel_time_ms(step, device)
                    mem = peak_memory_mb(step, device)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    yield {**base, "skipped": "out of memory"}
                    continue
                gbps = nbytes / ms[0] / 1e6
                record = {**base, "ms_p50": ms[0], "ms_p20": ms[1], "ms_p80": ms[2], "kernel_ms": kernel_ms,
                          "bytes": nbytes, "gbps": gbps, "kernel_gbps": nbytes / kernel_ms / 1e6,
                          "peak_mem_mb": mem}
                if copy_gbps:
                    record["frac_of_copy_bw"] = record["kernel_gbps"] / copy_gbps
                yield record
