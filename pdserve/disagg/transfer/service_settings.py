"""What the socket backends' transfer services (prefill_service.py, decode_service.py) read of
their manager (socket_manager.py: SocketKVManager), so that they need not import it."""

from __future__ import annotations

from typing import Protocol

from pdserve.disagg.transfer.base import KVArgs


class ServiceSettings(Protocol):
    args: KVArgs
    backend: str  # the transfer backend's name, checked against the peer's
    bootstrap_timeout: float  # s a registration may wait for its peer
    heartbeat_interval: float  # s between heartbeats to a prefill's bootstrap server
    heartbeat_max_failure: int  # missed heartbeats before the prefill counts as dead
    thread_pool_size: int  # transfer worker threads
    queue_size: int  # prefill: transfer queues (requests are spread over them by room)
    io_timeout: float  # s a started frame may take per socket call
    register_with_bootstrap: bool  # prefill: register this rank with the bootstrap server
