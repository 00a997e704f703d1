"""Tensors in named POSIX shared memory: KV pools that another process maps (the decode pool
of the shm transfer backend, every rank's pool under tp in PD mode) and the tp all-reduce buffer.

Why not `multiprocessing.shared_memory`: before Python 3.13 every process that merely
attaches a segment registers it with a resource tracker, which unlinks it (and warns) when
that process exits, under the owner's feet. The owner here is the decode process alone: it
creates and unlinks; prefill only maps. So we call the same primitive (`_posixshmem`,
CPython's shm_open/shm_unlink) and `mmap` directly.

Leaks: a segment is unlinked by `free_kv_buffer`, at interpreter exit (atexit), and, for a
process that died without either (SIGKILL), by `cleanup_stale_segments()` run on every
allocation: segment names carry the owner's pid.
"""

from __future__ import annotations

import atexit
import logging
import mmap
import os
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from math import prod

import torch

try:
    import _posixshmem
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "pdserve-kv-"
_NAME_RE = re.compile(r"^pdserve-kv-(\d+)-[0-9a-f]{8,64}$")
_SHM_DIR = "/dev/shm"
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault pages in now, not on first copy


@dataclass
class _Segment:
    name: str
    mm: mmap.mmap
    data_ptr: int
    nbytes: int


_lock = threading.Lock()
_owned: dict[str, _Segment] = {}  # created by this process


def _require_shm() -> None:
    if _posixshmem is None:
        raise ValueError("the shm KV transfer backend needs POSIX shared memory (Linux or macOS)")


def new_shm_name() -> str:
    """A fresh segment name: pdserve-kv-<pid>-<random hex>."""
    return f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"


def check_shm_name(name: str) -> re.Match:
    m = _NAME_RE.match(name)
    if m is None:
        raise ValueError(f"shm segment name {name!r} must look like {SEGMENT_PREFIX}<pid>-<hex>")
    return m


def allocate_kv_buffer(
    shape: tuple[int, ...], dtype: torch.dtype, shm_name: str | None = None, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The engine's KV pool tensor, zeroed. With `shm_name` (see `new_shm_name`) it lives in
    that shared-memory segment so a same-host prefill can write pages into it directly."""
    if shm_name is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    _require_shm()
    if torch.device(device).type != "cpu":
        raise ValueError("a shared-memory KV buffer lives in host memory: device must be cpu")
    check_shm_name(shm_name)
    nbytes = prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes <= 0:
        raise ValueError(f"empty KV buffer shape {shape}")
    cleanup_stale_segments()
    fd = _posixshmem.shm_open("/" + shm_name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        _posixshmem.shm_unlink("/" + shm_name)
        raise
    finally:
        os.close(fd)
    t = torch.frombuffer(mm, dtype=torch.uint8).view(dtype).view(shape)  # shm pages are zero-filled
    with _lock:
        _owned[shm_name] = _Segment(shm_name, mm, t.data_ptr(), nbytes)
    logger.info("KV buffer of %.1f MiB in shared memory segment %s", nbytes / 2**20, shm_name)
    return t


def free_kv_buffer(shm_name: str) -> None:
    """Unlink the segment (idempotent). Existing mappings stay valid until dropped."""
    with _lock:
        seg = _owned.pop(shm_name, None)
    if seg is None:
        return
    try:
        _posixshmem.shm_unlink("/" + shm_name)
    except FileNotFoundError:
        pass


def segment_of(t: torch.Tensor) -> str | None:
    """Name of the owned segment `t` covers exactly, if any."""
    nbytes = t.numel() * t.element_size()
    with _lock:
        for seg in _owned.values():
            if seg.data_ptr == t.data_ptr() and seg.nbytes == nbytes:
                return seg.name
    return None


def owned_segments() -> list[str]:
    with _lock:
        return list(_owned)


@atexit.register
def _free_all() -> None:
    for name in owned_segments():
        free_kv_buffer(name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale_segments() -> list[str]:
    """Unlink pdserve segments whose owner process no longer exists (Linux: /dev/shm)."""
    if _posixshmem is None or not os.path.isdir(_SHM_DIR):
        return []
    removed = []
    for fname in os.listdir(_SHM_DIR):
        m = _NAME_RE.match(fname)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            _posixshmem.shm_unlink("/" + fname)
            removed.append(fname)
        except OSError:
            pass
    if removed:
        logger.warning("removed %d stale KV shared-memory segments: %s", len(removed), removed)
    return removed


class SegmentMaps:
    """Prefill's mappings of decode segments, opened once per name (bounded LRU)."""

    def __init__(self, limit: int = 64) -> None:
        self._maps: OrderedDict[str, tuple[mmap.mmap, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.limit = limit

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """`name` mapped as a tensor of `shape`; ValueError when it is missing or the wrong size."""
        _require_shm()
        check_shm_name(name)
        with self._lock:
            hit = self._maps.get(name)
            if hit is not None and tuple(hit[1].shape) == tuple(shape) and hit[1].dtype == dtype:
                self._maps.move_to_end(name)
                return hit[1]
        nbytes = prod(shape) * torch.empty((), dtype=dtype).element_size()
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, 0)
        except FileNotFoundError:
            raise ValueError(
                f"shm segment {name} not found: is decode on another host? (use the tcp backend)"
            ) from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                raise ValueError(f"shm segment {name} belongs to another user")
            if st.st_size != nbytes:
                raise ValueError(f"shm segment {name} has {st.st_size} bytes, decode's pool needs {nbytes}")
            mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        t = torch.frombuffer(mm, dtype=torch.uint8).view(dtype).view(shape)
        with self._lock:
            self._maps[name] = (mm, t)
            while len(self._maps) > self.limit:
                self._maps.popitem(last=False)  # the mapping goes when its last tensor does
        return t

    def clear(self) -> None:
        with self._lock:
            self._maps.clear()
