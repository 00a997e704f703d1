"""The nixl backend: prefill WRITEs pages into decode's KV pool with NIXL (UCX inside: RDMA,
NVLink or TCP/shared memory, whatever the hosts have), one-sided, no copy through a socket.

Each rank runs one NIXL agent with its KV pool registered. Decode's agent metadata and the
pool's address travel in its registration (RegisterBody.engine_meta / kv_ptr), so prefill
adds decode as a remote agent when it first sees it (no NIXL listen thread: its thread
crashed at interpreter exit). The WRITE_BEGIN / ACK / WRITE_DONE frames of one_sided.py keep
decode in charge of its pages; a write is awaited until NIXL reports it DONE before
WRITE_DONE is sent.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid

import numpy as np

from pdserve.disagg.transfer import wire
from pdserve.disagg.transfer.base import KVArgs
from pdserve.disagg.transfer.decode_side import SocketKVReceiver
from pdserve.disagg.transfer.one_sided import OneSidedDecodeMover, OneSidedPrefillMover, write_segments
from pdserve.disagg.transfer.prefill_service import Job
from pdserve.disagg.transfer.prefill_side import SocketKVSender
from pdserve.disagg.transfer.socket_manager import SocketKVManager

logger = logging.getLogger(__name__)
WRITE_TIMEOUT_S = 60.0


def _nixl():
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:
        raise RuntimeError(f"the nixl transfer backend needs the nixl package: pip install 'pdserve[nixl]' ({e})") \
            from None
    return nixl_agent, nixl_agent_config


def _agent(role: str, args: KVArgs):
    nixl_agent, nixl_agent_config = _nixl()
    name = f"pdserve-{role}-r{args.engine_rank}-{uuid.uuid4().hex[:12]}"
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False,
                                               backends=["UCX"]))
    kv = args.kv_data
    reg = agent.register_memory(kv)  # the whole pool, once
    return agent, reg


class NixlPrefillMover(OneSidedPrefillMover):
    def __init__(self, args: KVArgs) -> None:
        super().__init__(args)
        self.agent, self._reg = _agent("prefill", args)
        self.mem = "DRAM" if args.kv_data.device.type == "cpu" else "VRAM"
        self.dev = 0 if args.kv_data.device.type == "cpu" else (args.kv_data.device.index or 0)
        self._lock = threading.Lock()
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

    def write(self, job: Job, dst_pages: np.ndarray, link: object) -> None:
        dest = job.dest
        with self._lock:
            peer = self._peers.get((dest.host, dest.port, dest.decode_rank))
        if peer is None:
            raise RuntimeError("decode's NIXL agent is not known (registration was refused)")
        _, remote, dst_base = peer
        src, dst, lens = write_segments(self.args, dest, job.src_pages, dst_pages,
                                        self.args.kv_data.data_ptr(), dst_base)
        dev = self.dev
        src_descs = self.agent.get_xfer_descs([(int(a), int(n), dev) for a, n in zip(src, lens)], self.mem)
        dst_descs = self.agent.get_xfer_descs([(int(a), int(n), 0) for a, n in zip(dst, lens)], self.mem)
        handle = self.agent.initialize_xfer("WRITE", src_descs, dst_descs, remote)
        try:
            state = self.agent.transfer(handle)
            deadline = time.monotonic() + WRITE_TIMEOUT_S
            while state not in ("DONE", "ERR"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"NIXL write of {len(lens)} ranges did not finish in {WRITE_TIMEOUT_S:.0f} s")
                time.sleep(0.0002)
                state = self.agent.check_xfer_state(handle)
            if state == "ERR":
                raise RuntimeError("NIXL reported an error for the write")
        finally:
            self.agent.release_xfer_handle(handle)

    def close(self) -> None:
        with self._lock:
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


class NixlDecodeMover(OneSidedDecodeMover):
    def __init__(self, args: KVArgs, svc_getter) -> None:
        super().__init__(args, svc_getter)
        self.agent, self._reg = _agent("decode", args)
        self._meta = self.agent.get_agent_metadata()

    def register_extra(self) -> dict:
        return {"engine_meta": self._meta, "kv_ptr": self.args.kv_data.data_ptr()}

    def close(self) -> None:
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
