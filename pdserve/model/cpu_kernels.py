"""pdserve's own CPU kernels (pdserve/model/csrc/*.cpp), compiled on first use.

torch.utils.cpp_extension compiles them with the machine's g++ (`-O3 -march=native`) into a
cache directory keyed by the sources, the torch version and the CPU's instruction-set flags,
so the first start on a fresh machine compiles once (it says so on stderr; ~30 s on two
cores) and later starts load the cached library in well under a second. The ops land in
`torch.ops.pdserve_cpu`. docs/architecture.md, "CPU kernels".
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time

import torch

logger = logging.getLogger("pdserve.cpu_kernels")

_SOURCES = ("paged_attention.cpp", "extend_attention.cpp", "grid_linear.cpp", "elementwise.cpp")
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]
_lock = threading.Lock()
_loaded: str | None = None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def cache_dir() -> str:
    """$PDSERVE_KERNEL_CACHE, else ~/.cache/pdserve/kernels."""
    return os.environ.get("PDSERVE_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "pdserve", "kernels"
    )


def load() -> str:
    """Compile (first time) and load the kernels; returns the library's path. Raises
    RuntimeError when they cannot be built (no compiler, not an x86/ARM CPU build of torch)."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        src_dir = os.path.join(os.path.dirname(__file__), "csrc")
        sources = [os.path.join(src_dir, s) for s in _SOURCES]
        h = hashlib.sha256()
        for s in sources:
            with open(s, "rb") as f:
                h.update(f.read())
        h.update(torch.__version__.encode())
        h.update(" ".join(_CFLAGS).encode())
        h.update(_cpu_flags().encode())
        key = h.hexdigest()[:16]
        build = os.path.join(cache_dir(), key)
        lib = os.path.join(build, "pdserve_cpu_kernels.so")
        done = os.path.join(build, "built")  # written after a complete build: never load a half-linked .so
        if os.path.exists(done) and os.path.exists(lib):
            torch.ops.load_library(lib)
            _loaded = lib
            return lib
        try:
            os.makedirs(build, exist_ok=True)
        except OSError as e:
            raise RuntimeError(
                f"cannot create the kernel cache {build}: {e.strerror} "
                "(set PDSERVE_KERNEL_CACHE to a writable directory)"
            ) from None
        print(
            f"pdserve: compiling CPU kernels ({', '.join(_SOURCES)}) into {build}; once per machine, ~30 s",
            file=sys.stderr,
            flush=True,
        )
        t = time.perf_counter()
        try:
            from torch.utils import cpp_extension

            # concurrent first starts (a PD pair, TP ranks): cpp_extension's lock file in the
            # build directory lets one process compile while the others wait, then all load
            cpp_extension.load(
                name="pdserve_cpu_kernels",
                sources=sources,
                extra_cflags=_CFLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=build,
                is_python_module=False,
                verbose=False,
            )
        except Exception as e:  # noqa: BLE001 - any build failure means: no kernels here
            raise RuntimeError(f"could not build pdserve's CPU kernels: {type(e).__name__}: {e}") from e
        print(f"pdserve: CPU kernels compiled in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        tmp = f"{done}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(lib + "\n")
        os.replace(tmp, done)
        _loaded = lib
        return lib
