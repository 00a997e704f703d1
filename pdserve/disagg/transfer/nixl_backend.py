"""The nixl backend: prefill WRITEs pages into decode's KV pool with NIXL (UCX inside: RDMA,
NVLink or TCP/shared memory, whatever the hosts have), one-sided, no copy through a socket.

Each rank runs one NIXL agent with its KV pool registered. Decode's agent metadata and the
pool's address travel in its registration (RegisterBody.engine_meta / kv_ptr), so prefill
adds decode as a remote agent when it first sees it (no NIXL listen thread: its thread
crashed at interpreter exit). The WRITE_BEGIN / ACK / WRITE_DONE frames of one_sided.py keep
decode in charge of its pages.

No NIXL progress thread: it spins a whole core even when idle (measured: 2.95 CPU-s in 3 s),
which on a small CPU box halves everyone's speed. Progress is made by the side that waits,
only while it waits: prefill polls the transfer's state until DONE, and decode, after
granting a write, polls for the write's notification (one per granted write, as SGLang's
NIXL connector does) - a UCX write over TCP completes only when the target progresses too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid

import numpy as np

from pdserve.disagg.transfer import wire
from pdserve.disagg.transfer.base import KVArgs
from pdserve.disagg.transfer.decode_service import DataConn
from pdserve.disagg.transfer.decode_side import SocketKVReceiver
from pdserve.disagg.transfer.one_sided import OneSidedDecodeMover, OneSidedPrefillMover, write_segments
from pdserve.disagg.transfer.prefill_service import Job
from pdserve.disagg.transfer.prefill_side import SocketKVSender
from pdserve.disagg.transfer.socket_manager import SocketKVManager
from pdserve.disagg.transfer.wire import FrameHeader

logger = logging.getLogger(__name__)
WRITE_TIMEOUT_S = 60.0


def _nixl():
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:
        raise RuntimeError(
            f"the nixl transfer backend needs the nixl package: pip install 'pdserve[nixl]' ({e})"
        ) from None
    return nixl_agent, nixl_agent_config


def _skip_unused_ib_modules(args: KVArgs) -> None:
    """On a host without RDMA devices, keep UCX from loading its InfiniBand modules: they are
    of no use there, and the libnl-route they pull in crashes the process at exit (SIGSEGV in
    its destructor, rtnl_tc_unregister, inside _dl_fini, after everything else ran: every
    process that made a NIXL agent died so, found in session 7). A UCX_MODULES the user set,
    RDMA devices present, or `--disaggregation-ib-device` leave UCX as it is."""
    if "UCX_MODULES" in os.environ or args.ib_device:
        return
    try:
        has_rdma = bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        has_rdma = False
    if not has_rdma:
        os.environ["UCX_MODULES"] = "^ib*"


def _agent(role: str, args: KVArgs):
    _skip_unused_ib_modules(args)
    nixl_agent, nixl_agent_config = _nixl()
    name = f"pdserve-{role}-r{args.engine_rank}-{uuid.uuid4().hex[:12]}"
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=["UCX"]))
    kv = args.kv_data
    reg = agent.register_memory(kv)  # the whole pool, once
    return agent, reg


class NixlPrefillMover(OneSidedPrefillMover):
    # the write's notification tells decode it landed and carries the last piece's META:
    # decode succeeds without waiting for prefill to see DONE and send WRITE_DONE
    meta_with_write = True

    def __init__(self, args: KVArgs) -> None:
        super().__init__(args)
        self.agent, self._reg = _agent("prefill", args)
        self.mem = "DRAM" if args.kv_data.device.type == "cpu" else "VRAM"
        self.dev = 0 if args.kv_data.device.type == "cpu" else (args.kv_data.device.index or 0)
        self._lock = threading.Lock()  # the peer table
        self._agent_lock = threading.Lock()  # NIXL calls (the agent is not used from two threads at once)
        self._closed = False
        # decode endpoint (host, port, rank) -> (metadata digest, remote agent name, pool address)
        self._peers: dict[tuple[str, int, int], tuple[bytes, str, int]] = {}

    def check_registration(self, body: wire.RegisterBody, pages: np.ndarray) -> str | None:
        if body.engine_meta is None or body.kv_ptr is None:
            return "the nixl backend needs decode's agent metadata and pool address (is decode on nixl too?)"
        key = (body.host, body.port, body.decode_rank)
        digest = hashlib.sha256(body.engine_meta).digest()
        with self._lock:
            known = self._peers.get(key)
            if known is not None and known[0] == digest:
                return None
            try:
                name = self.agent.add_remote_agent(body.engine_meta)
            except Exception as e:  # nixl raises its own error types
                return f"cannot add decode's NIXL agent: {e}"
            name = name.decode() if isinstance(name, bytes) else name
            if known is not None and known[1] != name:  # decode restarted: forget the old agent
                try:
                    self.agent.remove_remote_agent(known[1])
                except Exception:
                    pass
            self._peers[key] = (digest, name, int(body.kv_ptr))
        return None

    def write(self, job: Job, dst_pages: np.ndarray, link: object, meta: bytes = b"") -> None:
        dest = job.dest
        with self._lock:
            peer = self._peers.get((dest.host, dest.port, dest.decode_rank))
        if peer is None:
            raise RuntimeError("decode's NIXL agent is not known (registration was refused)")
        _, remote, dst_base = peer
        src, dst, lens = write_segments(
            self.args, dest, job.src_pages, dst_pages, self.args.kv_data.data_ptr(), dst_base
        )
        dev = self.dev
        tag = write_tag(job.sender.room, job.offset, len(job.src_pages), dest.dst_heads)
        if meta:
            tag += META_SEP + meta
        with self._agent_lock:  # every agent call serialized: workers share the agent
            if self._closed:
                raise RuntimeError("the NIXL agent is shut down")
            src_descs = self.agent.get_xfer_descs([(int(a), int(n), dev) for a, n in zip(src, lens)], self.mem)
            dst_descs = self.agent.get_xfer_descs([(int(a), int(n), 0) for a, n in zip(dst, lens)], self.mem)
            handle = self.agent.initialize_xfer("WRITE", src_descs, dst_descs, remote, tag)
            state = self.agent.transfer(handle)
        try:
            deadline = time.monotonic() + WRITE_TIMEOUT_S
            while state not in ("DONE", "ERR"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"NIXL write of {len(lens)} ranges did not finish in {WRITE_TIMEOUT_S:.0f} s")
                time.sleep(0.0002)
                with self._agent_lock:
                    if self._closed:
                        raise RuntimeError("the NIXL agent is shut down")
                    state = self.agent.check_xfer_state(handle)
            if state == "ERR":
                raise RuntimeError("NIXL reported an error for the write")
        finally:
            with self._agent_lock:
                if not self._closed:
                    self.agent.release_xfer_handle(handle)

    def close(self) -> None:
        with self._lock, self._agent_lock:
            if self._closed:
                return
            self._closed = True
            for _, name, _ in self._peers.values():
                try:
                    self.agent.remove_remote_agent(name)
                except Exception:
                    pass
            self._peers.clear()
            try:
                self.agent.deregister_memory(self._reg)
            except Exception:
                pass


def write_tag(room: int, offset: int, npages: int, heads: tuple[int, int]) -> bytes:
    """The notification a write carries: which grant it completes (prefill ranks of another
    tp size write the same pages' different heads, so the heads are part of it). The last
    piece's adds META_SEP and the 32-byte META record."""
    return f"{room}:{offset}:{npages}:{heads[0]}:{heads[1]}".encode()


META_SEP = b"#"  # never in a tag (digits and colons)


class NixlDecodeMover(OneSidedDecodeMover):
    def __init__(self, args: KVArgs, svc_getter) -> None:
        super().__init__(args, svc_getter)
        self.agent, self._reg = _agent("decode", args)
        self._meta = self.agent.get_agent_metadata()
        self._notif_lock = threading.Lock()
        # notifications read but not yet waited for -> (when they arrived, the META record
        # they carried) (a write whose grant was given up on leaves one behind: pruned after
        # WRITE_TIMEOUT_S)
        self._arrived: dict[bytes, tuple[float, bytes]] = {}
        self._closed = False

    def receive(self, conn: DataConn, h: FrameHeader, pages: np.ndarray) -> bytes:
        """After the grant: progress the agent until this write's notification arrives; return
        the META record it carried (b"" for a piece that is not the last)."""
        tag = write_tag(h.room, h.offset, h.npages, (h.head_start, h.head_end))
        deadline = time.monotonic() + WRITE_TIMEOUT_S
        svc = self._svc_getter()
        while True:
            with self._notif_lock:
                if self._closed or svc._closed.is_set():
                    raise OSError("the KV manager is shutting down")
                now = time.monotonic()
                for msgs in self.agent.get_new_notifs().values():  # also drives UCX progress
                    for m in msgs:
                        key, _, meta = bytes(m).partition(META_SEP)
                        self._arrived[key] = (now, meta)
                got = self._arrived.pop(tag, None)
                if got is not None:
                    if len(self._arrived) > 1024:
                        self._arrived = {m: v for m, v in self._arrived.items() if now - v[0] < WRITE_TIMEOUT_S}
                    return got[1]
            if time.monotonic() > deadline:
                raise OSError(f"NIXL write for room {h.room} did not land in {WRITE_TIMEOUT_S:.0f} s")
            time.sleep(0.0002)

    def register_extra(self) -> dict:
        return {"engine_meta": self._meta, "kv_ptr": self.args.kv_data.data_ptr()}

    def close(self) -> None:
        with self._notif_lock:  # no receive() is inside the agent now, and none will enter
            if self._closed:
                return
            self._closed = True
            try:
                self.agent.deregister_memory(self._reg)
            except Exception:
                pass


class NixlKVManager(SocketKVManager):
    backend = "nixl"

    def _make_prefill_mover(self) -> NixlPrefillMover:
        return NixlPrefillMover(self.args)

    def _make_decode_mover(self) -> NixlDecodeMover:
        return NixlDecodeMover(self.args, lambda: self.decode)


class NixlKVSender(SocketKVSender):
    pass


class NixlKVReceiver(SocketKVReceiver):
    pass
