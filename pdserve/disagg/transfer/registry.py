"""Transfer backends by name, and the class of each role (SGLang's `get_kv_class`)."""

from __future__ import annotations

import importlib
from enum import Enum

# Bootstrap host of warm-up and /health_generate requests: use the fake sender/receiver,
# move nothing (SGLang's constant).
FAKE_BOOTSTRAP_HOST = "2.2.2.2"

PLANNED_BACKENDS = ("mooncake", "nixl", "gloo", "nccl")


class TransferBackend(Enum):
    FAKE = "fake"
    TCP = "tcp"  # default; any two hosts
    SHM = "shm"  # prefill and decode on the same host

    @classmethod
    def from_name(cls, name: str) -> "TransferBackend":
        try:
            return cls(name.lower())
        except ValueError:
            hint = " (planned, not available yet)" if name.lower() in PLANNED_BACKENDS else ""
            raise ValueError(f"unknown KV transfer backend {name!r}{hint}; "
                             f"choose one of {[b.value for b in cls]}") from None


class KVClassType(Enum):
    MANAGER = "manager"
    SENDER = "sender"
    RECEIVER = "receiver"
    BOOTSTRAP_SERVER = "bootstrap_server"


_CLASSES: dict[TransferBackend, dict[KVClassType, str]] = {
    TransferBackend.FAKE: {
        KVClassType.MANAGER: "pdserve.disagg.transfer.fake:FakeKVManager",
        KVClassType.SENDER: "pdserve.disagg.transfer.fake:FakeKVSender",
        KVClassType.RECEIVER: "pdserve.disagg.transfer.fake:FakeKVReceiver",
        KVClassType.BOOTSTRAP_SERVER: "pdserve.disagg.transfer.fake:FakeKVBootstrapServer",
    },
    TransferBackend.TCP: {
        KVClassType.MANAGER: "pdserve.disagg.transfer.tcp:TcpKVManager",
        KVClassType.SENDER: "pdserve.disagg.transfer.tcp:TcpKVSender",
        KVClassType.RECEIVER: "pdserve.disagg.transfer.tcp:TcpKVReceiver",
        KVClassType.BOOTSTRAP_SERVER: "pdserve.disagg.bootstrap:KVBootstrapServer",
    },
    TransferBackend.SHM: {
        KVClassType.MANAGER: "pdserve.disagg.transfer.shm:ShmKVManager",
        KVClassType.SENDER: "pdserve.disagg.transfer.shm:ShmKVSender",
        KVClassType.RECEIVER: "pdserve.disagg.transfer.shm:ShmKVReceiver",
        KVClassType.BOOTSTRAP_SERVER: "pdserve.disagg.bootstrap:KVBootstrapServer",
    },
}


def get_kv_class(backend: TransferBackend | str, class_type: KVClassType) -> type:
    """The class implementing `class_type` for `backend` (imported on first use)."""
    if isinstance(backend, str):
        backend = TransferBackend.from_name(backend)
    module, _, name = _CLASSES[backend][class_type].partition(":")
    return getattr(importlib.import_module(module), name)


def is_fake_bootstrap(host: str | None) -> bool:
    return host == FAKE_BOOTSTRAP_HOST
