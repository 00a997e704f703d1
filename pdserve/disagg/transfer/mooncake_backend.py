"""The mooncake backend: prefill writes pages into decode's KV pool with Mooncake's
TransferEngine (RDMA where the hosts have it, else its TCP transport), one-sided.

Each rank runs one TransferEngine in peer-to-peer handshake mode (no metadata server) with
its KV pool registered; Mooncake's TCP transport refuses addresses that are not
registered. Decode's session ("host:rpc_port") and pool address travel in its registration
(RegisterBody.engine_meta / kv_ptr). `--disaggregation-ib-device` names the RDMA devices
(Mooncake's device list); without one the TCP transport is used. Control frames are
one_sided.py's.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from pdserve.disagg.transfer import wire
from pdserve.disagg.transfer.base import KVArgs
from pdserve.disagg.transfer.decode_side import SocketKVReceiver
from pdserve.disagg.transfer.one_sided import OneSidedDecodeMover, OneSidedPrefillMover, host_port_error, write_segments
from pdserve.disagg.transfer.prefill_service import Job
from pdserve.disagg.transfer.prefill_side import SocketKVSender
from pdserve.disagg.transfer.socket_manager import SocketKVManager

logger = logging.getLogger(__name__)


def _engine(args: KVArgs):
    os.environ.setdefault("GLOG_minloglevel", "1")  # Mooncake logs every connection at INFO (glog)
    try:
        from mooncake.engine import TransferEngine
    except ImportError as e:
        hint = " and `apt-get install libibverbs1`" if "ibverbs" in str(e) else ""
        raise RuntimeError(
            f"the mooncake transfer backend needs the Mooncake transfer engine: "
            f"pip install 'pdserve[mooncake]'{hint} ({e})"
        ) from None
    engine = TransferEngine()
    device = args.ib_device or ""
    protocol = "rdma" if device else "tcp"
    rc = engine.initialize(args.host, "P2PHANDSHAKE", protocol, device)
    if rc != 0:
        raise RuntimeError(
            f"Mooncake TransferEngine.initialize({args.host!r}, P2PHANDSHAKE, {protocol}, {device!r}) failed with {rc}"
        )
    kv = args.kv_data
    nbytes = kv.numel() * kv.element_size()
    rc = engine.register_memory(kv.data_ptr(), nbytes)
    if rc != 0:
        raise RuntimeError(f"Mooncake could not register the KV pool ({nbytes} bytes): {rc}")
    return engine


class MooncakePrefillMover(OneSidedPrefillMover):
    # one batch call per transfer, as Mooncake's own API is used: the engine spreads a batch
    # over its own threads; several calls at once from our workers measured slower
    max_pieces = 1

    def __init__(self, args: KVArgs) -> None:
        super().__init__(args)
        self.engine = _engine(args)

    def check_registration(self, body: wire.RegisterBody, pages: np.ndarray) -> str | None:
        if body.engine_meta is None or body.kv_ptr is None:
            return "the mooncake backend needs decode's session and pool address (is decode on mooncake too?)"
        return host_port_error(body.engine_meta, "Mooncake session")

    def write(self, job: Job, dst_pages: np.ndarray, link: object) -> None:
        dest = job.dest
        assert dest.engine_meta is not None and dest.kv_ptr is not None  # check_registration
        session = dest.engine_meta.decode()
        src, dst, lens = write_segments(
            self.args, dest, job.src_pages, dst_pages, self.args.kv_data.data_ptr(), dest.kv_ptr
        )
        rc = self.engine.batch_transfer_sync_write(session, src.tolist(), dst.tolist(), lens.tolist())
        if rc != 0:
            raise RuntimeError(f"Mooncake write of {len(lens)} ranges to {session} failed with {rc}")

    def close(self) -> None:
        try:
            self.engine.unregister_memory(self.args.kv_data.data_ptr())
        except Exception:
            pass


class MooncakeDecodeMover(OneSidedDecodeMover):
    def __init__(self, args: KVArgs, svc_getter) -> None:
        super().__init__(args, svc_getter)
        self.engine = _engine(args)
        self.session = f"{args.host}:{self.engine.get_rpc_port()}"

    def register_extra(self) -> dict:
        return {"engine_meta": self.session.encode(), "kv_ptr": self.args.kv_data.data_ptr()}

    def close(self) -> None:
        try:
            self.engine.unregister_memory(self.args.kv_data.data_ptr())
        except Exception:
            pass


class MooncakeKVManager(SocketKVManager):
    backend = "mooncake"

    def _make_prefill_mover(self) -> MooncakePrefillMover:
        return MooncakePrefillMover(self.args)

    def _make_decode_mover(self) -> MooncakeDecodeMover:
        return MooncakeDecodeMover(self.args, lambda: self.decode)


class MooncakeKVSender(SocketKVSender):
    pass


class MooncakeKVReceiver(SocketKVReceiver):
    pass
