"""The manager shared by the socket backends (tcp, shm): settings, and the prefill or decode
transfer service for its mode. A backend subclass supplies the two page movers."""

from __future__ import annotations

import logging
from typing import ClassVar

from pdserve.disagg.envs import DisaggEnvs
from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.transfer.base import BaseKVManager, KVArgs
from pdserve.disagg.transfer.decode_service import DecodeMover, DecodeTransferService
from pdserve.disagg.transfer.prefill_service import PrefillMover, PrefillTransferService

logger = logging.getLogger(__name__)


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


class SocketKVManager(BaseKVManager):
    """Timeouts, heartbeat and pool settings default to the environment knobs (envs.py);
    pass them explicitly to override (tests use ~1 s timeouts).

    Prefill mode: listens for decode's page indices on (args.host, args.port) and registers
    that endpoint with the bootstrap server at args.bootstrap_host:args.bootstrap_port.
    Decode mode: listens for KV data on (args.host, args.port).
    """

    backend: ClassVar[str] = ""

    def __init__(
        self,
        args: KVArgs,
        mode: DisaggregationMode,
        *,
        bootstrap_timeout: float | None = None,
        waiting_timeout: float | None = None,
        heartbeat_interval: float | None = None,
        heartbeat_max_failure: int | None = None,
        thread_pool_size: int | None = None,
        queue_size: int | None = None,
        io_timeout: float = 60.0,
        register_with_bootstrap: bool = True,
        envs: DisaggEnvs | None = None,
    ) -> None:
        super().__init__(args, mode)
        env = envs or DisaggEnvs.from_env()
        self.bootstrap_timeout = _positive("bootstrap_timeout", bootstrap_timeout or env.bootstrap_timeout)
        self.waiting_timeout = _positive("waiting_timeout", waiting_timeout or env.waiting_timeout)
        self.heartbeat_interval = _positive("heartbeat_interval", heartbeat_interval or env.heartbeat_interval)
        self.heartbeat_max_failure = int(
            _positive("heartbeat_max_failure", heartbeat_max_failure or env.heartbeat_max_failure)
        )
        self.thread_pool_size = int(_positive("thread_pool_size", thread_pool_size or env.thread_pool_size))
        self.queue_size = int(_positive("queue_size", queue_size or env.queue_size))
        self.io_timeout = _positive("io_timeout", io_timeout)  # s a started frame may take per socket call
        self.register_with_bootstrap = register_with_bootstrap
        self.prefill: PrefillTransferService | None = None
        self.decode: DecodeTransferService | None = None
        self._closed = False
        if mode == DisaggregationMode.PREFILL:
            self.prefill = PrefillTransferService(self, self._make_prefill_mover())
        else:
            self.decode = DecodeTransferService(self, self._make_decode_mover())
        logger.info(
            "%s KV manager (%s, rank %d/%d) listening on %s:%d",
            self.backend,
            mode.value,
            args.engine_rank,
            args.tp_size,
            args.host,
            self.port,
        )

    def table_sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for service in (self.prefill, self.decode):
            if service is not None:
                out.update(service.table_sizes())
        return out

    def _make_prefill_mover(self) -> PrefillMover:
        raise NotImplementedError

    def _make_decode_mover(self) -> DecodeMover:
        raise NotImplementedError

    @property
    def port(self) -> int:
        """The port this rank's transfer endpoint listens on."""
        svc = self.prefill or self.decode
        assert svc is not None
        return svc.port

    @property
    def endpoint(self) -> str:
        return f"{self.args.host}:{self.port}"

    def wait_registered(self, timeout: float) -> bool:
        """Prefill: block until the bootstrap server has this rank (startup, tests)."""
        return self.prefill is not None and self.prefill.registered.wait(timeout)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.prefill is not None:
            self.prefill.close()
            self.prefill.mover.close()
        if self.decode is not None:
            self.decode.close()
            self.decode.mover.close()
