"""Host time per op call: what the Python side of one layer's attention costs, on any machine.

``python -m benchmarks --only host [--out DIR]``. Shapes are the issue's: a GPT-2 small training
layer call (B 8, L 512, H 12, D 64, P 10, dropout 0.1; a shared prefix, and a bank of 4 tasks),
modes "fwd" (a training forward: inputs require grad) and "bwd" (the backward of that call), and a
decode step (B 32, cache 160, P 200, one query per sequence; shared prefix and bank), mode
"decode". Records: bench "host", provider, mode, host_us (median per call; p20/p80 too), launches
(kernel launches per call), syncs (host synchronisations per call, prefix_attn.host_syncs).

Without a GPU (how the figures are measured): Triton's real Python launch path runs with only the
C launcher faked (``benchmarks/fake_driver.py``: a fake active driver with device 0, stream 0,
target GPUTarget("cuda", 90, 32); kernels are compiled for real with ptxas, the launch counts and
returns). The op runs on CPU tensors of the real shapes, autotuning off (the first config), 132
SMs assumed for the work splits. host_us is then everything the call costs in Python and torch
except cuLaunchKernelEx and the C launcher's argument parsing (a few us per launch on a GPU), and
except the autograd engine's hand-off to its CUDA device thread in backward. Label such figures
"host us, <cpu>, fake driver, triton X". The "sdpa" provider (what PEFT runs: the expanded prefix
concatenated with K/V, then scaled_dot_product_attention with a bottom-right causal mask, and
dropout in training) is timed in the same run on the same CPU, on tiny fp32 tensors (B 1, L 16,
H 2, P 2) so that its compute is negligible next to its host path; its launches are not counted.

On a GPU (not yet measured by any session): host_us = CUDA-event time per call (do_bench) minus
the call's kernel time (torch.profiler), i.e. the time the GPU waited for the host; also
host_issue_us, the wall time per call issued back to back; launches from the profiler.
"""
import contextlib
import dataclasses
import gc
import statistics
import sys
import time
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from benchmarks.measure import kernel_time_ms, on_gpu, time_ms
from prefix_attn import prefix_attn_func
from prefix_attn.host_syncs import HostSyncCounter

PROVIDERS = ("prefix_attn", "sdpa")
SDPA_TINY = dict(B=1, L=16, H=2, P=2)  # the CPU stand-in shape of the sdpa provider


@dataclasses.dataclass(frozen=True)
class HostShape:
    kind: str  # "train" (modes fwd, bwd) or "decode"
    B: int
    L: int  # sequence length (train) or cache length (decode)
    P: int
    tasks: int  # 1: shared (P, H, D) prefix; T > 1: a bank of T tasks
    H: int = 12
    D: int = 64
    dropout_p: float = 0.0


def shapes(quick: bool) -> list[HostShape]:
    points = [HostShape("train", 8, 512, 10, 1, dropout_p=0.1), HostShape("decode", 32, 160, 200, 1)]
    if not quick:
        points += [HostShape("train", 8, 512, 10, 4, dropout_p=0.1), HostShape("decode", 32, 160, 200, 4)]
    return points


@contextlib.contextmanager
def fake_gpu():
    """Triton's launch path with the fake driver, the op's device check relaxed for CPU tensors."""
    import csrc_triton.common as common
    from benchmarks import fake_driver
    from prefix_attn import backend, triton_launch

    saved = [(backend, "check_triton_device", backend.check_triton_device),
             (triton_launch, "check_triton_device", triton_launch.check_triton_device),
             (triton_launch, "num_sms", triton_launch.num_sms),
             (common, "AUTOTUNE", common.AUTOTUNE)]
    fake_driver.install()
    backend.check_triton_device = triton_launch.check_triton_device = lambda device: None
    triton_launch.num_sms = lambda device: 132
    common.AUTOTUNE = False
    try:
        yield fake_driver
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        fake_driver.uninstall()


def _inputs(s: HostShape, dtype, device, grad: bool):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    Lq = s.L if s.kind == "train" else 1
    q = rand(s.B, Lq, s.H, s.D)
    k, v = rand(s.B, s.L, s.H, s.D), rand(s.B, s.L, s.H, s.D)
    bank = (s.tasks,) if s.tasks > 1 else ()
    pk, pv = rand(*bank, s.P, s.H, s.D), rand(*bank, s.P, s.H, s.D)
    idx = (torch.arange(s.B, device=device) % s.tasks) if s.tasks > 1 else None
    return q, k, v, pk, pv, idx


def _ours(s: HostShape):
    def call(q, k, v, pk, pv, idx):
        return prefix_attn_func(q, k, v, pk, pv, prefix_idx=idx, causal=True, dropout_p=s.dropout_p,
                                backend="triton")

    return call


def _sdpa(s: HostShape, q, k, pk):
    """PEFT's path: expand the prefix over the batch (per task with a bank), concatenate, SDPA with
    the boolean mask transformers builds once per forward (bottom-right causal over the keys, every
    prefix slot visible)."""
    Lq, Lk, P = q.shape[1], k.shape[1], pk.shape[-3]
    rows = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
    cols = torch.arange(P + Lk, device=q.device)[None, :] - P
    mask = (cols <= rows) if Lq > 1 else None

    def call(q, k, v, pk, pv, idx):
        B = q.shape[0]
        if idx is not None:
            pk_b, pv_b = pk[idx], pv[idx]
        else:
            pk_b, pv_b = pk.unsqueeze(0).expand(B, -1, -1, -1), pv.unsqueeze(0).expand(B, -1, -1, -1)
        k_all, v_all = torch.cat([pk_b, k], 1), torch.cat([pv_b, v], 1)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k_all, v_all))
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask,
                                             dropout_p=s.dropout_p if torch.is_grad_enabled() else 0.0)
        return out.transpose(1, 2)

    return call


def _per_call_us(fn, calls: int, repeats: int) -> tuple[float, float, float]:
    """(median, p20, p80) over ``repeats`` blocks of ``calls`` back-to-back calls, us per call."""
    for _ in range(3):
        fn()
    block_means = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            block_means.append((time.perf_counter() - start) / calls * 1e6)
    finally:
        if gc_was_enabled:
            gc.enable()
    block_means.sort()
    q = statistics.quantiles(block_means, n=5) if len(block_means) > 1 else block_means * 4
    return statistics.median(block_means), q[0], q[3]


def _syncs_per_call(fn) -> int:
    with HostSyncCounter(keep_sources=False) as counter:
        fn()
    return counter.count


def _closures(provider: str, s: HostShape, inputs, dout_like):
    """{mode: fn} for one provider at one shape."""
    q, k, v, pk, pv, idx = inputs
    call = _ours(s) if provider == "prefix_attn" else _sdpa(s, q, k, pk)
    if s.kind == "decode":
        def decode():
            with torch.no_grad():
                return call(q, k, v, pk, pv, idx)

        return {"decode": decode}
    out = call(q, k, v, pk, pv, idx)
    dout = torch.randn_like(out) if dout_like is None else dout_like
    wrt = (q, k, v, pk, pv)

    def fwd():
        return call(q, k, v, pk, pv, idx)

    def bwd():
        return torch.autograd.grad(out, wrt, dout, retain_graph=True)

    return {"fwd": fwd, "bwd": bwd}


def _shape_fields(s: HostShape, provider: str, cpu: bool) -> dict:
    fields = dict(B=s.B, H=s.H, L=s.L, P=s.P, D=s.D, tasks=s.tasks, dropout_p=s.dropout_p)
    if provider == "sdpa" and cpu:
        fields.update(SDPA_TINY, note="tiny fp32 CPU tensors: host path with negligible compute")
    return fields


def run(quick: bool, device, providers=None, calls: Optional[int] = None, repeats: Optional[int] = None,
        points=None) -> Iterator[dict]:
    """One record per (shape, provider, mode)."""
    import triton

    providers = [p for p in (providers or PROVIDERS) if p in PROVIDERS]
    calls = calls or (50 if quick else 200)
    repeats = repeats or (5 if quick else 9)
    gpu = on_gpu(device)
    label = f"host us, {'GPU' if gpu else 'CPU'}, {'event minus kernel time' if gpu else 'fake driver'}, " \
            f"triton {triton.__version__}"
    ctx = contextlib.nullcontext(None) if gpu else fake_gpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host paths are single-threaded; intra-op threads only add noise here
    with ctx as fake:
        for s in points or shapes(quick):
            for provider in providers:
                cpu_sdpa = provider == "sdpa" and not gpu
                if cpu_sdpa:
                    tiny = dataclasses.replace(s, **SDPA_TINY)
                    inputs = _inputs(tiny, torch.float32, "cpu", s.kind == "train")
                    closures = _closures(provider, tiny, inputs, None)
                else:
                    dtype = torch.bfloat16
                    inputs = _inputs(s, dtype, device, s.kind == "train")
                    closures = _closures(provider, s, inputs, None)
                for mode, fn in closures.items():
                    record = dict(bench="host", provider=provider, mode=mode, dtype="float32" if cpu_sdpa else "bfloat16",
                                  label=label, **_shape_fields(s, provider, not gpu))
                    record["syncs"] = _syncs_per_call(fn)
                    if gpu:
                        record.update(_gpu_host(fn, device, calls))
                    else:
                        before = fake.launches()
                        p50, p20, p80 = _per_call_us(fn, calls, repeats)
                        n_calls = calls * repeats + 3
                        record.update(host_us=p50, host_us_p20=p20, host_us_p80=p80,
                                      launches=None if cpu_sdpa else (fake.launches() - before) / n_calls)
                    print(f"  {provider:12s} {mode:7s} tasks={s.tasks} host_us={record['host_us']:.1f} "
                          f"launches={record.get('launches')} syncs={record['syncs']}", file=sys.stderr)
                    yield record
    torch.set_num_threads(threads)


def _gpu_host(fn, device, calls: int) -> dict:
    """Host time on a GPU: event time per call minus the call's kernel time (unmeasured so far)."""
    from benchmarks.measure import host_us_per_call

    ms = time_ms(fn, device)
    kernel_ms, per_kernel = kernel_time_ms(fn, device)
    return dict(host_us=max(0.0, (ms[0] - kernel_ms) * 1e3), event_ms=ms[0], kernel_ms=kernel_ms,
                host_issue_us=host_us_per_call(fn, device, calls=calls), launches=_gpu_launches(fn))


def _gpu_launches(fn, iters: int = 5) -> float:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return n / iters


def summary_markdown(records) -> str:
    """The host table of a run's summary."""
    rows = [r for r in records if r.get("bench") == "host" and not r.get("skipped")]
    if not rows:
        return ""
    notes = sorted({r["note"] for r in rows if r.get("note")})
    lines = ["## Host time per op call", "", f"{rows[0].get('label', '')}." + "".join(f" sdpa: {n}." for n in notes), "",
             "| mode | tasks | provider | shape (B, L, P) | host us p50 [p20, p80] | launches | syncs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        launches = "-" if r.get("launches") is None else f"{r['launches']:.2g}"
        lines.append(f"| {r['mode']} | {r['tasks']} | {r['provider']} | {r['B']}, {r['L']}, {r['P']} | "
                     f"{r['host_us']:.1f} [{r.get('host_us_p20', float('nan')):.1f}, "
                     f"{r.get('host_us_p80', float('nan')):.1f}] | {launches} | {r['syncs']} |")
    return "\n".join(lines) + "\n"
