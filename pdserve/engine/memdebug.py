"""Memory debugging of a scheduler process, off unless `PDSERVE_MEMDUMP_DIR` is set (#10).

With it set, SIGUSR2 makes the scheduler process write `<dir>/memdump-<pid>-<n>.json`:
RSS, glibc's heap figures (mallinfo2), live Python objects by type, thread count, the
sizes of the per-request tables (scheduler, PD queues, the prefill transfer service's rooms,
decode's receivers) and, when tracemalloc runs (`PYTHONTRACEMALLOC=1`), the top allocation
sites and their growth since the previous dump. Used by benchmarks/soak/rss_probe.py.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import logging
import os
import signal
import threading
import time
import tracemalloc


logger = logging.getLogger(__name__)

ENV = "PDSERVE_MEMDUMP_DIR"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def mallinfo() -> dict:
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _MallInfo2
    m = fn()
    return {"heap_bytes": m.arena, "mmap_bytes": m.hblkhd, "in_use_bytes": m.uordblks, "free_bytes": m.fordblks}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tables(proc) -> dict:
    """Sizes of everything that holds per-request state in the scheduler process."""
    out: dict = {}
    scheduler = getattr(proc, "scheduler", None)
    if scheduler is not None:
        out.update(scheduler.table_sizes())
    pd_queues = getattr(proc, "pd_queues", None)
    if pd_queues is not None:
        out.update(pd_queues.table_sizes())
    return out


class MemDump:
    def __init__(self, proc, out_dir: str) -> None:
        self.proc, self.dir, self.n = proc, out_dir, 0
        self._prev: tracemalloc.Snapshot | None = None
        os.makedirs(out_dir, exist_ok=True)

    def dump(self) -> str:
        gc.collect()
        by_type = collections.Counter(type(o).__name__ for o in gc.get_objects())
        rec: dict = {
            "t": time.time(),
            "pid": os.getpid(),
            "rss_bytes": rss_bytes(),
            "malloc": mallinfo(),
            "threads": threading.active_count(),
            "tables": tables(self.proc),
            "objects_total": sum(by_type.values()),
            "objects_by_type": dict(by_type.most_common(40)),
        }
        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            rec["traced_bytes"] = sum(st.size for st in snap.statistics("filename"))
            rec["top_sites"] = [str(st) for st in snap.statistics("lineno")[:25]]
            if self._prev is not None:
                rec["growth_sites"] = [str(st) for st in snap.compare_to(self._prev, "lineno")[:25]]
            self._prev = snap
        self.n += 1
        path = os.path.join(self.dir, f"memdump-{os.getpid()}-{self.n}.json")
        with open(path, "w") as f:
            json.dump(rec, f, indent=1)
        return path


def install(proc) -> MemDump | None:
    """SIGUSR2 -> a dump, written by the scheduler loop's thread between steps."""
    out_dir = os.environ.get(ENV)
    if not out_dir:
        return None
    md = MemDump(proc, out_dir)

    def on_usr2(*_):
        try:
            logger.warning("memory dump written to %s", md.dump())
        except Exception:  # noqa: BLE001 - a debugging aid must not kill the server
            logger.exception("memory dump failed")

    signal.signal(signal.SIGUSR2, on_usr2)
    return md
