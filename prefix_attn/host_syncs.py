"""Count host synchronisations: the points where Python reads a tensor's value.

``.item()``, ``int(t)``, ``float(t)`` and ``bool(t)`` all reach ``aten._local_scalar_dense``; on a
GPU each one waits for every queued kernel. ``HostSyncCounter`` counts them under a
TorchDispatchMode, so the count is the same on CPU tensors (where it costs nothing) as on CUDA
tensors (where it stalls the launch queue): tests run on CPU and still see every sync a GPU run
would make. Copies of CUDA tensors to the CPU (``.cpu()``, ``.tolist()`` goes the same way) are
counted too.

    with HostSyncCounter() as syncs:
        loss = model(ids).loss
        loss.backward()
    assert syncs.count <= 1, syncs.sources
"""
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR_READ = torch.ops.aten._local_scalar_dense.default
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


def _is_device_to_host(func, args, kwargs) -> bool:
    if func is torch.ops.aten._to_copy.default:
        src, dst = args[0], kwargs.get("device")
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None \
            and torch.device(dst).type == "cpu"
    dst, src = args[0], args[1]
    return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst.device.type == "cpu"


class HostSyncCounter(TorchDispatchMode):
    """Counts the host syncs of the code run under it; ``sources`` keeps a short stack of each
    (with ``keep_sources=True``) to say where they come from."""

    def __init__(self, keep_sources: bool = True):
        super().__init__()
        self.count = 0
        self.keep_sources = keep_sources
        self.sources = []

    def _record(self):
        self.count += 1
        if self.keep_sources:
            frames = [f for f in traceback.extract_stack()[:-3] if "torch/" not in f.filename]
            self.sources.append(" <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in frames[-4:][::-1]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SCALAR_READ or (func in _COPIES and _is_device_to_host(func, args, kwargs)):
            self._record()
        return func(*args, **kwargs)
