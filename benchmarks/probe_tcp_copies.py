"""What bounds pdserve's tcp backend on one host against NIXL (UCX) there (#14): moves the
same random page sets between two processes (a spawned receiver) in ways that differ only in
the copies and buffers, and reports GB/s and the CPU seconds each side spends per GB.

- memcpy: one process copies the pages into another buffer (numpy): the one-copy floor;
- cma: `process_vm_writev` of the pages straight into the receiver's pages, what UCX's
  `cma` transport does for NIXL on one host: one copy, done by the sender's kernel;
- tcp: one loopback TCP stream as the tcp backend uses it (`sendmsg` of page views,
  `recvmsg_into` the receiver's pages with SO_RCVLOWAT 1 MiB, SO_SNDBUF 4 MiB): two copies
  (user -> socket buffer -> user) plus the TCP stack;
- tcp-32m: the same with 32 MiB send and receive buffers (SO_SNDBUFFORCE / SO_RCVBUFFORCE:
  beyond net.core.wmem_max, so this needs root);
- tcp-zerocopy: the same with MSG_ZEROCOPY sends (the kernel pins the pages instead of
  copying them into the socket buffer; completions read from the error queue);
- tcp-x4: four streams, one thread each on both sides (what pdserve does from 4 MB).

    python benchmarks/probe_tcp_copies.py --sizes-mb 16,64,256 --repeats 5 --output bench_out/tcp_copies.json
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time

import numpy as np

from pdserve.disagg.transfer.wire import _advance, recv_into_views

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

PAGE = 368640  # one KV page of the default model (bench_kv_transfer.py)
POOL_PAGES = 800
LOWAT = 1 << 20
SO_ZEROCOPY, MSG_ZEROCOPY = 60, 0x4000000
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
MODES = ("memcpy", "cma", "tcp", "tcp-32m", "tcp-zerocopy", "tcp-x4")
STREAMS = 4


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_writev.restype = ctypes.c_ssize_t


def cma_write(pid: int, src_addrs: list[int], dst_addrs: list[int]) -> None:
    """process_vm_writev of whole pages, at most 1024 (IOV_MAX) per call."""
    for lo in range(0, len(src_addrs), 1024):
        s, d = src_addrs[lo : lo + 1024], dst_addrs[lo : lo + 1024]
        local = (IoVec * len(s))(*[IoVec(a, PAGE) for a in s])
        remote = (IoVec * len(d))(*[IoVec(a, PAGE) for a in d])
        want = PAGE * len(s)
        n = _libc.process_vm_writev(pid, local, len(s), remote, len(d), 0)
        if n != want:  # a partial write only happens at a bad address: fail loudly
            raise OSError(ctypes.get_errno(), f"process_vm_writev wrote {n} of {want} bytes")


def _tune(s: socket.socket, big: bool) -> None:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if big:
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 32 << 20)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    else:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.settimeout(60)


def run_split(fn, socks: list, views: list, n: int, *args) -> None:
    """fn(socks[k], the k-th of n equal runs of `views`, *args) on n threads at once, joined."""
    per = -(-len(views) // n)
    threads = [threading.Thread(target=fn, args=(socks[k], views[k * per : (k + 1) * per], *args)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def receiver(conn) -> None:
    buf = np.ones(POOL_PAGES * PAGE, np.uint8)  # touched: no page faults in the timed reads
    mv = memoryview(buf)
    base = buf.ctypes.data
    ls = socket.create_server(("127.0.0.1", 0))
    conn.send((ls.getsockname()[1], os.getpid(), base))
    socks = {}
    for kind in ("plain", "big"):
        socks[kind] = []
        for _ in range(STREAMS):
            c, _ = ls.accept()
            _tune(c, kind == "big")
            socks[kind].append(c)
    while (msg := conn.recv()) is not None:
        mode, pages = msg
        if mode in ("memcpy", "cma"):
            conn.send(0.0)
            continue
        n = STREAMS if mode == "tcp-x4" else 1
        ss = socks["big" if mode == "tcp-32m" else "plain"]
        views = [mv[p * PAGE : (p + 1) * PAGE] for p in pages]
        c0 = time.process_time()
        run_split(recv_into_views, ss, views, n, LOWAT)
        conn.send(time.process_time() - c0)


def _send(s: socket.socket, views: list, zerocopy: bool) -> int:
    """Send the views; with zerocopy, return how many sendmsg calls await a completion."""
    views, i, calls = list(views), 0, 0
    while i < len(views):
        k = s.sendmsg(views[i : i + 64], [], MSG_ZEROCOPY if zerocopy else 0)
        calls += 1
        i = _advance(views, i, k)
    return calls


def _reap(s: socket.socket, calls: int) -> None:
    """Read MSG_ZEROCOPY completions until every call is acknowledged (the pages are free)."""
    done = 0
    deadline = time.monotonic() + 10
    while done < calls and time.monotonic() < deadline:
        try:
            _, anc, _, _ = s.recvmsg(0, 1024, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except BlockingIOError:
            time.sleep(0.0005)
            continue
        for _, _, data in anc:  # struct sock_extended_err: ee_info..ee_data = [lo, hi] of calls
            lo, hi = int.from_bytes(data[8:12], "little"), int.from_bytes(data[12:16], "little")
            done += hi - lo + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="16,64,256")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes_mb.split(",")]
    modes = args.modes.split(",")
    if bad := set(modes) - set(MODES):
        ap.error(f"unknown modes {sorted(bad)}; known: {', '.join(MODES)}")
    if max(sizes) * 2**20 > POOL_PAGES * PAGE:
        ap.error(f"sizes up to {POOL_PAGES * PAGE >> 20} MB")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load0 = os.getloadavg()[0]
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=receiver, args=(child,), daemon=True)
    proc.start()
    port, pid, dst_base = parent.recv()
    socks = {}
    for kind in ("plain", "big"):
        socks[kind] = []
        for _ in range(STREAMS):
            s = socket.create_connection(("127.0.0.1", port))
            _tune(s, kind == "big")
            socks[kind].append(s)
    for s in socks["plain"][:1]:
        s.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    src_np = np.random.randint(0, 255, POOL_PAGES * PAGE, dtype=np.uint8)
    dst_np = np.ones_like(src_np)  # memcpy's target, touched
    src = memoryview(src_np)
    results = []
    for mb in sizes:
        npages = round(mb * 2**20 / PAGE)
        for mode in modes:
            samples, cpu_s, cpu_r = [], [], []
            for _ in range(args.repeats):
                sp = np.random.permutation(POOL_PAGES)[:npages]
                dp = np.random.permutation(POOL_PAGES)[:npages]
                parent.send((mode, dp))
                c0, t0 = time.process_time(), time.monotonic()
                if mode == "memcpy":
                    for a, b in zip(sp, dp):
                        dst_np[b * PAGE : (b + 1) * PAGE] = src_np[a * PAGE : (a + 1) * PAGE]
                elif mode == "cma":
                    cma_write(
                        pid, [src_np.ctypes.data + int(a) * PAGE for a in sp], [dst_base + int(b) * PAGE for b in dp]
                    )
                else:
                    n = STREAMS if mode == "tcp-x4" else 1
                    ss = socks["big" if mode == "tcp-32m" else "plain"]
                    views = [src[p * PAGE : (p + 1) * PAGE] for p in sp]
                    zc = mode == "tcp-zerocopy"
                    if n == 1:
                        calls = _send(ss[0], views, zc)
                    else:
                        run_split(_send, ss, views, n, False)
                    if zc:
                        _reap(ss[0], calls)
                rcpu = parent.recv()  # the receiver is done (tcp) / nothing to wait for
                dt = time.monotonic() - t0
                samples.append(npages * PAGE / dt / 1e9)
                cpu_s.append((time.process_time() - c0) / (npages * PAGE / 1e9))
                cpu_r.append(rcpu / (npages * PAGE / 1e9))
            row = dict(
                size_mb=mb,
                mode=mode,
                gbps_median=statistics.median(samples),
                samples_gbps=samples,
                sender_cpu_s_per_gb=statistics.median(cpu_s),
                receiver_cpu_s_per_gb=statistics.median(cpu_r),
            )
            results.append(row)
            print(
                f"{mb:>4} MB {mode:>13}: {row['gbps_median']:.2f} GB/s  CPU s/GB sender {row['sender_cpu_s_per_gb']:.3f}"
                f" receiver {row['receiver_cpu_s_per_gb']:.3f}",
                flush=True,
            )
    parent.send(None)
    proc.join(10)
    load = (load0, os.getloadavg()[0])
    print(f"load average (1 min) before/after: {load[0]:.2f}/{load[1]:.2f}")
    if args.output:
        write_json(
            args.output,
            dict(
                started_utc=started, loadavg_before_after=load, page_bytes=PAGE, repeats=args.repeats, results=results
            ),
        )


if __name__ == "__main__":
    main()
