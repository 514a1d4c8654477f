"""Triton's real Python launch path on a machine without a GPU: only the C launch is faked.

How it works (Triton 3.6 and 3.9; the internals it leans on are named here so that a new release
that moves them fails loudly, not silently):

- ``install()`` makes ``triton.runtime.driver.active`` a ``FakeCudaDriver``: current device 0 (tests
  switch it with ``set_current_device``),
  current stream 0, target ``GPUTarget("cuda", 90, 32)`` (an H100). ``JITFunction.run`` then does
  everything it does on a GPU: knob reads, the binder over every argument, the cache key, and on
  the first call per specialisation a real compilation to a cubin (ptxas runs without a GPU).
- Loading the cubin needs a GPU: ``FakeCudaDriver.utils.load_binary`` returns placeholder handles
  (and H100 limits: 228 KiB shared memory, 1024 threads).
- The launcher is Triton's own ``CudaLauncher`` class (its Python ``__call__`` runs, scratch
  allocation included) built without its C module; its C entry ``launch`` is ``LaunchCounter``,
  which only counts. So a launch costs everything but ``cuLaunchKernelEx`` and the C argument
  parsing (a few microseconds on a real GPU, not included here).
- Tensors stay on the CPU: nothing reads or writes them, since no kernel runs. Outputs are
  garbage (torch.empty). Torch's own ops of the op's host path (allocations, views, small index
  tensors) run on CPU tensors, whose host cost is close to, not equal to, the CUDA tensors' one.

Use it only in a process that does not run Triton kernels for real (``python -m benchmarks --only
host`` runs it in its own process); ``uninstall()`` restores the previous driver.
"""
import functools

import torch

# H100 SXM figures that Triton reads through the driver (shared memory, SMs, threads).
H100_PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                   "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}
H100_MAX_THREADS = 1024


class LaunchCounter:
    """Stands for the C entry of a launch: counts the launches and does nothing else."""

    def __init__(self):
        self.count = 0
        self.recorded = None  # a list to keep every launch's arguments in (tests)

    def __call__(self, *args):
        self.count += 1
        if self.recorded is not None:
            self.recorded.append(args)


LAUNCHES = LaunchCounter()


class _FakeUtils:
    """The C module of Triton's CUDA driver (cuda_utils), where a GPU is not needed to answer."""

    launch = LAUNCHES

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads); the handles name the device loaded on
        return 1 + device, 1 + device, 0, 0, H100_MAX_THREADS

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return dict(H100_PROPERTIES)

    def is_stream_capturing(self, stream):
        return False


@functools.lru_cache(maxsize=None)
def _launcher_class():
    from triton.backends.nvidia.driver import CudaLauncher

    class NoOpCudaLauncher(CudaLauncher):
        """Triton's CudaLauncher whose C launch (``self.launch``) only counts."""

        def __init__(self, src, metadata):  # the real one compiles and loads a C module
            self.num_ctas = getattr(metadata, "num_ctas", 1)
            self.launch = LAUNCHES
            self.global_scratch_size = metadata.global_scratch_size
            self.global_scratch_align = metadata.global_scratch_align
            self.profile_scratch_size = getattr(metadata, "profile_scratch_size", 0)
            self.profile_scratch_align = getattr(metadata, "profile_scratch_align", 1)
            self.launch_cooperative_grid = metadata.launch_cooperative_grid
            self.launch_pdl = getattr(metadata, "launch_pdl", False)
            # Triton 3.9's __call__ passes these to the C launch; nothing reads them here.
            self.gsan_enabled = False
            self.arg_annotations = None
            self.kernel_signature = None

    return NoOpCudaLauncher


def _untimed_bench(kernel_call, quantiles=None, **kwargs):
    """Autotuning without a GPU: runs the call once (it compiles) and times nothing, so every
    config ties and the autotuner keeps the first, as PREFIX_ATTN_AUTOTUNE=0 would."""
    kernel_call()
    return [1.0] * len(quantiles) if quantiles else 1.0


def _driver_base():
    from triton.backends.driver import DriverBase

    return DriverBase


class FakeCudaDriver:
    """Built by ``make_driver`` as a subclass of Triton's DriverBase (imported lazily)."""


@functools.lru_cache(maxsize=None)
def _driver_class():
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import ty_to_cpp

    class _FakeCudaDriver(_driver_base(), FakeCudaDriver):
        def __init__(self):
            self.utils = _FakeUtils()
            self.launcher_cls = _launcher_class()
            self.target = GPUTarget("cuda", 90, 32)
            self.device = 0

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            return ty_to_cpp(ty)

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return self.device

        def set_current_device(self, device):
            self.device = device

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return (9, 0)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):
            return _untimed_bench

        def allocate_default_profile_scratch(self, size, align, stream):
            return None

    return _FakeCudaDriver


_previous = []


def install():
    """Make the fake driver Triton's active driver; returns it."""
    from triton.runtime import driver

    fake = _driver_class()()
    _previous.append(driver._active)
    driver.set_active(fake)
    return fake


def uninstall():
    from triton.runtime import driver

    driver._active = _previous.pop() if _previous else None


def launches() -> int:
    """Launches issued through the fake driver since the process started."""
    return LAUNCHES.count
