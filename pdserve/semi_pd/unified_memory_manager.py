"""The unified KV block pool of Semi-PD: one paged pool that the prefill and decode workers
share, with block allocation atomic across processes.

    umm = UnifiedMemoryManager(total_blocks=1000, block_size=4096, page_size=16, device="cpu")
    ids = umm.allocate_kv_cache_blocks("req-1", layer_id=0, num_blocks=4,
                                       requester_role=InstanceRole.PREFILL)     # or None
    umm.get_block_table_index("req-1", 0)          # the same ids, in allocation order
    k_v = umm.access_kv_cache("req-1", 0, InstanceRole.DECODE)  # [4, 2, page_size, width] views
    umm.deallocate_kv_cache_blocks("req-1")
    other = UnifiedMemoryManager.attach(umm.name)  # in another process: same blocks, zero copy

A block holds the K and V of `page_size` tokens of one layer in `block_size` bytes
(`[2, page_size, width]` elements of `dtype`, width = block_size / (2 * page_size * itemsize)).

Everything lives in one named POSIX shared-memory segment (`engine/shm_segment.py`,
the segment the shm transfer backend and the tp workers use: pid-named, unlinked at exit and
by the next creator when its owner died):

    header   int64[8]    magic, version, total_blocks, block_size, page_size, dtype, free_top, -
    free     int32[N]    a stack of free block ids; free[:free_top] are free (LIFO: warm blocks first)
    owner    uint64[N]   8-byte hash of the request id owning the block, 0 = not owned
    layer    int32[N]    layer of the block
    seq      int32[N]    position of the block in its (request, layer) block table
    role     int8[N]     InstanceRole of the process that allocated it
    data     bytes       N * block_size, 4 KiB aligned

Atomicity: every read-modify-write of the tables holds `flock` on the segment's file (one
open file description per manager, so processes exclude each other; the kernel drops the
lock of a process that dies) and a thread lock (flock does not exclude threads sharing a
descriptor). Order of writes, so that a process killed in the middle leaks blocks but never
hands one out twice: allocation takes blocks off the stack before marking them owned;
freeing unmarks them before pushing them back. `reclaim_lost_blocks()` returns such leaks.

Request ids are identified by a 64-bit BLAKE2b hash: two ids colliding would share a table
(probability ~ n^2 / 2^65 for n live requests).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from collections import Counter
from typing import Iterator

import numpy as np
import torch

from pdserve.config import unified_memory_geometry_error
from pdserve.engine.shm_segment import SegmentMaps, allocate_kv_buffer, free_kv_buffer, new_shm_name
from pdserve.semi_pd.roles import InstanceRole

logger = logging.getLogger(__name__)

MAGIC = 0x5044534D5045_4D4D  # "PDSMPEMM"
VERSION = 1
_H_MAGIC, _H_VERSION, _H_BLOCKS, _H_BLOCK_SIZE, _H_PAGE_SIZE, _H_DTYPE, _H_FREE_TOP = range(7)
_HEADER_BYTES = 64
_DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
_SHM_DIR = "/dev/shm"


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _layout(total_blocks: int, block_size: int) -> dict[str, int]:
    """Byte offsets of each table in the segment, and its size."""
    off = {"free": _HEADER_BYTES}
    off["owner"] = _align(off["free"] + 4 * total_blocks, 8)
    off["layer"] = off["owner"] + 8 * total_blocks
    off["seq"] = off["layer"] + 4 * total_blocks
    off["role"] = off["seq"] + 4 * total_blocks
    off["data"] = _align(off["role"] + total_blocks, 4096)
    off["size"] = off["data"] + total_blocks * block_size
    return off


def request_key(request_id: str) -> int:
    """The nonzero 64-bit key of a request id in the owner table."""
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
    k = int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")
    return k or 1


class UnifiedMemoryManager:
    """KV blocks shared by the prefill and decode workers (see the module docstring).

    The creating process owns the segment (unlinks it on `close()` and at exit); other
    processes `attach(name)`. All methods are safe to call from several threads and processes.
    """

    def __init__(
        self,
        total_blocks: int = 1000,
        block_size: int = 4096,
        page_size: int = 16,
        device: str | torch.device = "cpu",
        *,
        dtype: torch.dtype = torch.float32,
        _attach: str | None = None,
    ) -> None:
        if torch.device(device).type != "cpu":
            raise ValueError(
                f"device {str(device)!r}: this build keeps the unified KV pool in host shared memory; "
                f"use device='cpu' (CUDA IPC handles are not implemented)"
            )
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"dtype must be one of {list(_DTYPE_CODES)}, got {dtype}")
        for name, v in (("total_blocks", total_blocks), ("block_size", block_size), ("page_size", page_size)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        err = unified_memory_geometry_error(total_blocks, block_size, page_size, torch.empty((), dtype=dtype).itemsize)
        if err:
            field, why = err
            param = {
                "unified_memory_blocks": "total_blocks",
                "unified_memory_block_size": "block_size",
                "unified_memory_page_size": "page_size",
            }[field]
            raise ValueError(f"{param} (--{field.replace('_', '-')}): {why}")
        self.total_blocks = total_blocks
        self.block_size = block_size
        self.page_size = page_size
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.width = block_size // (2 * page_size * torch.empty((), dtype=dtype).itemsize)
        self._layout = _layout(total_blocks, block_size)
        self._owner_of_segment = _attach is None
        if _attach is None:
            self.name = new_shm_name()
            self._avail_check(self._layout["size"])
            self._buf = allocate_kv_buffer((self._layout["size"],), torch.uint8, self.name)
        else:
            self.name = _attach
            self._maps = SegmentMaps(limit=1)
            self._buf = self._maps.get(_attach, (self._layout["size"],), torch.uint8)
        raw = self._buf.numpy()
        lay = self._layout
        n = total_blocks
        self._hdr = raw[:_HEADER_BYTES].view(np.int64)
        self._free = raw[lay["free"] : lay["free"] + 4 * n].view(np.int32)
        self._owner = raw[lay["owner"] : lay["owner"] + 8 * n].view(np.uint64)
        self._layer = raw[lay["layer"] : lay["layer"] + 4 * n].view(np.int32)
        self._seq = raw[lay["seq"] : lay["seq"] + 4 * n].view(np.int32)
        self._role = raw[lay["role"] : lay["role"] + n].view(np.int8)
        # kv[i]: block i as [2 (K, V), page_size, width]
        self.kv = self._buf[lay["data"] :].view(dtype).view(n, 2, page_size, self.width)
        self._tlock = threading.Lock()
        self._lock_fd = os.open(os.path.join(_SHM_DIR, self.name), os.O_RDWR)
        self._accesses: Counter[InstanceRole] = Counter()  # this process's access_kv_cache calls
        self._closed = False
        if _attach is None:
            with self._locked():
                self._hdr[:7] = (MAGIC, VERSION, n, block_size, page_size, _DTYPE_CODES[dtype], n)
                self._free[:] = np.arange(n - 1, -1, -1, dtype=np.int32)  # block 0 on top
            logger.info(
                "unified KV pool %s: %d blocks x %d bytes (%d tokens/block), %.1f MiB",
                self.name,
                n,
                block_size,
                page_size,
                n * block_size / 2**20,
            )

    @staticmethod
    def _avail_check(nbytes: int) -> None:
        try:
            st = os.statvfs(_SHM_DIR)
        except OSError:
            raise ValueError(f"the unified KV pool needs POSIX shared memory ({_SHM_DIR})") from None
        avail = st.f_bavail * st.f_frsize
        if nbytes > avail:
            raise ValueError(
                f"total_blocks (--unified-memory-blocks): the pool needs {nbytes / 2**20:.1f} MiB of "
                f"shared memory and {_SHM_DIR} has {avail / 2**20:.1f} MiB free"
            )

    @classmethod
    def attach(cls, name: str) -> "UnifiedMemoryManager":
        """The pool created by another process, by its segment name (zero copy)."""
        path = os.path.join(_SHM_DIR, name)
        try:
            with open(path, "rb") as f:
                hdr = np.frombuffer(f.read(_HEADER_BYTES), dtype=np.int64)
        except FileNotFoundError:
            raise ValueError(f"unified KV pool {name!r} not found (its creator exited?)") from None
        if len(hdr) < 7 or int(hdr[_H_MAGIC]) != MAGIC or int(hdr[_H_VERSION]) != VERSION:
            raise ValueError(f"{name!r} is not a unified KV pool of this pdserve version")
        return cls(
            int(hdr[_H_BLOCKS]),
            int(hdr[_H_BLOCK_SIZE]),
            int(hdr[_H_PAGE_SIZE]),
            "cpu",
            dtype=_DTYPES[int(hdr[_H_DTYPE])],
            _attach=name,
        )

    # ---- locking ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._closed:
            raise RuntimeError("the unified memory manager is closed")
        with self._tlock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # ---- the seed's API -----------------------------------------------------------------
    def allocate_kv_cache_blocks(
        self, request_id: str, layer_id: int, num_blocks: int, requester_role: InstanceRole | str
    ) -> list[int] | None:
        """`num_blocks` more blocks for (request, layer), appended to its block table; all or
        nothing: None (and nothing taken) when fewer are free."""
        key = request_key(request_id)
        role = InstanceRole.of(requester_role)
        if isinstance(layer_id, bool) or not isinstance(layer_id, int) or not (0 <= layer_id < 2**31):
            raise ValueError(f"layer_id must be an integer >= 0, got {layer_id!r}")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
        if num_blocks == 0:
            return []
        with self._locked():
            top = int(self._hdr[_H_FREE_TOP])
            if num_blocks > top:
                logger.warning(
                    "Failed to allocate KV cache blocks: %s wants %d blocks for layer %d, %d of %d free",
                    role.name.lower(),
                    num_blocks,
                    layer_id,
                    top,
                    self.total_blocks,
                )
                return None
            ids = self._free[top - num_blocks : top][::-1].copy()
            mine = (self._owner == np.uint64(key)) & (self._layer == layer_id)
            base = int(self._seq[mine].max()) + 1 if mine.any() else 0
            self._hdr[_H_FREE_TOP] = top - num_blocks  # off the stack first: a crash here leaks, never doubles
            self._layer[ids] = layer_id
            self._seq[ids] = np.arange(base, base + num_blocks, dtype=np.int32)
            self._role[ids] = int(role)
            self._owner[ids] = np.uint64(key)
        return ids.tolist()

    def get_block_table_index(self, request_id: str, layer_id: int) -> list[int]:
        """Block ids of (request, layer) in allocation order ([] when it has none)."""
        key = request_key(request_id)
        with self._locked():
            ids = np.flatnonzero((self._owner == np.uint64(key)) & (self._layer == layer_id))
            order = np.argsort(self._seq[ids], kind="stable")
        return ids[order].tolist()

    def access_kv_cache(self, request_id: str, layer_id: int, accessor_role: InstanceRole | str) -> torch.Tensor | None:
        """The KV blocks of (request, layer) as `[num_blocks, 2, page_size, width]`, or None
        when it has none. A view into the shared pool when the blocks are consecutive;
        otherwise a gathered copy — write through `block_views` (or `kv[i]`) instead."""
        role = InstanceRole.of(accessor_role)
        ids = self.get_block_table_index(request_id, layer_id)
        self._accesses[role] += 1
        if not ids:
            return None
        if ids == list(range(ids[0], ids[0] + len(ids))):
            return self.kv[ids[0] : ids[0] + len(ids)]
        return self.kv[torch.tensor(ids)]

    def block_views(self, request_id: str, layer_id: int, accessor_role: InstanceRole | str) -> list[torch.Tensor]:
        """One `[2, page_size, width]` view into the shared pool per block of (request, layer)."""
        role = InstanceRole.of(accessor_role)
        self._accesses[role] += 1
        return [self.kv[i] for i in self.get_block_table_index(request_id, layer_id)]

    def deallocate_kv_cache_blocks(self, request_id: str) -> int:
        """Free every block of the request (all layers); returns how many."""
        key = request_key(request_id)
        with self._locked():
            ids = np.flatnonzero(self._owner == np.uint64(key)).astype(np.int32)
            if len(ids) == 0:
                return 0
            self._owner[ids] = 0  # unmark first: a crash here leaks, never doubles
            self._role[ids] = 0
            top = int(self._hdr[_H_FREE_TOP])
            self._free[top : top + len(ids)] = ids
            self._hdr[_H_FREE_TOP] = top + len(ids)
        return len(ids)

    # ---- state --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        with self._locked():
            return int(self._hdr[_H_FREE_TOP])

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def get_memory_usage(self) -> dict:
        """Usage of the whole pool (all processes): total_memory_bytes, allocated_memory_bytes,
        utilization_ratio, and block counts by role."""
        with self._locked():
            free = int(self._hdr[_H_FREE_TOP])
            roles = np.bincount(self._role.astype(np.int64), minlength=3)
            owners = self._owner[self._owner != 0]
            num_requests = len(np.unique(owners))
        allocated = self.total_blocks - free
        return {
            "total_blocks": self.total_blocks,
            "free_blocks": free,
            "allocated_blocks": allocated,
            "block_size": self.block_size,
            "page_size": self.page_size,
            "total_memory_bytes": self.total_blocks * self.block_size,
            "allocated_memory_bytes": allocated * self.block_size,
            "utilization_ratio": allocated / self.total_blocks,
            "allocated_blocks_by_role": {r.name.lower(): int(roles[r]) for r in InstanceRole},
            "num_requests": num_requests,
            "accesses_by_role": {r.name.lower(): self._accesses[r] for r in InstanceRole},
        }

    def check_consistency(self) -> list[str]:
        """Invariant violations (empty when sound): every block is either free (on the stack,
        once) or owned, never both."""
        with self._locked():
            top = int(self._hdr[_H_FREE_TOP])
            stack = self._free[:top]
            problems = []
            if len(np.unique(stack)) != top:
                problems.append("a block is on the free stack twice")
            if top and int(np.count_nonzero(self._owner[stack])):
                problems.append("an owned block is on the free stack")
            lost = self.total_blocks - top - int(np.count_nonzero(self._owner))
            if lost:
                problems.append(f"{lost} blocks are neither free nor owned (lost)")
        return problems

    def reclaim_lost_blocks(self) -> int:
        """Return to the free stack blocks neither free nor owned (left by a process killed
        in the middle of an allocation or a free); returns how many."""
        with self._locked():
            top = int(self._hdr[_H_FREE_TOP])
            unowned = np.flatnonzero(self._owner == 0).astype(np.int32)
            lost = np.setdiff1d(unowned, self._free[:top], assume_unique=False).astype(np.int32)
            if len(lost):
                self._free[top : top + len(lost)] = lost
                self._hdr[_H_FREE_TOP] = top + len(lost)
        if len(lost):
            logger.warning("unified KV pool %s: reclaimed %d lost blocks", self.name, len(lost))
        return len(lost)

    def close(self) -> None:
        """Stop using the pool; the creator also unlinks the segment (mappings held by
        other processes stay valid until they close)."""
        if self._closed:
            return
        self._closed = True
        os.close(self._lock_fd)
        if self._owner_of_segment:
            free_kv_buffer(self.name)

    def __enter__(self) -> "UnifiedMemoryManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
