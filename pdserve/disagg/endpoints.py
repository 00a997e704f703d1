"""What the prefill and decode queues share: creating a request's transfer endpoint
(the fake one for SGLang's fake bootstrap host), failing or aborting a queued request, and
their common part as the engine's PDQueues (DisaggQueues)."""

from __future__ import annotations

import logging
from http import HTTPStatus

import msgspec

from pdserve.disagg.poll import WAKER
from pdserve.disagg.transfer.base import BaseKVBootstrapServer, BaseKVManager
from pdserve.disagg.transfer.registry import (
    FAKE_BOOTSTRAP_HOST,
    KVClassType,
    TransferBackend,
    get_kv_class,
    is_fake_bootstrap,
)
from pdserve.engine.pd_queues import PDQueues
from pdserve.engine.request import Req
from pdserve.engine.scheduler import Scheduler
from pdserve.messages import FinishReason, FinishReasonType

logger = logging.getLogger(__name__)


def fail(scheduler: Scheduler, req: Req, message: str, status: int = 500) -> None:
    """End a PD request with an error: free its pages, tell the client."""
    logger.error("request %s failed: %s", req.rid, message)
    scheduler.fail(req, FinishReason(FinishReasonType.ABORT, message=message, status_code=status))


class ParkedPages:
    """Requests ended with an error whose KV pages a transfer still touches (a write under way
    when the endpoint failed or was aborted: its sender reads them on prefill, its receiver
    fills them on decode). The request ends now; its pages are freed once the endpoint that
    `endpoint_of(req)` returns is no longer `busy` (freed pages could be reallocated while the
    write still touches them). Both PD sides keep one."""

    def __init__(self, scheduler: Scheduler, endpoint_of) -> None:
        self.scheduler = scheduler
        self.endpoint_of = endpoint_of
        self.reqs: list[Req] = []

    def __len__(self) -> int:
        return len(self.reqs)

    def __contains__(self, req: Req) -> bool:
        return req in self.reqs

    def fail(self, req: Req, message: str, status: int = 500) -> None:
        """End the request with an error; free its pages now, or park them while a write runs."""
        endpoint = self.endpoint_of(req)
        if endpoint is None or not endpoint.busy:
            fail(self.scheduler, req, message, status)
            return
        logger.error("request %s failed: %s (pages freed once the KV write under way ends)", req.rid, message)
        self.scheduler.fail(
            req, FinishReason(FinishReasonType.ABORT, message=message, status_code=status), keep_pages=True
        )
        self.reqs.append(req)

    def release(self) -> None:
        """Free the pages of every parked request whose write has ended."""
        keep = []
        for req in self.reqs:
            if self.endpoint_of(req).busy:
                keep.append(req)
            else:
                self.scheduler.free_pages(req)
        self.reqs = keep


def failure_reason(endpoint) -> str:
    try:
        endpoint.failure_exception()
    except Exception as e:  # the backends raise KVTransferError with the reason
        return str(e)
    return "KV transfer failed"


class EndpointFactory:
    """Creates a request's KV sender (prefill) or receiver (decode)."""

    def __init__(
        self, kv_manager: BaseKVManager, backend: TransferBackend, bootstrap_port: int, class_type: KVClassType
    ) -> None:
        self.kv_manager = kv_manager
        self.backend = backend
        self.bootstrap_port = bootstrap_port
        self.class_type = class_type
        self._fake_mgr: BaseKVManager | None = None

    def create(self, scheduler: Scheduler, req: Req, **kw):
        """The endpoint, or None after finishing the request with a 400 (bad bootstrap info)."""
        host = req.bootstrap_host or FAKE_BOOTSTRAP_HOST
        fake = is_fake_bootstrap(host) and self.backend != TransferBackend.FAKE
        backend = TransferBackend.FAKE if fake else self.backend
        mgr = self._fake_manager() if fake else self.kv_manager
        room = req.bootstrap_room if req.bootstrap_room is not None else 0
        cls = get_kv_class(backend, self.class_type)
        addr = f"{host}:{req.bootstrap_port or self.bootstrap_port}"
        try:
            return mgr.create_endpoint(cls, addr, room, **kw)  # tensor parallel: one per rank
        except Exception as e:
            scheduler.fail(
                req,
                FinishReason(
                    FinishReasonType.ABORT, message=f"bad bootstrap info: {e}", status_code=HTTPStatus.BAD_REQUEST
                ),
            )
            return None

    def _fake_manager(self) -> BaseKVManager:
        if self._fake_mgr is None:
            cls = get_kv_class(TransferBackend.FAKE, KVClassType.MANAGER)
            self._fake_mgr = cls(self.kv_manager.args, self.kv_manager.mode)
        return self._fake_mgr


def abort_queued(scheduler: Scheduler, queue: list[Req], rid: str, endpoint_attr: str) -> bool:
    """Client went away while the request sat in a PD queue: tell the peer, free, finish."""
    for req in queue:
        if req.rid == rid:
            queue.remove(req)
            getattr(req, endpoint_attr).abort()
            fail(scheduler, req, "aborted by the client", 499)
            return True
    return False


class DisaggQueues(PDQueues):
    """What the prefill and decode queues (prefill.py, decode.py) share as the engine's
    PDQueues: their transfer manager, the bootstrap server (prefill), the waker, closing."""

    def __init__(self, kv_manager: BaseKVManager, bootstrap_server: BaseKVBootstrapServer | None = None) -> None:
        self.kv_manager = kv_manager
        self.bootstrap_server = bootstrap_server

    def wake_fileno(self) -> int:
        return WAKER.fileno()

    def drain_wakeups(self) -> None:
        WAKER.drain()

    def table_sizes(self) -> dict[str, int]:
        out = {k: v for k, v in msgspec.structs.asdict(self.stats()).items() if isinstance(v, int)}
        out.update(self.kv_manager.table_sizes())
        if self.bootstrap_server is not None:
            out.update(self.bootstrap_server.table_sizes())
        return out

    def close(self) -> None:
        self.kv_manager.shutdown()
        if self.bootstrap_server is not None:
            self.bootstrap_server.close()
