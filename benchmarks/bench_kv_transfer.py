"""KV transfer bandwidth per backend (tcp, shm, gloo, nixl, mooncake) against a plain torch
copy of the same bytes and against each engine's own API moving the same page set in the
same run ("raw": nothing of pdserve's protocol, registry or threads around it):

- tcp: a plain socket, `sendmsg` of the source pages' memoryviews, `recv_into` each
  destination page (the kernel gathers and scatters), timed until decode holds every byte;
- gloo: a 2-rank `ProcessGroupGloo`, `index_select` into a kept buffer, `send`/`recv`,
  `index_copy_` into the destination pages (gloo cannot scatter), timed until decode's copy
  is done;
- nixl: one NIXL `WRITE` of the page ranges with a notification, timed until decode's
  agent sees the notification (decode polls, as pdserve's nixl backend does);
- mooncake: one `TransferEngine.batch_transfer_sync_write` of the page ranges, timed until
  it returns on prefill;
- shm: none (the plain copy is its raw reference).

Raw samples run interleaved with pdserve's, in the same processes (the raw endpoints sit in
the same prefill and decode processes beside pdserve's managers).

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
import socket
import statistics
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from pdserve.disagg.transfer.bootstrap import KVBootstrapServer
from pdserve.disagg.metadata import KVMetadata
from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer.base import KVArgs
from pdserve.disagg.transfer.registry import KVClassType, get_kv_class
from pdserve.engine.shm_segment import allocate_kv_buffer, free_kv_buffer, new_shm_name

# SmolLM2-135M's KV page at page_size 16: [30 layers, 2, 16 tokens, 3 kv heads, 64] bf16 = 360 KiB
PAGE_SHAPE = (30, 2, 16, 3, 64)
DTYPE = torch.bfloat16
DONE = {KVPoll.Success, KVPoll.Failed}
RAW_ENGINES = ("tcp", "gloo", "nixl", "mooncake")  # shm: the plain copy is its reference


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
    raw = RawDecode(backend, kv, mgr, conn)
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            if msg[0] == "raw_setup":
                raw.setup()
                continue
            if msg[0] == "raw":
                raw.receive(msg[1], msg[2])
                continue
            _, room, pages, addr = msg
            r = recv_cls(mgr, addr, room)
            _wait(r, {KVPoll.WaitingForInput, KVPoll.Failed})
            r.init(pages)
            conn.send(("inited", room))
            st = _wait(r, DONE)
            conn.send(("done", room, st.name, r.completed_at, r.failure_reason))
    finally:
        raw.close()
        mgr.shutdown()
        if shm_name:
            free_kv_buffer(shm_name)


def _page_views(kv: torch.Tensor, pages) -> list[memoryview]:
    mv = memoryview(kv.view(-1).view(torch.uint8).numpy())
    pn = kv[0].numel() * kv.element_size()
    return [mv[int(p) * pn : (int(p) + 1) * pn] for p in pages]


def _ranges(base: int, pages, page_nbytes: int) -> list[int]:
    return [base + int(p) * page_nbytes for p in pages]


class RawDecode:
    """Decode's end of the engines' own APIs (see the module docstring)."""

    def __init__(self, backend: str, kv: torch.Tensor, mgr, conn) -> None:
        self.backend, self.kv, self.mgr, self.conn = backend, kv, mgr, conn
        self.sock = self.pg = self.staging = None

    def setup(self) -> None:
        if self.backend == "tcp":
            lsock = socket.create_server(("127.0.0.1", 0))
            self.conn.send(("raw_setup", lsock.getsockname()[1]))
            self.sock, _ = lsock.accept()
            lsock.close()
        elif self.backend == "gloo":
            import torch.distributed as dist

            store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
            self.conn.send(("raw_setup", store.port))
            self.pg = _gloo_group(store, 1)
            self.store = store
        else:
            self.conn.send(("raw_setup", None))

    def receive(self, pages: list[int], tag: bytes) -> None:
        kv = self.kv
        if self.backend == "tcp":
            views = _page_views(kv, pages)
            self.conn.send(("raw_ready",))
            for v in views:
                while len(v):
                    k = self.sock.recv_into(v)
                    if k == 0:
                        raise ConnectionError("raw tcp peer closed")
                    v = v[k:]
        elif self.backend == "gloo":
            n = len(pages)
            if self.staging is None or self.staging.shape[0] < n:
                self.staging = torch.empty((n, *kv.shape[1:]), dtype=kv.dtype)
            buf = self.staging[:n]
            idx = torch.tensor(pages, dtype=torch.int64)
            self.conn.send(("raw_ready",))
            self.pg.recv([buf], 0, 0).wait()
            kv.index_copy_(0, idx, buf)
        elif self.backend == "nixl":
            agent = self.mgr.decode.mover.agent
            self.conn.send(("raw_ready",))
            got = False
            while not got:
                for msgs in agent.get_new_notifs().values():
                    got = got or tag in msgs
                if not got:
                    time.sleep(0.0002)
        else:  # mooncake: one-sided, decode takes no part
            self.conn.send(("raw_ready",))
        self.conn.send(("raw_done", time.monotonic()))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def _gloo_group(store, rank: int):
    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_default_device()]
    return dist.ProcessGroupGloo(dist.PrefixStore("raw", store), rank, 2, opts)


class RawPrefill:
    """Prefill's end of the engines' own APIs; `send` returns GB/s for one page set."""

    def __init__(self, backend: str, kv: torch.Tensor, pm, conn, d_host: str, d_extra: dict) -> None:
        self.backend, self.kv, self.pm, self.conn, self.d_extra = backend, kv, pm, conn, d_extra
        self.page_nbytes = kv[0].numel() * kv.element_size()
        self.sock = self.pg = self.staging = None
        self.tag = 0
        conn.send(("raw_setup",))
        if backend == "tcp":
            _, port = conn.recv()
            self.sock = socket.create_connection((d_host, port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif backend == "gloo":
            import torch.distributed as dist

            _, port = conn.recv()
            self.store = dist.TCPStore(d_host, port, is_master=False)
            self.pg = _gloo_group(self.store, 0)
        else:
            conn.recv()
        if backend == "nixl":
            mover = pm.prefill.mover
            self.agent = mover.agent
            ((_, self.remote, self.dst_base),) = mover._peers.values()  # the decode agent added at warm-up
        elif backend == "mooncake":
            self.engine = pm.prefill.mover.engine
            self.session = d_extra["engine_meta"].decode()
            self.dst_base = int(d_extra["kv_ptr"])

    def send(self, src, dst) -> float:
        self.tag += 1
        tag = f"raw-{self.tag}".encode()
        self.conn.send(("raw", [int(p) for p in dst], tag))
        assert self.conn.recv() == ("raw_ready",)
        kv, pn, n = self.kv, self.page_nbytes, len(src)
        t_done = None
        t0 = time.monotonic()
        if self.backend == "tcp":
            views = _page_views(kv, src)
            i = 0
            while i < len(views):
                k = self.sock.sendmsg(views[i : i + 512])
                while k:
                    if k >= len(views[i]):
                        k -= len(views[i])
                        i += 1
                    else:
                        views[i] = views[i][k:]
                        k = 0
        elif self.backend == "gloo":
            if self.staging is None or self.staging.shape[0] < n:
                self.staging = torch.empty((n, *kv.shape[1:]), dtype=kv.dtype)
            buf = self.staging[:n]
            torch.index_select(kv, 0, torch.from_numpy(np.asarray(src, dtype=np.int64)), out=buf)
            self.pg.send([buf], 1, 0).wait()
        elif self.backend == "nixl":
            a = self.agent
            sd = a.get_xfer_descs([(x, pn, 0) for x in _ranges(kv.data_ptr(), src, pn)], "DRAM")
            dd = a.get_xfer_descs([(x, pn, 0) for x in _ranges(self.dst_base, dst, pn)], "DRAM")
            h = a.initialize_xfer("WRITE", sd, dd, self.remote, tag)
            state = a.transfer(h)
            while state not in ("DONE", "ERR"):
                time.sleep(0.0002)
                state = a.check_xfer_state(h)
            assert state == "DONE", state
            a.release_xfer_handle(h)
        else:
            rc = self.engine.batch_transfer_sync_write(
                self.session, _ranges(kv.data_ptr(), src, pn), _ranges(self.dst_base, dst, pn), [pn] * n
            )
            assert rc == 0, rc
            t_done = time.monotonic()
        msg, t_decode = self.conn.recv()
        assert msg == "raw_done"
        return n * pn / ((t_done or t_decode) - t0) / 1e9

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


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
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
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
            """The engine's own API moving the same kind of page set (see the docstring)."""
            if rawp is None:
                return None
            if args.pages == "random":
                return rawp.send(rng.permutation(num_pages)[:npages], rng.permutation(num_pages)[:npages])
            return rawp.send(np.arange(npages), np.arange(npages))

        for _ in range(8):  # warm-up: requests go to queue room % QUEUE_SIZE, so every worker
            one(4)  # opens its connection (as in a running server), maps the segment, adds the agent
        rawp = RawPrefill(backend, src_kv, pm, parent, d_host, d_extra) if backend in RAW_ENGINES else None
        raw(4)
        load_backend = os.getloadavg()
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
                    loadavg_at_start=load_backend,
                )
            )
        if rawp is not None:
            rawp.close()
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
                    started_utc=started,
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
