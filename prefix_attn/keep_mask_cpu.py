"""The C draw of the dropout keep-mask for CPU tensors (keep_mask_cpu.c): built once per machine, then loaded.

The torch backend draws an op call's keep-mask on the host, once per layer call in training. In NumPy that is
about thirty array calls (three per Philox round), each a few microseconds of dispatch, and inside a training
step, with the caches full of the model's own work, the draw cost twice what it costs in a loop: at the
quick sweep's GPT-2 shape it was the largest part of the op's host time. The C draw is one call of a few
microseconds plus the arithmetic. It gives the same bits as the NumPy draw and the Triton kernels (tested).

The source is compiled with the machine's C compiler ($CC, else cc, gcc or clang, the compiler Triton itself
needs for its launchers) into $PREFIX_ATTN_CACHE_DIR, else $XDG_CACHE_HOME/prefix_attn or
~/.cache/prefix_attn, under a name that hashes the source, the compiler and the flags, so a build is reused by
every later process and a changed source builds anew. When no compiler is found or the build fails, the draw
is NumPy's (the same bits, slower), with one warning that says why.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("keep_mask_cpu.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99")
_ENTRY = "prefix_attn_keep_mask_grid"
# The built function, None when it cannot be built (then _UNAVAILABLE says why); _LOADED: tried once.
_LOADED = False
_FUNCTION = None
_UNAVAILABLE: Optional[str] = None


def cache_dir() -> Path:
    explicit = os.environ.get("PREFIX_ATTN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prefix_attn"


def find_compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name:
            found = shutil.which(name)
            if found:
                return found
    return None


def library_path(compiler: str, source: bytes) -> Path:
    """Where the build of ``source`` by ``compiler`` lives: the name hashes everything the binary depends on."""
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(),
                                     sys.platform.encode(), os.uname().machine.encode()])).hexdigest()[:20]
    return cache_dir() / f"keep_mask_cpu-{key}.so"


def build(compiler: str, target: Path) -> None:
    """Compile SOURCE into ``target``: into a temporary file beside it, then renamed, so that processes building
    at once (pytest-xdist workers) never load a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=target.stem, suffix=".so.partial", dir=target.parent)
    os.close(handle)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", partial, str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _load():
    """The C function, or None (after one warning) when it cannot be built or loaded."""
    global _LOADED, _FUNCTION, _UNAVAILABLE
    _LOADED = True
    compiler = find_compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
        target = library_path(compiler, SOURCE.read_bytes())
        if not target.exists():
            build(compiler, target)
        function = getattr(ctypes.CDLL(str(target)), _ENTRY)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _UNAVAILABLE = str(error)
        warnings.warn(f"prefix_attn: the C dropout keep-mask for CPU tensors could not be built ({error}); "
                      "drawing it with NumPy instead (the same bits, more host time per call)", RuntimeWarning,
                      stacklevel=3)
        return None
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_uint64, ctypes.c_uint64, *(ctypes.c_int64,) * 6, ctypes.c_uint32, ctypes.c_void_p]
    _FUNCTION = function
    return function


def unavailable_reason() -> Optional[str]:
    """Why the C draw could not be built or loaded (None when it was, or has not been tried)."""
    return _UNAVAILABLE


def keep_mask_grid(seed: int, offset: int, n_heads_total: int, seqlen_q: int, rows: slice, n_prefix: int,
                   n_keys: int, threshold: int) -> Optional[torch.Tensor]:
    """dropout.keep_mask_grid for CPU tensors with the 16-bit ``threshold``, drawn in C; None when the C draw is
    unavailable (the caller draws with NumPy)."""
    function = _FUNCTION if _LOADED else _load()
    if function is None:
        return None
    keep = torch.empty((n_heads_total, rows.stop - rows.start, n_prefix + n_keys), dtype=torch.bool)
    if keep.numel() and function(seed, offset, n_heads_total, seqlen_q, rows.start, rows.stop, n_prefix, n_keys,
                                 threshold, keep.data_ptr()):
        raise MemoryError("prefix_attn: out of memory drawing the dropout keep-mask")
    return keep
