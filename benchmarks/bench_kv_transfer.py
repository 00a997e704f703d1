"""KV transfer bandwidth per backend (tcp, shm, gloo, nixl, mooncake) against a plain torch
copy of the same bytes, and, for the one-sided engines (nixl, mooncake), against the engine's
own API moving the same page sets with nothing of pdserve's protocol around it ("raw": the
same byte ranges, one engine call, timed on the prefill side until the engine reports the
write complete).

Prefill (this process: bootstrap server + prefill manager) and decode (a spawned process that
owns its KV pool, in shared memory for shm) are separate processes, as in production. One
sample = one request: decode allocates pages and calls init(), prefill calls send(); the time
runs from send() to the moment decode's receiver reached Success (CLOCK_MONOTONIC, shared
by both processes), so it covers the whole path: framing, sockets or the shared-memory copy,
and the completion signalling.

    python benchmarks/bench_kv_transfer.py --backends tcp,shm,gloo,nixl,mooncake --output bench_out/kv_transfer.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from pdserve.disagg.transfer.bootstrap import KVBootstrapServer
from pdserve.disagg.metadata import KVMetadata
from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer.base import KVArgs
from pdserve.disagg.transfer.prefill_service import Destination, Job
from pdserve.disagg.transfer.registry import KVClassType, get_kv_class
from pdserve.engine.shm_segment import allocate_kv_buffer, free_kv_buffer, new_shm_name

# SmolLM2-135M's KV page at page_size 16: [30 layers, 2, 16 tokens, 3 kv heads, 64] bf16 = 360 KiB
PAGE_SHAPE = (30, 2, 16, 3, 64)
DTYPE = torch.bfloat16
DONE = {KVPoll.Success, KVPoll.Failed}
RAW_ENGINES = ("nixl", "mooncake")  # one-sided: prefill's mover alone can drive the engine


def _wait(obj, states, timeout=60.0, step=0.005):
    deadline = time.monotonic() + timeout
    while (st := obj.poll()) not in states:
        if time.monotonic() > deadline:
            raise TimeoutError(f"stuck in {st.name}")
        time.sleep(step)
    return st


def decode_main(backend: str, num_pages: int, conn) -> None:
    """Decode process: for each ("recv", room, pages, addr) make a receiver, init it, report its
    completion time."""
    shm_name = new_shm_name() if backend == "shm" else None
    kv = allocate_kv_buffer((num_pages, *PAGE_SHAPE), DTYPE, shm_name)
    kv.fill_(0)  # fault every page in now (torch.zeros maps them lazily), as a long-running pool would be
    mgr = get_kv_class(backend, KVClassType.MANAGER)(KVArgs(0, kv, shm_name=shm_name), DisaggregationMode.DECODE)
    recv_cls = get_kv_class(backend, KVClassType.RECEIVER)
    conn.send(("ready", mgr.args.host, mgr.port, mgr.decode.mover.register_extra()))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            _, room, pages, addr = msg
            r = recv_cls(mgr, addr, room)
            _wait(r, {KVPoll.WaitingForInput, KVPoll.Failed})
            r.init(pages)
            conn.send(("inited", room))
            st = _wait(r, DONE)
            conn.send(("done", room, st.name, r.completed_at, r.failure_reason))
    finally:
        mgr.shutdown()
        if shm_name:
            free_kv_buffer(shm_name)


def torch_copy_gbps(src: torch.Tensor, dst: torch.Tensor, npages: int) -> float:
    """One plain contiguous copy of the same number of bytes (the memory-bandwidth reference)."""
    nbytes = npages * src[0].numel() * src.element_size()
    t0 = time.perf_counter()
    dst[:npages].copy_(src[:npages])
    return nbytes / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="tcp,shm")
    ap.add_argument("--sizes-mb", default="1,4,16,64,256", help="request sizes in MB (2^20 bytes)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--pages",
        choices=["random", "contiguous"],
        default="random",
        help="page indices on both sides: shuffled (worst case for coalescing) or one run",
    )
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    sizes = [int(s) for s in args.sizes_mb.split(",")]
    load_before = os.getloadavg()[0]
    page = torch.empty(PAGE_SHAPE, dtype=DTYPE)
    page_nbytes = page.numel() * page.element_size()
    num_pages = max(-(-s * 2**20 // page_nbytes) for s in sizes) + 8
    src_kv = torch.randn((num_pages, *PAGE_SHAPE)).to(DTYPE)
    copy_dst = torch.zeros_like(src_kv).fill_(0)  # touched: no page faults inside the timed copies
    rng = np.random.default_rng(0)
    results = []

    total = len(args.backends.split(",")) * len(sizes) * args.repeats
    bar = tqdm(total=total, desc="kv transfer", unit="req")
    for backend in args.backends.split(","):
        bs = KVBootstrapServer("127.0.0.1", 0)
        pm = get_kv_class(backend, KVClassType.MANAGER)(
            KVArgs(0, src_kv, bootstrap_port=bs.port), DisaggregationMode.PREFILL
        )
        pm.wait_registered(30)
        sender_cls = get_kv_class(backend, KVClassType.SENDER)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=decode_main, args=(backend, num_pages, child), daemon=True)
        proc.start()
        ready, d_host, d_port, d_extra = parent.recv()
        assert ready == "ready"
        room = 1

        def one(npages: int) -> float:
            nonlocal room
            room += 1
            if args.pages == "random":
                src = rng.permutation(num_pages)[:npages]
                dst = rng.permutation(num_pages)[:npages]
            else:
                src = np.arange(npages)
                dst = np.arange(npages)
            s = sender_cls(pm, bs.addr, room)
            parent.send(("recv", room, dst.tolist(), bs.addr))
            assert parent.recv() == ("inited", room)
            _wait(s, {KVPoll.WaitingForInput})
            s.init(npages)
            t0 = time.monotonic()
            s.send(src, KVMetadata(room, 1))
            _, rr, state, t_done, why = parent.recv()
            assert state == "Success" and _wait(s, DONE) == KVPoll.Success, why
            return npages * page_nbytes / (t_done - t0) / 1e9

        def raw(npages: int) -> float | None:
            """The engine's own write of the same kind of page set (one-sided engines only)."""
            if backend not in RAW_ENGINES:
                return None
            src = rng.permutation(num_pages)[:npages] if args.pages == "random" else np.arange(npages)
            dst = rng.permutation(num_pages)[:npages] if args.pages == "random" else np.arange(npages)
            heads = (0, PAGE_SHAPE[3])
            dest = Destination(
                0,
                1,
                d_host,
                d_port,
                dst,
                heads,
                heads,
                num_pages,
                None,
                d_extra.get("engine_meta"),
                d_extra.get("kv_ptr"),
            )
            job = Job("piece", SimpleNamespace(room=0), dest, 0, src)  # type: ignore[arg-type]
            t0 = time.monotonic()
            pm.prefill.mover.write(job, dst, None)
            return npages * page_nbytes / (time.monotonic() - t0) / 1e9

        one(4)  # warm-up: connections, segment mapping, remote agent
        for size in sizes:
            npages = max(1, round(size * 2**20 / page_nbytes))
            samples, base, raws = [], [], []
            for _ in range(args.repeats):  # interleaved, so all see the same machine load
                samples.append(one(npages))
                base.append(torch_copy_gbps(src_kv, copy_dst, npages))
                r = raw(npages)
                if r is not None:
                    raws.append(r)
                bar.update()
            results.append(
                dict(
                    backend=backend,
                    size_mb=size,
                    pages=npages,
                    bytes=npages * page_nbytes,
                    gbps_median=statistics.median(samples),
                    gbps_best=max(samples),
                    samples_gbps=samples,
                    torch_copy_gbps=statistics.median(base),
                    torch_copy_samples_gbps=base,
                    raw_gbps=statistics.median(raws) if raws else None,
                    raw_samples_gbps=raws,
                )
            )
        parent.send(("stop",))
        proc.join(30)
        pm.shutdown()
        bs.close()
    bar.close()

    load = (load_before, os.getloadavg()[0])
    print(f"\nload average (1 min) before/after: {load[0]:.2f}/{load[1]:.2f} (other processes share these cores)")
    print(
        f"page = {list(PAGE_SHAPE)} {str(DTYPE).removeprefix('torch.')} = {page_nbytes / 1024:.0f} KiB, "
        f"pages: {args.pages}, repeats: {args.repeats}, cpus: {os.cpu_count()}, torch threads: "
        f"{torch.get_num_threads()}"
    )
    print(
        f"{'backend':8} {'size MB':>8} {'pages':>6} {'median GB/s':>12} {'best GB/s':>10} "
        f"{'torch copy GB/s':>16} {'median/copy':>12} {'raw engine GB/s':>16} {'median/raw':>11}"
    )
    for r in results:  # torch copy and raw: medians of the interleaved samples
        raw_col = (
            f"{r['raw_gbps']:>16.2f} {r['gbps_median'] / r['raw_gbps']:>11.0%}"
            if r.get("raw_gbps")
            else f"{'-':>16} {'-':>11}"
        )
        print(
            f"{r['backend']:8} {r['size_mb']:>8} {r['pages']:>6} {r['gbps_median']:>12.2f} {r['gbps_best']:>10.2f} "
            f"{r['torch_copy_gbps']:>16.2f} {r['gbps_median'] / r['torch_copy_gbps']:>12.0%} {raw_col}"
        )
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(
                dict(
                    page_shape=PAGE_SHAPE,
                    dtype=str(DTYPE),
                    page_nbytes=page_nbytes,
                    pages=args.pages,
                    repeats=args.repeats,
                    cpu_count=os.cpu_count(),
                    loadavg_before_after=load,
                    torch_threads=torch.get_num_threads(),
                    python=sys.version.split()[0],
                    torch=torch.__version__,
                    machine=platform.machine(),
                    command=" ".join(sys.argv),
                    results=results,
                ),
                f,
                indent=2,
            )
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
