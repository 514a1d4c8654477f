"""The package's C functions for CPU tensors (keep_mask_cpu.c, decode_cpu.c): built once per machine, then loaded.

A source is compiled with the machine's C compiler ($CC, else cc, gcc or clang, the compiler Triton itself needs
for its launchers) into $PREFIX_ATTN_CACHE_DIR, else $XDG_CACHE_HOME/prefix_attn or ~/.cache/prefix_attn, under a
name that hashes the source, the compiler and the flags, so a build is reused by every later process and a changed
source builds anew. When no compiler is found or the build fails, the caller computes the same result with torch or
NumPy (slower), after one warning that says why.
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
from typing import Optional, Sequence

FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99")


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


def library_path(stem: str, compiler: str, source: bytes, flags: Sequence[str] = FLAGS) -> Path:
    """Where the build of ``source`` by ``compiler`` lives: the name hashes everything the binary depends on."""
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                     sys.platform.encode(), os.uname().machine.encode()])).hexdigest()[:20]
    return cache_dir() / f"{stem}-{key}.so"


def build(compiler: str, source: Path, target: Path, flags: Sequence[str] = FLAGS, libraries: Sequence[str] = ()):
    """Compile ``source`` into ``target``: into a temporary file beside it, then renamed, so that processes building
    at once (pytest-xdist workers) never load a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=target.stem, suffix=".so.partial", dir=target.parent)
    os.close(handle)
    try:
        done = subprocess.run([compiler, *flags, "-o", partial, str(source), *libraries], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


class CFunction:
    """One exported function of a C source beside this module, built and loaded on the first ``get()``.

    ``get()`` gives the ctypes function, or None when it cannot be built or loaded; then, once per process, a
    RuntimeWarning "prefix_attn: <what> could not be built (<why>); <instead>", and ``unavailable`` says why.
    ``libraries``: linker arguments after the source (``-lm``).
    """

    def __init__(self, source_name: str, entry: str, argtypes: list, restype, what: str, instead: str,
                 libraries: Sequence[str] = ()):
        self.source = Path(__file__).with_name(source_name)
        self.entry, self.argtypes, self.restype = entry, argtypes, restype
        self.what, self.instead, self.libraries = what, instead, tuple(libraries)
        self.reset()

    def reset(self) -> None:
        """Forget the loaded function, as in a new process (tests)."""
        self.loaded = False
        self.function = None
        self.unavailable: Optional[str] = None

    def library_path(self, compiler: str) -> Path:
        return library_path(self.source.stem, compiler, self.source.read_bytes(), FLAGS + self.libraries)

    def get(self):
        if self.loaded:
            return self.function
        self.loaded = True
        compiler = find_compiler()
        try:
            if compiler is None:
                raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
            target = self.library_path(compiler)
            if not target.exists():
                build(compiler, self.source, target, FLAGS, self.libraries)
            function = getattr(ctypes.CDLL(str(target)), self.entry)
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as error:
            self.unavailable = str(error)
            warnings.warn(f"prefix_attn: {self.what} could not be built ({error}); {self.instead}", RuntimeWarning,
                          stacklevel=3)
            return None
        function.restype = self.restype
        function.argtypes = self.argtypes
        self.function = function
        return function
