"""Loopback TCP without pdserve: how many streams and which way of reading move KV pages
fastest on this machine (what the tcp backend's piece size and SO_RCVLOWAT were chosen by).

Two processes; the sender writes random 360 KiB pages (`sendmsg` of memoryviews, 64 per
call), the receiver reads them into random pages of its buffer (`recvmsg_into`), split over
1..N connections, each on its own thread on both sides. Receive modes:

- timeout: a socket with a timeout, read as data comes (pdserve's tcp backend before #14 s5);
- lowat: the same with SO_RCVLOWAT = 1 MiB, lowered to what is left near the end (now);
- waitall: a blocking socket read with MSG_WAITALL.

Time: from the sender's start to the receiver's end (CLOCK_MONOTONIC), threads included.

    python benchmarks/bench_tcp_streams.py --sizes-mb 4,64,256 --streams 1,4 --output bench_out/tcp_streams.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time

import numpy as np

from pdserve.disagg.transfer.wire import _advance  # the same buffer walk as the wire code

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

PAGE = 368640  # one KV page of the default model (bench_kv_transfer.py)
POOL_PAGES = 800
MODES = ("timeout", "lowat", "waitall")
LOWAT = 1 << 20


def recv_views(s: socket.socket, views: list, mode: str) -> None:
    views = list(views)
    i, left = 0, sum(len(v) for v in views)
    if mode == "waitall":
        s.settimeout(None)
    while i < len(views):
        if mode == "lowat":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, min(LOWAT, left)))
        k = s.recvmsg_into(views[i : i + 64], 0, socket.MSG_WAITALL if mode == "waitall" else 0)[0]
        if k == 0:
            raise ConnectionError("sender closed")
        left -= k
        i = _advance(views, i, k)
    if mode == "waitall":
        s.settimeout(60)
    elif mode == "lowat":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def send_views(s: socket.socket, views: list) -> None:
    views, i = list(views), 0
    while i < len(views):
        i = _advance(views, i, s.sendmsg(views[i : i + 64]))


def _split(views: list, n: int) -> list[list]:
    per = -(-len(views) // n)
    return [views[k * per : (k + 1) * per] for k in range(n)]


def receiver(conn, nmax: int) -> None:
    buf = np.ones(POOL_PAGES * PAGE, np.uint8)  # touched: no page faults in the timed reads
    mv = memoryview(buf)
    ls = socket.create_server(("127.0.0.1", 0))
    conn.send(ls.getsockname()[1])
    socks = []
    for _ in range(nmax):
        c, _ = ls.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.settimeout(60)
        socks.append(c)
    while (msg := conn.recv()) is not None:
        n, npages, mode = msg
        views = [mv[p * PAGE : (p + 1) * PAGE] for p in np.random.permutation(POOL_PAGES)[:npages]]
        threads = [
            threading.Thread(target=recv_views, args=(socks[k], part, mode)) for k, part in enumerate(_split(views, n))
        ]
        conn.send("ready")
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conn.send(time.monotonic())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="4,64,256")
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes_mb.split(",")]
    streams = [int(x) for x in args.streams.split(",")]
    if max(sizes) * 2**20 > POOL_PAGES * PAGE:
        ap.error(f"sizes up to {POOL_PAGES * PAGE >> 20} MB")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load0 = os.getloadavg()[0]
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=receiver, args=(child, max(streams)), daemon=True)
    proc.start()
    port = parent.recv()
    socks = []
    for _ in range(max(streams)):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.settimeout(60)
        socks.append(s)
    src = memoryview(np.random.randint(0, 255, POOL_PAGES * PAGE, dtype=np.uint8))
    results = []
    for mb in sizes:
        npages = round(mb * 2**20 / PAGE)
        for n in streams:
            row = {}
            for mode in MODES:
                samples = []
                for _ in range(args.repeats):
                    parent.send((n, npages, mode))
                    assert parent.recv() == "ready"
                    views = [src[p * PAGE : (p + 1) * PAGE] for p in np.random.permutation(POOL_PAGES)[:npages]]
                    parts = _split(views, n)
                    t0 = time.monotonic()
                    threads = [
                        threading.Thread(target=send_views, args=(socks[k], part)) for k, part in enumerate(parts)
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    samples.append(npages * PAGE / (parent.recv() - t0) / 1e9)
                row[mode] = statistics.median(samples)
                results.append(dict(size_mb=mb, streams=n, mode=mode, gbps_median=row[mode], samples_gbps=samples))
            print(
                f"{mb:>4} MB x{n} streams: " + ", ".join(f"{m} {g:.2f}" for m, g in row.items()) + " GB/s", flush=True
            )
    parent.send(None)
    proc.join(10)
    load = (load0, os.getloadavg()[0])
    print(f"load average (1 min) before/after: {load[0]:.2f}/{load[1]:.2f}")
    if args.output:
        write_json(
            args.output,
            dict(
                started_utc=started,
                loadavg_before_after=load,
                page_bytes=PAGE,
                repeats=args.repeats,
                lowat=LOWAT,
                results=results,
            ),
        )


if __name__ == "__main__":
    main()
