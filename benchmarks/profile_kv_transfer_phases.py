"""Where the time of one small pdserve transfer goes (docs/benchmarks.md, "Transfer engines"):
prefill (this process) and decode (a spawned one) as in bench_kv_transfer.py, warmed up with
8 small requests (every transfer worker's connection open), then per request the medians of:
send() returning, a worker picking the job up, decode's first byte (tcp) or write grant
(one-sided engines), decode's Success. Times from prefill's send() call, CLOCK_MONOTONIC.

    python benchmarks/profile_kv_transfer_phases.py tcp,nixl,mooncake 12 [sizes in MB, default 1,4]

gloo also reports its own steps per transfer (ms, medians): prefill's gather into staging and
the gloo send, decode's gloo receive (waiting for prefill's gather included) and its scatter.
"""

import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kv_transfer as B
from pdserve.disagg.transfer.bootstrap import KVBootstrapServer
from pdserve.disagg.metadata import KVMetadata
from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer.base import KVArgs
from pdserve.disagg.transfer.registry import KVClassType, get_kv_class
from pdserve.disagg.transfer import prefill_service as PS

T = {}
STEPS: dict[str, float] = {}  # gloo: seconds per step of the current transfer (this process)


def _timed(obj, name: str, key: str) -> None:
    orig = getattr(obj, name)

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return orig(*a, **kw)
        finally:
            STEPS[key] = STEPS.get(key, 0.0) + time.perf_counter() - t

    setattr(obj, name, wrapper)


def patch_gloo() -> None:
    from pdserve.disagg.transfer import gloo_backend as G

    _timed(G, "gather_pages", "gather")
    _timed(G, "scatter_pages", "scatter")
    _timed(G.GlooPrefillMover, "write", "write")
    _timed(G.GlooDecodeMover, "receive", "receive")


def patch():
    orig_run = PS.PrefillTransferService._run_job

    def run_job(self, sock, job, scratch):
        T.setdefault("pickup", time.monotonic())
        return orig_run(self, sock, job, scratch)

    PS.PrefillTransferService._run_job = run_job
    patch_gloo()


def decode_main(backend, num_pages, conn):
    from pdserve.engine.shm_segment import allocate_kv_buffer, new_shm_name

    patch_gloo()
    shm_name = new_shm_name() if backend == "shm" else None  # shm: decode's pool is a segment
    kv = allocate_kv_buffer((num_pages, *B.PAGE_SHAPE), B.DTYPE, shm_name)
    kv.fill_(0)
    mgr = get_kv_class(backend, KVClassType.MANAGER)(KVArgs(0, kv, shm_name=shm_name), DisaggregationMode.DECODE)
    rc = get_kv_class(backend, KVClassType.RECEIVER)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            break
        room, pages, addr = msg
        r = rc(mgr, addr, room)
        B._wait(r, {KVPoll.WaitingForInput})
        r.init(pages)
        while not r.registered.is_set():
            time.sleep(0.001)
        STEPS.clear()
        conn.send("inited")
        B._wait(r, {KVPoll.Success, KVPoll.Failed}, step=0.002)
        conn.send((r._t_first_byte, r.completed_at, dict(STEPS)))
    mgr.shutdown()
    if shm_name:
        from pdserve.engine.shm_segment import free_kv_buffer

        free_kv_buffer(shm_name)


def main(backend, size_mb, reps):
    patch()
    page_nbytes = int(np.prod(B.PAGE_SHAPE)) * 2
    npages = max(1, round(size_mb * 2**20 / page_nbytes))
    num_pages = 3 * npages + 16
    src_kv = torch.randn((num_pages, *B.PAGE_SHAPE)).to(B.DTYPE)
    bs = KVBootstrapServer("127.0.0.1", 0)
    pm = get_kv_class(backend, KVClassType.MANAGER)(
        KVArgs(0, src_kv, bootstrap_port=bs.port), DisaggregationMode.PREFILL
    )
    pm.wait_registered(30)
    sc = get_kv_class(backend, KVClassType.SENDER)
    a, b = mp.Pipe()
    p = mp.get_context("spawn").Process(target=decode_main, args=(backend, num_pages, b), daemon=True)
    p.start()
    assert a.recv() == "ready"
    rng = np.random.default_rng(0)
    rows, steps = [], []
    for i in range(reps + 8):
        room = 100 + i
        n = npages if i >= 8 else 4
        src = rng.permutation(num_pages)[:n]
        dst = rng.permutation(num_pages)[:n]
        s = sc(pm, bs.addr, room)
        a.send((room, dst.tolist(), bs.addr))
        assert a.recv() == "inited"
        B._wait(s, {KVPoll.WaitingForInput})
        s.init(n)
        T.clear()
        STEPS.clear()
        t0 = time.monotonic()
        s.send(src, KVMetadata(room, 1))
        t_sent = time.monotonic()
        tfb, tdone, dsteps = a.recv()
        if i >= 8:
            rows.append(((T["pickup"] - t0) * 1e3, (tfb - t0) * 1e3, (tdone - t0) * 1e3, (t_sent - t0) * 1e3))
            steps.append({**STEPS, **{f"decode {k}": v for k, v in dsteps.items()}})
    a.send(None)
    p.join(10)
    pm.shutdown()
    bs.close()
    med = [statistics.median(c) for c in zip(*rows)]
    print(
        f"{backend} {size_mb}MB: send() {med[3]:.3f} ms, worker pickup {med[0]:.3f}, decode first byte {med[1]:.3f}, done {med[2]:.3f} ms -> {npages * page_nbytes / med[2] / 1e6:.2f} GB/s"
    )
    if steps and steps[0]:
        keys = sorted({k for st in steps for k in st})
        print(
            "   steps (ms): "
            + ", ".join(f"{k} {statistics.median(st.get(k, 0) for st in steps) * 1e3:.2f}" for k in keys)
        )


if __name__ == "__main__":
    sizes = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "1,4").split(",")]
    for be in sys.argv[1].split(","):
        for s in sizes:
            main(be, s, int(sys.argv[2]))
