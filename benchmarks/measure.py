"""Timing, memory and the environment a figure was measured in.

GPU: triton.testing.do_bench (CUDA events, L2 flushed between runs) with quantiles 0.5/0.2/0.8,
peak memory from torch.cuda.max_memory_allocated. CPU: a wall-clock loop after warm-up, and peak
memory from a dispatch mode that counts the bytes of every tensor storage alive (what torch
allocated, not the process RSS).
"""
import functools
import os
import platform
import subprocess
import time
import weakref
from typing import Callable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

QUANTILES = (0.5, 0.2, 0.8)


def on_gpu(device) -> bool:
    return torch.device(device).type == "cuda"


def time_ms(fn: Callable[[], object], device, *, warmup_ms=25, rep_ms=100, cpu_reps=5,
            grad_to_none=None) -> tuple[float, float, float]:
    """(p50, p20, p80) in ms of fn()."""
    if on_gpu(device):
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES),
                                 grad_to_none=grad_to_none)
        return float(p50), float(p20), float(p80)
    fn()  # warm-up: first-call allocations and caches
    samples = []
    for _ in range(cpu_reps):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = torch.quantile(torch.tensor(samples, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(float(x) for x in q)


class _StorageCounter(TorchDispatchMode):
    """Counts bytes of tensor storages created under it and alive, and their peak.

    An op's output that shares storage with one of its tensor arguments (a view, an in-place or out=
    result) allocated nothing: it is not counted. Without that rule a storage that existed before the
    call (an input) was counted as soon as the call took a view of it (a transpose), which charged a
    provider that views its inputs (k.transpose(1, 2)) for memory that another one (reading them in
    torch.cat) was not charged for.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = set()

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, storage.nbytes())

    def _release(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in pytree.tree_leaves((args, kwargs))
                  if isinstance(x, torch.Tensor) and x.device.type == "cpu"}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr() in inputs:
                continue  # a view or an in-place result: no new storage
            self._track(t)
        return out


def peak_memory_mb(fn: Callable[[], object], device) -> float:
    """Peak memory (MiB) allocated by fn() beyond what was allocated before it."""
    if on_gpu(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    counter = _StorageCounter()
    with counter:
        fn()
    return counter.peak / 2**20


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("PREFIX_ATTN_COMMIT", "unknown")


def device_name(device) -> str:
    if on_gpu(device):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def environment(device) -> dict:
    import triton
    import transformers

    env = {"device": device_name(device), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "commit": git_commit(),
           "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1"}
    if on_gpu(device):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(cuda=torch.version.cuda, sms=props.multi_processor_count,
                   gpu_memory_gb=round(props.total_memory / 2**30, 1))
    return env


def measure_ceilings(device) -> dict:
    """The machine's own limits, measured once: a large bf16 (fp32 on CPU) matmul and a large copy."""
    if on_gpu(device):
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        mm_ms = time_ms(lambda: a @ b, device, warmup_ms=100, rep_ms=300)[0]
        x = torch.empty(2**30 // 2, device=device, dtype=torch.bfloat16).normal_()  # 1 GiB
        y = torch.empty_like(x)
        copy_ms = time_ms(lambda: y.copy_(x), device, warmup_ms=100, rep_ms=300)[0]
        nbytes = 2 * x.numel() * x.element_size()
        del a, b, x, y
        torch.cuda.empty_cache()
        return {"matmul_tflops": 2 * n**3 / mm_ms / 1e9, "matmul_dtype": "bf16", "copy_gbps": nbytes / copy_ms / 1e6}
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    mm_ms = time_ms(lambda: a @ b, device)[0]
    x = torch.randn(2**25)
    y = torch.empty_like(x)
    copy_ms = time_ms(lambda: y.copy_(x), device)[0]
    return {"matmul_tflops": 2 * n**3 / mm_ms / 1e9, "matmul_dtype": "fp32",
            "copy_gbps": 2 * x.numel() * 4 / copy_ms / 1e6}


def _clear_grads(tensors):
    for t in tensors or ():
        t.grad = None


def kernel_time_ms(fn: Callable[[], object], device, iters: int = 10, grad_to_none=None) -> tuple[float, dict]:
    """GPU busy time per call (ms): the sum of the durations of the kernels fn() launches, from
    torch.profiler, without host overhead or launch gaps; and the per-kernel split (ms).
    grad_to_none: tensors whose .grad is reset before each call (else gradient accumulation adds
    kernels that a single call does not run)."""
    if not on_gpu(device):
        return float("nan"), {}
    from torch.profiler import ProfilerActivity, profile

    _clear_grads(grad_to_none)
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            _clear_grads(grad_to_none)
            fn()
        torch.cuda.synchronize()
    per_kernel = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(evt, "device_time", None)
        if us is None:
            us = getattr(evt, "cuda_time", 0.0)
        per_kernel[evt.name] = per_kernel.get(evt.name, 0.0) + us / 1e3 / iters
    return sum(per_kernel.values()), per_kernel


def host_us_per_call(fn: Callable[[], object], device, calls: int = 200, grad_to_none=None) -> float:
    """Host time per call (µs) issuing fn() back to back: the launch overhead when the GPU is fast."""
    fn()
    if on_gpu(device):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        _clear_grads(grad_to_none)
        fn()
    elapsed = time.perf_counter() - start
    if on_gpu(device):
        torch.cuda.synchronize()
    return elapsed / calls * 1e6
