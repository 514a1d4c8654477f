"""Run by tests/test_host_path.py in a process without TRITON_INTERPRET: under the fake driver, the
direct launches of prefix_attn._launch must hand Triton's C launcher exactly what Triton's own
dispatch (kernel[grid](...)) hands it. Prints one JSON line with the result."""
import json
import sys

import torch

from benchmarks import bench_host, fake_driver
from prefix_attn import _launch


def _normalise(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", str(x.dtype), tuple(x.shape), tuple(x.stride()))
    if isinstance(x, (tuple, list)):
        return tuple(_normalise(y) for y in x)
    if x is None or type(x).__name__ in ("HookChain", "LazyDict"):
        return "hook-or-metadata"  # Triton passes empty hook chains; the direct path passes None
    if isinstance(x, (int, float, bool, str)):
        return x
    return type(x).__name__


def main():
    results = {}
    with bench_host.fake_gpu():
        for s in bench_host.shapes(quick=False):
            inputs = bench_host._inputs(s, torch.bfloat16, "cpu", s.kind == "train")
            closures = bench_host._closures("prefix_attn", s, inputs, None)  # one call through Triton
            for mode, fn in closures.items():
                for launcher in _launch._LAUNCHERS.values():
                    launcher.clear()
                fake_driver.LAUNCHES.recorded = through_triton = []
                fn()
                fake_driver.LAUNCHES.recorded = direct = []
                fn()  # found by specialisation key
                fake_driver.LAUNCHES.recorded = direct_exact = []
                fn()  # found by the plan's bound launch (fwd, bwd) or the exact argument key (decode)
                fake_driver.LAUNCHES.recorded = None
                cached = sum(len(launcher._kernels) for launcher in _launch._LAUNCHERS.values())
                want = [_normalise(a) for a in through_triton]
                same = want == [_normalise(a) for a in direct] == [_normalise(a) for a in direct_exact]
                results[f"{mode}-{s.tasks}"] = dict(launches=len(direct), same=same, cached=cached)
        # PREFIX_ATTN_DIRECT_LAUNCH=0: every call through Triton's dispatch, the same launches, nothing kept.
        s = bench_host.shapes(quick=True)[0]
        fwd = bench_host._closures("prefix_attn", s, bench_host._inputs(s, torch.bfloat16, "cpu", True), None)["fwd"]
        for launcher in _launch._LAUNCHERS.values():
            launcher.clear()
        fake_driver.LAUNCHES.recorded = direct = []
        fwd()
        fwd()
        _launch.DIRECT_LAUNCH = False
        for launcher in _launch._LAUNCHERS.values():
            launcher.clear()
        fake_driver.LAUNCHES.recorded = through_triton = []
        fwd()
        fwd()
        fake_driver.LAUNCHES.recorded = None
        _launch.DIRECT_LAUNCH = True
        results["switch_off"] = dict(  # the steady-state launch (the first may autotune through Triton)
            same=_normalise(direct[-1]) == _normalise(through_triton[-1]),
            cached=sum(len(launcher._kernels) for launcher in _launch._LAUNCHERS.values()))
        # A compiled kernel is loaded per device: after a switch the launches use that device's handle.
        s = bench_host.shapes(quick=True)[0]
        fwd = bench_host._closures("prefix_attn", s, bench_host._inputs(s, torch.bfloat16, "cpu", True), None)["fwd"]
        handles = {}
        for device in (0, 1, 1, 0):
            fake_driver.install().set_current_device(device)
            fake_driver.LAUNCHES.recorded = launched = []
            fn_out = fwd()
            fake_driver.LAUNCHES.recorded = None
            fake_driver.uninstall()
            handles.setdefault(device, set()).add(launched[0][4])  # (gridX, gridY, gridZ, stream, function, ...)
            del fn_out
        results["device_handles"] = {str(d): sorted(h) for d, h in handles.items()}
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
