"""Transfer backends by name, and the class of each role (SGLang's `get_kv_class`)."""

from __future__ import annotations

import importlib
import importlib.util
from enum import Enum

from pdserve.enums import TransferBackend

# Bootstrap host of warm-up and /health_generate requests: use the fake sender/receiver,
# move nothing (SGLang's constant).
FAKE_BOOTSTRAP_HOST = "2.2.2.2"

__all__ = ["TransferBackend"]  # defined with the other settings' enums (pdserve/enums.py)


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
    TransferBackend.NIXL: {
        KVClassType.MANAGER: "pdserve.disagg.transfer.nixl_backend:NixlKVManager",
        KVClassType.SENDER: "pdserve.disagg.transfer.nixl_backend:NixlKVSender",
        KVClassType.RECEIVER: "pdserve.disagg.transfer.nixl_backend:NixlKVReceiver",
        KVClassType.BOOTSTRAP_SERVER: "pdserve.disagg.bootstrap:KVBootstrapServer",
    },
    TransferBackend.MOONCAKE: {
        KVClassType.MANAGER: "pdserve.disagg.transfer.mooncake_backend:MooncakeKVManager",
        KVClassType.SENDER: "pdserve.disagg.transfer.mooncake_backend:MooncakeKVSender",
        KVClassType.RECEIVER: "pdserve.disagg.transfer.mooncake_backend:MooncakeKVReceiver",
        KVClassType.BOOTSTRAP_SERVER: "pdserve.disagg.bootstrap:KVBootstrapServer",
    },
    TransferBackend.GLOO: {
        KVClassType.MANAGER: "pdserve.disagg.transfer.gloo_backend:GlooKVManager",
        KVClassType.SENDER: "pdserve.disagg.transfer.gloo_backend:GlooKVSender",
        KVClassType.RECEIVER: "pdserve.disagg.transfer.gloo_backend:GlooKVReceiver",
        KVClassType.BOOTSTRAP_SERVER: "pdserve.disagg.bootstrap:KVBootstrapServer",
    },
    TransferBackend.NCCL: {
        KVClassType.MANAGER: "pdserve.disagg.transfer.gloo_backend:NcclKVManager",
        KVClassType.SENDER: "pdserve.disagg.transfer.gloo_backend:NcclKVSender",
        KVClassType.RECEIVER: "pdserve.disagg.transfer.gloo_backend:NcclKVReceiver",
        KVClassType.BOOTSTRAP_SERVER: "pdserve.disagg.bootstrap:KVBootstrapServer",
    },
}


def missing_package(backend: TransferBackend) -> str | None:
    """Why an optional backend cannot load here (what to install), or None."""
    if backend == TransferBackend.NIXL:
        if importlib.util.find_spec("nixl") is None:
            return "the nixl backend needs NIXL: pip install 'pdserve[nixl]' (after torch)"
    elif backend == TransferBackend.MOONCAKE:
        if importlib.util.find_spec("mooncake") is None:
            return ("the mooncake backend needs Mooncake's transfer engine: pip install 'pdserve[mooncake]' "
                    "(and apt-get install libibverbs1)")
        try:
            importlib.import_module("mooncake.engine")
        except ImportError as e:
            hint = "apt-get install libibverbs1" if "ibverbs" in str(e) else "reinstall 'pdserve[mooncake]'"
            return f"Mooncake's transfer engine does not load ({e}): {hint}"
    elif backend == TransferBackend.NCCL:
        import torch

        if not torch.cuda.is_available():
            return "the nccl backend needs CUDA GPUs (torch.cuda.is_available() is False here); use gloo on CPU"
    return None


def get_kv_class(backend: TransferBackend | str, class_type: KVClassType) -> type:
    """The class implementing `class_type` for `backend` (imported on first use)."""
    if isinstance(backend, str):
        backend = TransferBackend.from_name(backend)
    module, _, name = _CLASSES[backend][class_type].partition(":")
    return getattr(importlib.import_module(module), name)


def is_fake_bootstrap(host: str | None) -> bool:
    return host == FAKE_BOOTSTRAP_HOST
