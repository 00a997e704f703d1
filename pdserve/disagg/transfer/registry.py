"""Transfer backends by name, and the class of each role (SGLang's `get_kv_class`)."""

from __future__ import annotations

import importlib
from enum import Enum

from pdserve.enums import TransferBackend
from pdserve.setting_checks import missing_package

# Bootstrap host of warm-up and /health_generate requests: use the fake sender/receiver,
# move nothing (SGLang's constant).
FAKE_BOOTSTRAP_HOST = "2.2.2.2"

# TransferBackend is defined with the other settings' enums (pdserve/enums.py), missing_package
# with the other setting checks (pdserve/setting_checks.py)
__all__ = ["TransferBackend", "missing_package"]


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
        KVClassType.BOOTSTRAP_SERVER: "pdserve.disagg.transfer.bootstrap:KVBootstrapServer",
    },
    TransferBackend.SHM: {
        KVClassType.MANAGER: "pdserve.disagg.transfer.shm:ShmKVManager",
        KVClassType.SENDER: "pdserve.disagg.transfer.shm:ShmKVSender",
        KVClassType.RECEIVER: "pdserve.disagg.transfer.shm:ShmKVReceiver",
        KVClassType.BOOTSTRAP_SERVER: "pdserve.disagg.transfer.bootstrap:KVBootstrapServer",
    },
    TransferBackend.NIXL: {
        KVClassType.MANAGER: "pdserve.disagg.transfer.nixl_backend:NixlKVManager",
        KVClassType.SENDER: "pdserve.disagg.transfer.nixl_backend:NixlKVSender",
        KVClassType.RECEIVER: "pdserve.disagg.transfer.nixl_backend:NixlKVReceiver",
        KVClassType.BOOTSTRAP_SERVER: "pdserve.disagg.transfer.bootstrap:KVBootstrapServer",
    },
    TransferBackend.MOONCAKE: {
        KVClassType.MANAGER: "pdserve.disagg.transfer.mooncake_backend:MooncakeKVManager",
        KVClassType.SENDER: "pdserve.disagg.transfer.mooncake_backend:MooncakeKVSender",
        KVClassType.RECEIVER: "pdserve.disagg.transfer.mooncake_backend:MooncakeKVReceiver",
        KVClassType.BOOTSTRAP_SERVER: "pdserve.disagg.transfer.bootstrap:KVBootstrapServer",
    },
    TransferBackend.GLOO: {
        KVClassType.MANAGER: "pdserve.disagg.transfer.gloo_backend:GlooKVManager",
        KVClassType.SENDER: "pdserve.disagg.transfer.gloo_backend:GlooKVSender",
        KVClassType.RECEIVER: "pdserve.disagg.transfer.gloo_backend:GlooKVReceiver",
        KVClassType.BOOTSTRAP_SERVER: "pdserve.disagg.transfer.bootstrap:KVBootstrapServer",
    },
    TransferBackend.NCCL: {
        KVClassType.MANAGER: "pdserve.disagg.transfer.gloo_backend:NcclKVManager",
        KVClassType.SENDER: "pdserve.disagg.transfer.gloo_backend:NcclKVSender",
        KVClassType.RECEIVER: "pdserve.disagg.transfer.gloo_backend:NcclKVReceiver",
        KVClassType.BOOTSTRAP_SERVER: "pdserve.disagg.transfer.bootstrap:KVBootstrapServer",
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
