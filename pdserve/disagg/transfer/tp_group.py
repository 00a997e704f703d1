"""A tensor-parallel instance's KV transfer, driven from rank 0's scheduler.

Every tp rank has its own KV manager (its own data endpoint, its own registration with the
bootstrap server as `engine_rank` r, its own pool of its own heads), exactly as SGLang's
ranks do, so the wire protocol does not change with tp. The ranks' pools live in shared
memory and the scheduler that decides what to send or receive runs on rank 0 only, so rank 0
holds all the managers; a request's sender (or receiver) is one per rank, seen by the queues
as one endpoint whose state is the least advanced of its parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer.base import BaseKVManager, KVTransferError
from pdserve.disagg.transfer.stats import TransferStats


class TPKVManagerGroup(BaseKVManager):
    """The managers of ranks 0..T-1 of one instance (same mode and backend), seen by the
    queues as one manager: its endpoints are one per rank (TPEndpoint)."""

    def __init__(self, managers: Sequence[BaseKVManager]) -> None:
        if not managers:
            raise ValueError("a manager group needs at least one manager")
        super().__init__(managers[0].args, managers[0].mode)
        self.managers = list(managers)

    def stats(self) -> TransferStats:
        """Counts and bytes summed over ranks (a request counts once per rank)."""
        parts = [m.stats() for m in self.managers]
        first = parts[0]
        return TransferStats(
            transfers_completed=first.transfers_completed,
            transfers_failed=max(p.transfers_failed for p in parts),
            bytes_transferred=sum(p.bytes_transferred for p in parts),
            total_transfer_seconds=max(p.total_transfer_seconds for p in parts),
            last_latency_s=max(p.last_latency_s for p in parts),
            last_bytes=sum(p.last_bytes for p in parts),
            max_latency_s=max(p.max_latency_s for p in parts),
        )

    def table_sizes(self) -> dict[str, int]:
        return {f"rank{i}.{k}": v for i, m in enumerate(self.managers) for k, v in m.table_sizes().items()}

    def wait_registered(self, timeout: float) -> bool:
        return all(m.wait_registered(timeout) for m in self.managers)

    def create_endpoint(self, cls: type, bootstrap_addr: str, bootstrap_room: int, **kw: object) -> "TPEndpoint":
        return TPEndpoint([m.create_endpoint(cls, bootstrap_addr, bootstrap_room, **kw) for m in self.managers])

    def shutdown(self) -> None:
        for m in self.managers:
            m.shutdown()


class TPEndpoint:
    """One request's sender or receiver on every rank. Calls fan out to all parts; poll() is
    Failed as soon as one part failed (the others are aborted), else the least advanced state."""

    def __init__(self, parts: Sequence) -> None:
        self.parts = list(parts)
        self.room = getattr(self.parts[0], "room", None)

    def init(self, *args, **kw) -> None:
        for p in self.parts:
            p.init(*args, **kw)

    def send(self, *args, **kw) -> None:
        for p in self.parts:
            p.send(*args, **kw)

    def poll(self) -> KVPoll:
        states = [p.poll() for p in self.parts]
        if KVPoll.Failed in states:
            for p, s in zip(self.parts, states):
                if s != KVPoll.Failed:
                    p.abort()
            return KVPoll.Failed
        return min(states)

    def get_metadata(self):
        if self.poll() != KVPoll.Success:
            return None
        return self.parts[0].get_metadata()

    @property
    def transfer_seconds(self) -> float | None:
        secs = [getattr(p, "transfer_seconds", None) for p in self.parts]
        return None if any(s is None for s in secs) else max(secs)

    def failure_exception(self) -> NoReturn:
        for p in self.parts:
            if p.poll() == KVPoll.Failed:
                p.failure_exception()
        raise KVTransferError(self.room or 0, "KV transfer failed on a tensor-parallel rank")

    def abort(self) -> None:
        for p in self.parts:
            p.abort()

    @property
    def busy(self) -> bool:
        """Some rank still writes into the request's pages (see SocketKVReceiver.busy)."""
        return any(getattr(p, "busy", False) for p in self.parts)
