"""Give the weights' and the KV pool's memory back to the operating system and take it again
(SGLang's /release_memory_occupation and /resume_memory_occupation; issue #15).

An RL trainer shares the machine with the rollout engines: while it trains, the engines
should hold no memory. On CPU, "release" is `madvise` on the tensors' own pages, so every
address stays the same and whatever holds one (the runner, the prefix cache's page ids, a
transfer engine's registered KV region, the tensor-parallel shared segments) stays valid:

- kv_cache: the pool's contents are disposable once no request runs and the prefix cache is
  empty, so its pages are dropped (MADV_REMOVE for a shared-memory pool, which frees the
  segment's pages; MADV_DONTNEED for private memory). They come back zero-filled on first
  touch; resume walks them in again from a background thread, as at start-up.
- weights: the bytes are written to a spool file on disk first (the trainer may have pushed
  weights no checkpoint holds), then dropped; resume reads them back into the same addresses.
  The copies derived from them (oneDNN's prepacked weights, opaque tensors with no storage to
  spool; the 4-bit grid) are freed at release and rebuilt from the restored weights at resume.

Only whole pages inside a tensor are dropped; the partial pages at its two ends stay.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.enums import StrEnum

logger = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_MADV_REMOVE = 9
_SPOOL_CHUNK = 64 << 20


class MemoryTag(StrEnum):
    WEIGHTS = "weights"
    KV_CACHE = "kv_cache"


def parse_tags(tags: list[str] | None) -> list[MemoryTag]:
    """SGLang's `tags` field: None means both."""
    if tags is None:
        return [MemoryTag.WEIGHTS, MemoryTag.KV_CACHE]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError("tags must be a list of strings")
    out = []
    for t in tags:
        try:
            out.append(MemoryTag(t))
        except ValueError:
            raise ValueError(f"unknown memory tag {t!r}; one of {[m.value for m in MemoryTag]}") from None
    return out


def _libc_madvise():
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def _inner_pages(ptr: int, nbytes: int) -> tuple[int, int]:
    page = mmap.PAGESIZE
    lo = -(-ptr // page) * page
    hi = (ptr + nbytes) // page * page
    return lo, max(lo, hi)


def drop_pages(ptr: int, nbytes: int) -> int:
    """Give the whole pages of [ptr, ptr + nbytes) back to the OS; returns the bytes dropped."""
    lo, hi = _inner_pages(ptr, nbytes)
    if hi <= lo:
        return 0
    madvise = _libc_madvise()
    if madvise(lo, hi - lo, _MADV_REMOVE) != 0:  # EINVAL on private memory
        if madvise(lo, hi - lo, _MADV_DONTNEED) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise failed: {os.strerror(err)}")
    return hi - lo


def unique_storages(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(data pointer, bytes) of each distinct storage behind `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or t.device.type != "cpu" or t.layout != torch.strided:
            continue
        st = t.untyped_storage()
        seen.setdefault(st.data_ptr(), st.nbytes())
    return sorted(seen.items())


@dataclass
class MemoryReleaser:
    """Releases and resumes one process's weights and KV pool (see the module's doc)."""

    weight_tensors: Callable[[], list[torch.Tensor]]  # asked at each release: updates replace tensors
    kv_tensors: list[torch.Tensor]
    # copies derived from the weights that cannot be spooled (oneDNN's prepacked weights are
    # opaque tensors): dropped at release, rebuilt from the restored weights at resume
    drop_derived: Callable[[], None] = lambda: None
    rebuild_derived: Callable[[], None] = lambda: None
    spool_dir: str | None = None
    released: set[MemoryTag] = field(default_factory=set)
    _spool_path: str | None = None
    _regions: list[tuple[int, int]] = field(default_factory=list)
    _prefaults: list = field(default_factory=list)  # threads walking the pool in again

    def release(self, tags: list[MemoryTag]) -> dict[str, float]:
        t0 = time.perf_counter()
        dropped = 0
        for tag in tags:
            if tag in self.released:
                continue
            if tag is MemoryTag.WEIGHTS:
                dropped += self._release_weights()
            else:
                for ptr, nbytes in unique_storages(self.kv_tensors):
                    dropped += drop_pages(ptr, nbytes)
            self.released.add(tag)
        return {"bytes_released": dropped, "seconds": time.perf_counter() - t0}

    def resume(self, tags: list[MemoryTag]) -> dict[str, float]:
        t0 = time.perf_counter()
        for tag in tags:
            if tag not in self.released:
                continue
            if tag is MemoryTag.WEIGHTS:
                self._resume_weights()
            else:
                from pdserve.engine.runner import prefault

                for t in self.kv_tensors:
                    th = prefault(t) if t is not None else None
                    if th is not None:
                        self._prefaults.append(th)
            self.released.discard(tag)
        return {"seconds": time.perf_counter() - t0}

    def _release_weights(self) -> int:
        self.drop_derived()
        self._regions = unique_storages(self.weight_tensors())
        fd, path = tempfile.mkstemp(prefix="pdserve-weights-", suffix=".bin", dir=self.spool_dir)
        self._spool_path = path
        dropped = 0
        with os.fdopen(fd, "wb") as f:
            for ptr, nbytes in self._regions:
                for off in range(0, nbytes, _SPOOL_CHUNK):
                    f.write(ctypes.string_at(ptr + off, min(_SPOOL_CHUNK, nbytes - off)))
            f.flush()
            os.fsync(f.fileno())
        for ptr, nbytes in self._regions:
            dropped += drop_pages(ptr, nbytes)
        # the spool file's pages need not stay in the page cache either
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        logger.info(
            "released weights: %d regions, %.0f MiB spooled to %s",
            len(self._regions),
            sum(n for _, n in self._regions) / 2**20,
            path,
        )
        return dropped

    def _resume_weights(self) -> None:
        path = self._spool_path
        assert path is not None
        with open(path, "rb") as f:
            for ptr, nbytes in self._regions:
                for off in range(0, nbytes, _SPOOL_CHUNK):
                    n = min(_SPOOL_CHUNK, nbytes - off)
                    buf = (ctypes.c_char * n).from_address(ptr + off)
                    if f.readinto(buf) != n:
                        raise OSError(f"weights spool {path} is truncated")
        os.unlink(path)
        self._spool_path = None
        self._regions = []
        self.rebuild_derived()

    def close(self) -> None:
        for th in self._prefaults:  # a daemon thread inside madvise at interpreter exit can abort it
            th.join(10)
        self._prefaults = []
        if self._spool_path is not None and os.path.exists(self._spool_path):
            os.unlink(self._spool_path)
