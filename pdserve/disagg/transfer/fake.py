"""The fake backend: moves no bytes but walks the real state machine.

Used for warm-up and /health_generate (bootstrap host FAKE_BOOTSTRAP_HOST) and in tests.
Fake senders and receivers work with any manager, so a tcp/shm server can use them for
warm-up requests without touching its real transfer machinery.
"""

from __future__ import annotations

import logging
from typing import NoReturn

from pdserve.disagg.metadata import KVMetadata
from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.poll import KVPoll, PollState
from pdserve.disagg.transfer.base import (
    BaseKVBootstrapServer,
    BaseKVManager,
    BaseKVReceiver,
    BaseKVSender,
    KVArgs,
    KVTransferError,
    PageIndices,
    check_room,
)

logger = logging.getLogger(__name__)


class FakeKVManager(BaseKVManager):
    def __init__(self, args: KVArgs, mode: DisaggregationMode, **_: object) -> None:
        super().__init__(args, mode)


class FakeKVSender(BaseKVSender):
    """First poll: Bootstrapping; then WaitingForInput; after the final send(): Success."""

    def __init__(
        self,
        mgr: BaseKVManager,
        bootstrap_addr: str,
        bootstrap_room: int,
        dest_tp_ranks: list[int] | None = None,
        pp_rank: int | None = None,
    ) -> None:
        self.mgr = mgr
        self.room = check_room(bootstrap_room)
        self._state = PollState(KVPoll.Bootstrapping)
        self.num_pages: int | None = None
        self.sent_pages = 0
        self.metadata: KVMetadata | None = None

    def init(self, num_pages: int) -> None:
        if num_pages < 0:
            raise ValueError("num_pages must be >= 0")
        self.num_pages = num_pages

    def send(self, page_indices: PageIndices, metadata: KVMetadata | None = None) -> None:
        if self._state.done:
            return
        if self._state.state == KVPoll.Bootstrapping:
            raise RuntimeError("send() before the sender reached WaitingForInput")
        self.sent_pages += len(page_indices)
        if metadata is None:
            self._state.advance(KVPoll.Transferring)
        else:
            self.metadata = metadata
            self._state.advance(KVPoll.Success)

    def poll(self) -> KVPoll:
        state = self._state.state
        if state == KVPoll.Bootstrapping:
            self._state.advance(KVPoll.WaitingForInput)  # bootstrap is instant; observed once
        return state

    def failure_exception(self) -> NoReturn:
        raise KVTransferError(self.room, self._state.reason or "fake sender failure")

    def abort(self) -> None:
        self._state.fail("aborted")


class FakeKVReceiver(BaseKVReceiver):
    """First poll: Bootstrapping; then WaitingForInput; after init(): Success.

    `get_metadata()` returns `fake_metadata` (settable), by default token 0 for this room.
    """

    def __init__(
        self, mgr: BaseKVManager, bootstrap_addr: str, bootstrap_room: int, data_parallel_rank: int | None = None
    ) -> None:
        self.mgr = mgr
        self.room = check_room(bootstrap_room)
        self._state = PollState(KVPoll.Bootstrapping)
        self._inited = False
        self.fake_metadata = KVMetadata(self.room, output_token_id=0, output_logprob=0.0)

    def init(self, page_indices: PageIndices) -> None:
        self._inited = True

    def poll(self) -> KVPoll:
        state = self._state.state
        if state == KVPoll.Bootstrapping:
            self._state.advance(KVPoll.WaitingForInput)
        elif state == KVPoll.WaitingForInput and self._inited:
            self._state.advance(KVPoll.Success)
            return KVPoll.Success
        return state

    def get_metadata(self) -> KVMetadata | None:
        return self.fake_metadata if self._state.state == KVPoll.Success else None

    def failure_exception(self) -> NoReturn:
        raise KVTransferError(self.room, self._state.reason or "fake receiver failure")

    def abort(self) -> None:
        self._state.fail("aborted")


class FakeKVBootstrapServer(BaseKVBootstrapServer):
    """Listens nowhere."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port

    @property
    def port(self) -> int:
        return self._port

    def close(self) -> None:
        pass
