"""The gloo and nccl backends: KV pages move as torch.distributed send/recv between the two
ranks of a 2-process group built per data connection (gloo on CPU, nccl with CUDA pools).

Two-sided, so decode takes part: on the same data connection as the other backends, under
the standing grant of one_sided.py (decode granted the write of all of a request's pages
with its REGISTER, so prefill does not wait for an ACK before each write),

    prefill                                   decode
    GROUP_JOIN(group id)                     ->   both build ProcessGroupGloo(rank 0 = prefill,
                                                  rank 1 = decode) over decode's TCPStore
    WRITE_GRANTED(room, offset, npages, heads) -> checks the frame, holds a writer slot if the
                                                  receiver still wants the pages, posts recv
    gather pages into staging, send          ->   recv into staging, scatter into its pages
                                                  (or drop the bytes: the receiver failed),
                                                  release the slot
    WRITE_DONE(same fields) [+ META]         ->   counts the bytes

Decode receives every write it granted, wanted or not, so prefill's send never waits on a
receive that does not come; the slot it holds while it scatters keeps the pages from being
freed after prefill's write (and its grant) ended but before decode's copy did. Until
session 7 each write asked first (WRITE_BEGIN -> ACK): one round trip per transfer, most of
gloo's fixed cost at 1 MB. A decode that does not grant is still served that way.

Pages are batched into staging buffers of up to 64 MiB per message: each send/recv costs
1-2.5 ms here, so page-by-page sends would crawl. A request is one piece (`max_pieces = 1`),
so it is one message up to 64 MiB. Staging buffers come from a pool per side
(heads.StagingPool: take a free one or make one, never wait), so transfers one after another
reuse one buffer whose pages are already faulted in; a buffer per connection, grown with
the request size, paid page faults on every connection at every new size (the 16-256 MB gap
to raw gloo in session 4).

A connection's group is built on its first write (2-13 ms here) and kept for the
connection's life. Decode's TCPStore address travels in its registration
(RegisterBody.engine_meta). The grant rules are one_sided.py's.
"""

from __future__ import annotations

import datetime
import logging
import random
import socket

import numpy as np

from pdserve.disagg.transfer import wire
from pdserve.disagg.transfer.base import KVArgs
from pdserve.disagg.transfer.decode_service import DataConn
from pdserve.disagg.transfer.decode_side import SocketKVReceiver
from pdserve.disagg.transfer.heads import StagingPool, gather_pages, scatter_pages, staging_view
from pdserve.disagg.transfer.one_sided import OneSidedDecodeMover, OneSidedPrefillMover, host_port_error
from pdserve.disagg.transfer.prefill_service import Job
from pdserve.disagg.transfer.prefill_side import SocketKVSender
from pdserve.disagg.transfer.socket_manager import SocketKVManager
from pdserve.disagg.transfer.wire import FrameHeader, FrameType, ProtocolError

logger = logging.getLogger(__name__)
MESSAGE_BYTES = 64 << 20  # largest send/recv; a write of more pages is several messages
GROUP_TIMEOUT = datetime.timedelta(seconds=60)
PREFILL, DECODE = 0, 1  # ranks in each 2-process group


def _group(kind: str, store_addr: str, gid: int, rank: int):
    """A 2-rank group over decode's TCPStore. Each group gets its own store client: a client
    blocks while it waits for a key, so two groups forming at once over one client deadlock."""
    import torch.distributed as dist

    host, _, port = store_addr.rpartition(":")
    client = dist.TCPStore(host, int(port), is_master=False, timeout=GROUP_TIMEOUT)
    prefixed = dist.PrefixStore(f"pdserve-kv-{gid}", client)
    if kind == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, 2)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = GROUP_TIMEOUT
    opts._devices = [dist.ProcessGroupGloo.create_default_device()]
    return dist.ProcessGroupGloo(prefixed, rank, 2, opts)


def _chunks(npages: int, slice_nbytes: int) -> list[tuple[int, int]]:
    """The same (start, count) page chunks on both sides: at most MESSAGE_BYTES each."""
    per = max(1, MESSAGE_BYTES // slice_nbytes)
    return [(lo, min(per, npages - lo)) for lo in range(0, npages, per)]


class _Link:
    """Prefill's side of one data connection: its group and staging buffer."""

    def __init__(self, sock: socket.socket, pg) -> None:
        self.sock = sock
        self.pg = pg


class GlooPrefillMover(OneSidedPrefillMover):
    kind = "gloo"
    max_pieces = 1  # one message per transfer (each send/recv has a fixed cost)

    def __init__(self, args: KVArgs) -> None:
        super().__init__(args)
        self.head_page_nbytes = args.page_nbytes // args.num_kv_heads
        self.staging = StagingPool(args.kv_data.device, MESSAGE_BYTES)

    def check_registration(self, body: wire.RegisterBody, pages: np.ndarray) -> str | None:
        if body.engine_meta is None:
            return f"the {self.kind} backend needs decode's store address (is decode on {self.kind} too?)"
        return host_port_error(body.engine_meta, f"{self.kind} store address")

    def connect(self, sock: socket.socket, job: Job, scratch: dict) -> object:
        links: dict[socket.socket, _Link] = scratch.setdefault("links", {})
        link = links.get(sock)
        if link is None:
            for old in [s for s in links if s.fileno() == -1]:  # connections the worker dropped
                del links[old]
            assert job.dest.engine_meta is not None  # check_registration
            gid = random.getrandbits(62)
            wire.send_frame(sock, FrameHeader(FrameType.GROUP_JOIN, gid, src_rank=self.args.engine_rank))
            link = links[sock] = _Link(sock, _group(self.kind, job.dest.engine_meta.decode(), gid, PREFILL))
        return link

    def write(self, job: Job, dst_pages: np.ndarray, link: object) -> None:
        heads = job.dest.src_heads
        slice_nbytes = (heads[1] - heads[0]) * self.head_page_nbytes
        kv = self.args.kv_data
        assert isinstance(link, _Link)
        chunks = _chunks(len(job.src_pages), slice_nbytes)
        with self.staging.take(max(n for _, n in chunks) * slice_nbytes) as whole:
            for lo, n in chunks:
                buf = whole[: n * slice_nbytes]
                gather_pages(kv, job.src_pages[lo : lo + n], heads, staging_view(buf, kv, n, heads))
                link.pg.send([buf], DECODE, 0).wait()


class GlooDecodeMover(OneSidedDecodeMover):
    kind = "gloo"
    # two-sided: decode receives every write it granted (into staging) and scatters it into
    # its pages while the receiver still wants them; otherwise it drops the bytes
    two_sided = True

    def __init__(self, args: KVArgs, svc_getter) -> None:
        super().__init__(args, svc_getter)
        import torch.distributed as dist

        self.store = dist.TCPStore(args.host, 0, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT)
        self.staging = StagingPool(args.kv_data.device, MESSAGE_BYTES)
        self.address = f"{args.host}:{self.store.port}"

    def register_extra(self) -> dict:
        return {"engine_meta": self.address.encode()}

    def join(self, conn: DataConn, h: FrameHeader) -> None:
        if h.npages or h.payload_len or h.body_len:
            raise ProtocolError("GROUP_JOIN carries nothing")
        if "group" in conn.scratch:
            raise ProtocolError("GROUP_JOIN twice on one connection")
        try:
            conn.scratch["group"] = _group(self.kind, self.address, h.room, DECODE)
        except RuntimeError as e:
            raise OSError(f"{self.kind} group with prefill failed: {e}") from None

    def receive(self, conn: DataConn, h: FrameHeader, pages: np.ndarray | None) -> None:
        """Receive the write's messages; scatter them into `pages` (None: the receiver no
        longer wants them or holds no grant: the bytes are received and dropped, so prefill's
        send completes and the connection's group stays in step)."""
        pg = conn.scratch.get("group")
        if pg is None:
            raise ProtocolError(f"{h.type.name} before GROUP_JOIN")
        heads = (h.head_start, h.head_end)
        slice_nbytes = (h.head_end - h.head_start) * self.head_page_nbytes
        kv = self.args.kv_data
        chunks = _chunks(h.npages, slice_nbytes)
        try:
            with self.staging.take(max(n for _, n in chunks) * slice_nbytes) as whole:
                for lo, n in chunks:
                    buf = whole[: n * slice_nbytes]
                    pg.recv([buf], PREFILL, 0).wait()
                    if pages is not None:
                        scatter_pages(kv, pages[lo : lo + n], heads, staging_view(buf, kv, n, heads))
        except RuntimeError as e:  # the peer died or timed out: the connection ends, the grant fails
            raise OSError(f"{self.kind} receive failed: {e}") from None


class GlooKVManager(SocketKVManager):
    backend = "gloo"

    def _make_prefill_mover(self) -> GlooPrefillMover:
        return GlooPrefillMover(self.args)

    def _make_decode_mover(self) -> GlooDecodeMover:
        return GlooDecodeMover(self.args, lambda: self.decode)


class GlooKVSender(SocketKVSender):
    pass


class GlooKVReceiver(SocketKVReceiver):
    pass


class NcclPrefillMover(GlooPrefillMover):
    kind = "nccl"


class NcclDecodeMover(GlooDecodeMover):
    kind = "nccl"


class NcclKVManager(SocketKVManager):
    """gloo's code with CUDA pools and ProcessGroupNCCL (GPUs only)."""

    backend = "nccl"

    def __init__(self, args: KVArgs, mode, **kw) -> None:
        if args.kv_data.device.type != "cuda":
            raise ValueError("the nccl backend needs the KV pool on a CUDA device")
        super().__init__(args, mode, **kw)

    def _make_prefill_mover(self) -> NcclPrefillMover:
        return NcclPrefillMover(self.args)

    def _make_decode_mover(self) -> NcclDecodeMover:
        return NcclDecodeMover(self.args, lambda: self.decode)


class NcclKVSender(SocketKVSender):
    pass


class NcclKVReceiver(SocketKVReceiver):
    pass
