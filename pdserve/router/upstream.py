"""Talking to one worker: open a request, classify what went wrong, error bodies.

An attempt either commits (something was sent to the client: it can no longer be
retried) or raises `AttemptFailed` before committing. `AttemptFailed.retryable`
says whether a new pair may be tried; a non-retryable failure carries the upstream
answer that the client gets as is (e.g. a 400 from prefill for an over-long prompt).
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from pdserve.router.metrics import ErrorKind
from pdserve.router.workers import Worker

# What SGLang's router retries on: timeouts, throttling and server-side errors.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class AttemptFailed(Exception):
    """One attempt on one worker failed before anything reached the client."""

    def __init__(
        self,
        worker: Worker,
        kind: ErrorKind,
        message: str,
        *,
        retryable: bool = True,
        status: int | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.worker = worker
        self.kind = kind
        self.message = message
        self.retryable = retryable
        self.status = status  # the worker's status, when it answered
        self.body = body
        self.content_type = content_type

    @property
    def blames_worker(self) -> bool:
        """Counts against the worker's circuit breaker (4xx is the client's fault)."""
        return self.kind is not ErrorKind.UPSTREAM_4XX

    def to_response(self) -> web.Response:
        """What the client gets when this is the last word."""
        if self.status is not None and self.body is not None:
            return web.Response(
                status=self.status,
                body=self.body,
                content_type=_mime(self.content_type),
                charset=_charset(self.content_type),
            )
        if self.kind is ErrorKind.TIMEOUT:
            return error_response(504, self.message, "GatewayTimeout")
        return error_response(502, self.message, "BadGateway")


def error_response(status: int, message: str, err_type: str = "RouterError") -> web.Response:
    """OpenAI's error shape (SGLang's clients read `message` / `error.message` too)."""
    body = {"error": {"message": message, "type": err_type, "code": status}, "object": "error", "message": message}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def _mime(content_type: str | None) -> str:
    return (content_type or "application/json").split(";")[0].strip() or "application/json"


def _charset(content_type: str | None) -> str | None:
    if content_type and "charset=" in content_type:
        return content_type.split("charset=", 1)[1].split(";")[0].strip() or None
    return None


def _timeout(worker: Worker) -> AttemptFailed:
    # not retried: the request used up its whole --request-timeout-secs on this worker
    return AttemptFailed(
        worker,
        ErrorKind.TIMEOUT,
        f"{worker.role.value} worker {worker.url} did not answer within --request-timeout-secs",
        retryable=False,
    )


async def open_request(
    session: aiohttp.ClientSession,
    worker: Worker,
    path: str,
    data: bytes,
    headers: dict[str, str],
    timeout: aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:
    """POST `data` to `worker` and return once the status line and headers arrived.
    Connection errors (connect timeouts included) become a retryable `AttemptFailed`,
    the request timeout a final one (504)."""
    try:
        return await session.post(worker.url + path, data=data, headers=headers, timeout=timeout)
    except aiohttp.ConnectionTimeoutError:
        raise AttemptFailed(
            worker, ErrorKind.CONNECTION, f"{worker.role.value} worker {worker.url}: connect timed out"
        ) from None
    except asyncio.TimeoutError:
        raise _timeout(worker) from None
    except (aiohttp.ClientError, OSError) as e:
        raise AttemptFailed(
            worker, ErrorKind.CONNECTION, f"{worker.role.value} worker {worker.url}: {type(e).__name__}: {e}"
        ) from None


async def read_body(worker: Worker, resp: aiohttp.ClientResponse) -> bytes:
    """The whole body; transport errors become `AttemptFailed`."""
    try:
        return await resp.read()
    except asyncio.TimeoutError:
        raise _timeout(worker) from None
    except (aiohttp.ClientError, OSError) as e:
        raise AttemptFailed(
            worker, ErrorKind.CONNECTION, f"{worker.role.value} worker {worker.url} dropped the answer: {e}"
        ) from None


async def read_first_chunk(worker: Worker, resp: aiohttp.ClientResponse) -> bytes:
    """Whatever bytes arrive first (b"" at end of stream)."""
    try:
        return await resp.content.readany()
    except asyncio.TimeoutError:
        raise _timeout(worker) from None
    except (aiohttp.ClientError, OSError) as e:
        raise AttemptFailed(
            worker, ErrorKind.CONNECTION, f"{worker.role.value} worker {worker.url} dropped the stream: {e}"
        ) from None


def status_failure(worker: Worker, resp: aiohttp.ClientResponse, body: bytes) -> AttemptFailed:
    """An error status as a failure: retryable statuses may go to a new pair, others
    (4xx) are passed to the client unchanged."""
    retryable = resp.status in RETRYABLE_STATUSES
    kind = ErrorKind.UPSTREAM_5XX if retryable or resp.status >= 500 else ErrorKind.UPSTREAM_4XX
    snippet = body[:300].decode("utf-8", "replace")
    return AttemptFailed(
        worker,
        kind,
        f"{worker.role.value} worker {worker.url} answered {resp.status}: {snippet}",
        retryable=retryable,
        status=resp.status,
        body=body,
        content_type=resp.headers.get("Content-Type"),
    )


def is_ok(status: int) -> bool:
    return 200 <= status < 300
