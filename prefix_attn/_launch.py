"""Direct launches of the Triton kernels, without Triton's per-call dispatch.

``kernel[grid](...)`` costs tens of microseconds of Python per call: ``Autotuner.run`` (a list scan
per keyword argument, every call), then ``JITFunction.run`` (the binder over every argument, a
cache key from ``str(options)``). ``DirectLauncher`` does that work once per specialisation:

1. The config is resolved once per tuning key: by Triton's autotuner when autotuning is on, else
   the first config the kernel's pruning keeps (``PREFIX_ATTN_AUTOTUNE=0``), launched through
   ``JITFunction.run`` without benchmarking.
2. The first call of each specialisation goes through Triton (it compiles, and it launches for
   real); the ``CompiledKernel`` it returns is kept under a key that holds everything Triton
   specialises on: every constexpr, the tuning arguments' values, each tensor's dtype and 16-byte
   alignment, each integer's divisibility by 16, equality to 1 and 32-bit range (a key finer than
   Triton's, never coarser, so it never reuses a kernel Triton would not).
3. Later calls look the kernel up and call its launcher directly with the current device's
   stream: a few microseconds. The lookup goes first by the exact argument values (one tuple of
   the integer arguments, each tensor's dtype and alignment: the calls of a training step repeat
   them), then, on a miss such as a decode step's new cache length, by the specialisation key.
   Both keys hold the current device: a compiled kernel is loaded per device.

Under Triton's interpreter (TRITON_INTERPRET=1) there is no compiled kernel: every call is a
plain ``kernel[grid](...)``. A launch hook (a profiler such as proton) also sends calls through
Triton, so that the hook sees them. ``PREFIX_ATTN_DIRECT_LAUNCH=0`` (read at import) sends every
call through Triton's own dispatch: the same kernels and results, at Triton's host cost.
"""
import operator
import os
from functools import reduce
from operator import or_
from typing import Callable

import torch
from triton.runtime import driver

from csrc_triton import common

try:
    from triton import knobs as _knobs
except ImportError:  # Triton < 3.4 has no knobs: no launch hooks to honour either
    _knobs = None

DIRECT_LAUNCH = os.environ.get("PREFIX_ATTN_DIRECT_LAUNCH", "1") != "0"
_INT32_MIN, _INT32_MAX = -2**31, 2**31 - 1
_MAX_EXACT_KEYS = 4096


def _hook_set(hook) -> bool:
    # Triton 3.4+ keeps hooks in a HookChain (empty when unused); older ones held a function or None.
    return hook is not None and (not hasattr(hook, "calls") or bool(hook.calls))


def through_triton() -> bool:
    """Whether launches go through Triton's own dispatch: under the interpreter, with
    PREFIX_ATTN_DIRECT_LAUNCH=0, or while a launch hook (a profiler) is installed."""
    return common.INTERPRET or not DIRECT_LAUNCH or launch_hooks_set()


def launch_hooks_set() -> bool:
    """Whether a launch hook (a profiler) is installed: then every launch goes through Triton."""
    if _knobs is None:
        return False
    runtime = _knobs.runtime
    return _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)


_AND_15 = (15).__and__
_EQ_1 = (1).__eq__


class _ArgLayout:
    """Where a launch's tensors and integers sit (learned from the argument types, which are fixed
    per call site), so that the specialisation key is built by C-level maps, not a Python loop."""

    __slots__ = ("tensors", "ints", "n_ints")

    def __init__(self, types):
        tensor_pos = [i for i, t in enumerate(types) if issubclass(t, torch.Tensor)]
        int_pos = [i for i, t in enumerate(types) if t is int]
        self.tensors = _getter(tensor_pos)
        self.ints = _getter(int_pos)
        self.n_ints = len(int_pos)


def _getter(positions):
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*positions)


def specialization_key(args, layouts: dict):
    """What Triton specialises a launch on, or finer: argument types, each tensor's dtype and
    16-byte alignment, each integer's divisibility by 16, equality to 1 and int32 range."""
    types = tuple(map(type, args))
    layout = layouts.get(types)
    if layout is None:
        layout = layouts[types] = _ArgLayout(types)
    tensors = layout.tensors(args)
    ints = layout.ints(args)
    fits32 = not ints or (min(ints) >= _INT32_MIN and max(ints) <= _INT32_MAX)
    return (types, tuple([t.dtype for t in tensors]), tuple([t.data_ptr() & 15 for t in tensors]),
            tuple(map(_AND_15, ints)), tuple(map(_EQ_1, ints)), fits32)


class DirectLauncher:
    """Launches one jitted (optionally autotuned) kernel: ``launcher(grid, args, constexprs)``.

    args: the kernel's runtime (non-constexpr) arguments, positionally, in signature order.
    constexprs: its constexpr arguments except those of the autotuning config, by name.
    grid: a tuple, or a function of the launch's meta-parameters as with ``kernel[grid]``; for an
    autotuned kernel it may read only the constexprs and the config's keyword arguments (block
    sizes), which are fixed per compiled kernel (a plain kernel's grid function also gets the
    arguments by name).
    """

    def __init__(self, kernel):
        from triton.runtime.autotuner import Autotuner

        self.kernel = kernel
        self.autotuner = kernel if isinstance(kernel, Autotuner) else None
        self._kernels = {}  # specialisation key -> launch entry
        self._exact = {}  # exact argument key -> launch entry (level 1, bounded)
        self._layouts = {}  # argument types -> _ArgLayout
        self._layout_by_count = {}  # number of arguments -> the layout last seen with it
        self._bound = {}  # (BoundLaunch, device, tensor dtypes) -> launch entry (bounded)
        if common.INTERPRET:  # an InterpretedFunction: every call goes through kernel[grid]
            return
        jit = kernel
        while not hasattr(jit, "params"):  # Autotuner / Heuristics wrap the JITFunction as .fn
            jit = jit.fn
        self.jit = jit
        self.arg_names = [p.name for p in jit.params if not p.is_constexpr]
        self.constexpr_names = [p.name for p in jit.params if p.is_constexpr]
        keys = self.autotuner.keys if self.autotuner is not None else ()
        self.tune_positions = tuple(i for i, name in enumerate(self.arg_names) if name in keys)

    def _key(self, args, constexprs):
        return (tuple(constexprs.items()), tuple([args[i] for i in self.tune_positions]),
                specialization_key(args, self._layouts))

    def __call__(self, grid, args, constexprs: dict):
        """Launch; returns (run, function, packed_metadata, grid as 3 ints, constexpr tail) when the launch
        went straight to the compiled kernel (what BoundLaunch keeps), None when it went through Triton."""
        if through_triton():
            self.kernel[grid](*args, **constexprs)
            return None
        # Level 1: the exact integer values (strides, sizes), each tensor's dtype and alignment, read
        # at the positions of the last argument layout seen with this many arguments (a call site
        # passes the same types every time; any other mix misses, or fails on a non-tensor's .dtype,
        # and is sorted out below from the types themselves). Calls of a training step repeat these
        # exactly; a miss (a decode step's new cache length) falls back to the specialisation key,
        # which maps many level-1 keys to one compiled kernel.
        active = driver.active
        device = active.get_current_device()  # a compiled kernel is loaded per device, as Triton keeps it
        layout = self._layout_by_count.get(len(args))
        try:
            exact = None if layout is None else (
                device, layout, tuple(constexprs.items()), layout.ints(args),
                tuple([(t.dtype, t.data_ptr() & 15) for t in layout.tensors(args)]))
        except AttributeError:
            exact = None
        entry = self._exact.get(exact) if exact is not None else None
        if entry is None:
            types = tuple(map(type, args))
            layout = self._layouts.get(types)
            if layout is None:
                layout = self._layouts[types] = _ArgLayout(types)
            self._layout_by_count[len(args)] = layout
            exact = (device, layout, tuple(constexprs.items()), layout.ints(args),
                     tuple([(t.dtype, t.data_ptr() & 15) for t in layout.tensors(args)]))
            key = (device, self._key(args, constexprs))
            entry = self._kernels.get(key)
            if entry is None:
                self._first_launch(key, grid, args, constexprs)  # launches through Triton
                return None
            if len(self._exact) >= _MAX_EXACT_KEYS:
                self._exact.clear()
            self._exact[exact] = entry
        run, function, packed_metadata, meta, tail = entry
        if callable(grid):
            grid = grid(meta if meta is not None else dict(zip(self.arg_names, args), **constexprs))
        grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        run(*grid, active.get_current_stream(device), function, packed_metadata, None, None, None, *args, *tail)
        return run, function, packed_metadata, grid, tail

    def config_for(self, args, constexprs: dict):
        """The autotuning config a launch with these arguments runs (None for a plain jit kernel)."""
        if self.autotuner is None:
            return None
        tuner = self.autotuner
        if common.AUTOTUNE:
            return None  # chosen by the autotuner on the first launch
        tuner.nargs = dict(zip(self.arg_names, args))
        try:
            return tuner.prune_configs(dict(constexprs))[0]
        finally:
            tuner.nargs = None

    def _first_launch(self, key, grid, args, constexprs):
        config = self.config_for(args, constexprs)
        if self.autotuner is not None and config is None:
            compiled = self.autotuner[grid](*args, **constexprs)
            config = self.autotuner.best_config
        elif config is not None:
            compiled = self.jit[grid](*args, **constexprs, **config.all_kwargs())
        else:
            compiled = self.jit[grid](*args, **constexprs)
        if compiled is None or not hasattr(compiled, "packed_metadata"):
            return  # not a compiled kernel (an unexpected Triton): keep going through Triton
        config_kwargs = config.kwargs if config is not None else {}
        values = {**constexprs, **config_kwargs}
        if set(values) != set(self.constexpr_names):
            return
        tail = tuple(values[name] for name in self.constexpr_names)
        # The grid only ever reads the config's block sizes and the constexprs: a fixed dict.
        meta = {**values} if config is not None else None
        self._kernels[key] = (compiled.run, compiled.function, compiled.packed_metadata, meta, tail)

    def clear(self):
        self._kernels.clear()
        self._exact.clear()
        self._layout_by_count.clear()
        self._bound.clear()


_DTYPE = operator.attrgetter("dtype")
_DATA_PTR = torch.Tensor.data_ptr


class BoundLaunch:
    """One kind of launch with its integer arguments, constexprs and grid fixed (a launch plan's): a call
    passes only its tensors, ``bound(*tensors)``, and the non-tensor arguments follow them.

    A repeated call costs a key of the device and the tensors' dtypes, and a check that every tensor is
    16-byte aligned (then Triton's alignment specialisation is the same as at the first call); the
    compiled kernel and grid are kept in the kernel's DirectLauncher (``clear`` forgets them too).
    Anything else (a misaligned tensor, the interpreter, a launch hook, the first call of a key) goes
    through the DirectLauncher's own path.
    """

    __slots__ = ("launcher", "grid", "ints", "constexprs")

    def __init__(self, kernel, grid, ints: tuple, constexprs: dict):
        self.launcher = launcher(kernel)
        self.grid = grid
        self.ints = tuple(ints)
        self.constexprs = constexprs

    def __call__(self, *tensors):
        if through_triton() or reduce(or_, map(_DATA_PTR, tensors)) & 15:
            self.launcher(self.grid, tensors + self.ints, self.constexprs)
            return
        active = driver.active
        device = active.get_current_device()
        bound = self.launcher._bound
        key = (self, device, tuple(map(_DTYPE, tensors)))
        entry = bound.get(key)
        if entry is None:
            entry = self.launcher(self.grid, tensors + self.ints, self.constexprs)
            if entry is not None:
                if len(bound) >= _MAX_EXACT_KEYS:
                    bound.clear()
                bound[key] = entry
            return
        run, function, packed_metadata, grid, tail = entry
        run(*grid, active.get_current_stream(device), function, packed_metadata, None, None, None, *tensors,
            *self.ints, *tail)


_LAUNCHERS: dict = {}


def launcher(kernel) -> Callable:
    """The DirectLauncher of a kernel (one per kernel object)."""
    found = _LAUNCHERS.get(id(kernel))
    if found is None:
        found = _LAUNCHERS[id(kernel)] = DirectLauncher(kernel)
    return found
