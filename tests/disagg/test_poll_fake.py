"""Poll states, transitions, the fake backend and the registry."""

import pytest
import torch

from pdserve.disagg.metadata import KVMetadata
from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.poll import ALLOWED_TRANSITIONS, KVPoll, PollState, can_transition
from pdserve.disagg.transfer.base import KVArgs, KVTransferError
from pdserve.disagg.transfer.fake import FakeKVManager, FakeKVReceiver, FakeKVSender
from pdserve.disagg.transfer.registry import (
    FAKE_BOOTSTRAP_HOST,
    KVClassType,
    TransferBackend,
    get_kv_class,
    is_fake_bootstrap,
)


def test_sglang_values():
    assert [
        int(s)
        for s in (KVPoll.Failed, KVPoll.Bootstrapping, KVPoll.WaitingForInput, KVPoll.Transferring, KVPoll.Success)
    ] == [0, 1, 2, 3, 4]
    assert DisaggregationMode("prefill") is DisaggregationMode.PREFILL
    assert [m.value for m in DisaggregationMode] == ["null", "prefill", "decode"]
    assert FAKE_BOOTSTRAP_HOST == "2.2.2.2" and is_fake_bootstrap("2.2.2.2")


def test_transitions_forward_only():
    for s in KVPoll:
        assert not can_transition(s, KVPoll.Bootstrapping)
    assert ALLOWED_TRANSITIONS[KVPoll.Success] == frozenset() == ALLOWED_TRANSITIONS[KVPoll.Failed]
    ps = PollState()
    assert ps.advance(KVPoll.Transferring)
    assert not ps.advance(KVPoll.WaitingForInput)  # a late bootstrap never undoes progress
    assert ps.state == KVPoll.Transferring
    assert ps.fail("boom") and ps.reason == "boom"
    assert not ps.fail("again") and ps.reason == "boom"
    assert not ps.advance(KVPoll.Success) and ps.state == KVPoll.Failed


def _mgr(mode):
    return FakeKVManager(KVArgs(0, torch.zeros(4, 1, 2, 2, 1, 2)), mode)


def test_fake_sender_walks_the_state_machine():
    s = FakeKVSender(_mgr(DisaggregationMode.PREFILL), f"{FAKE_BOOTSTRAP_HOST}:8998", 7)
    with pytest.raises(RuntimeError):
        s.send([0], KVMetadata(7, 1))
    assert s.poll() == KVPoll.Bootstrapping
    assert s.poll() == KVPoll.WaitingForInput
    s.init(2)
    s.send([0])
    assert s.poll() == KVPoll.Transferring
    s.send([1], KVMetadata(7, 1))
    assert s.poll() == KVPoll.Success and s.sent_pages == 2


def test_fake_receiver_and_abort():
    r = FakeKVReceiver(_mgr(DisaggregationMode.DECODE), "2.2.2.2:8998", 9)
    assert r.get_metadata() is None
    assert r.poll() == KVPoll.Bootstrapping
    assert r.poll() == KVPoll.WaitingForInput
    r.init([1, 2])
    assert r.poll() == KVPoll.Success
    assert r.get_metadata().room == 9
    r2 = FakeKVReceiver(_mgr(DisaggregationMode.DECODE), "2.2.2.2:8998", 10)
    r2.abort()
    assert r2.poll() == KVPoll.Failed
    with pytest.raises(KVTransferError, match="aborted"):
        r2.failure_exception()


def test_registry():
    assert get_kv_class("fake", KVClassType.SENDER) is FakeKVSender
    assert get_kv_class(TransferBackend.TCP, KVClassType.MANAGER).__name__ == "TcpKVManager"
    assert get_kv_class("shm", KVClassType.RECEIVER).__name__ == "ShmKVReceiver"
    assert get_kv_class("tcp", KVClassType.BOOTSTRAP_SERVER).__name__ == "KVBootstrapServer"
    assert get_kv_class("nixl", KVClassType.MANAGER).__name__ == "NixlKVManager"
    assert get_kv_class("mooncake", KVClassType.SENDER).__name__ == "MooncakeKVSender"
    assert get_kv_class("gloo", KVClassType.RECEIVER).__name__ == "GlooKVReceiver"
    with pytest.raises(ValueError, match="unknown"):
        get_kv_class("carrier-pigeon", KVClassType.SENDER)


def test_manager_mode_checked():
    with pytest.raises(ValueError):
        _mgr(DisaggregationMode.NULL)


def test_engine_backend_not_installed_is_a_clear_flag_error(monkeypatch):
    import importlib.util

    from pdserve.config import ServerArgs
    from pdserve.disagg.transfer.registry import missing_package

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("nixl", "mooncake") else real(name, *a)
    )
    assert "pip install 'pdserve[nixl]'" in missing_package(TransferBackend.NIXL)
    assert "libibverbs1" in missing_package(TransferBackend.MOONCAKE)
    with pytest.raises(ValueError, match=r"--disaggregation-transfer-backend: the nixl backend needs NIXL"):
        ServerArgs(disaggregation_mode="prefill", disaggregation_transfer_backend="nixl")
    ServerArgs(disaggregation_transfer_backend="nixl")  # mode null moves no KV: not needed
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="nccl backend needs CUDA GPUs"):
            ServerArgs(disaggregation_mode="decode", disaggregation_transfer_backend="nccl")
