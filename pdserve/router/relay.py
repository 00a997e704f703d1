"""Relaying an upstream stream to the client, chunk by chunk as it arrives.

Nothing is buffered: every chunk read from the worker is written to the client at
once (HTTP chunked encoding). An optional transform rewrites whole SSE events (used
to merge prefill's input logprobs into decode's stream).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import aiohttp
from aiohttp import web

from pdserve.router.workers import Worker

logger = logging.getLogger("pdserve.router")


class SSETransform:
    """Re-frames a byte stream into SSE events (separated by a blank line) and passes
    each complete event through `fn(event_bytes) -> event_bytes`."""

    def __init__(self, fn: Callable[[bytes], bytes]) -> None:
        self.fn = fn
        self.buf = b""

    def feed(self, chunk: bytes) -> bytes:
        self.buf += chunk.replace(b"\r\n", b"\n")
        out = []
        while True:
            i = self.buf.find(b"\n\n")
            if i < 0:
                break
            event, self.buf = self.buf[:i + 2], self.buf[i + 2:]
            out.append(self.fn(event))
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self.buf = self.buf, b""
        return self.fn(rest) if rest.strip() else rest


async def relay(request: web.Request, worker: Worker, resp: aiohttp.ClientResponse, first: bytes,
                transform: SSETransform | None = None) -> tuple[web.StreamResponse, bool | None]:
    """Commits the worker's status and content type to the client, writes `first`, then
    every further chunk. Returns the response and a verdict on the worker: True (the
    stream ended cleanly), False (the worker broke it), None (the client went away)."""
    headers = {"Content-Type": resp.headers.get("Content-Type", "text/event-stream"),
               "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    out = web.StreamResponse(status=resp.status, headers=headers)
    try:
        await out.prepare(request)
        if first:
            await out.write(transform.feed(first) if transform else first)
        while True:
            try:
                chunk = await resp.content.readany()
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                logger.warning("%s worker %s broke its stream: %s", worker.role.value, worker.url, e)
                if transform:
                    await out.write(transform.flush())
                await out.write_eof()
                return out, False
            if not chunk:
                break
            data = transform.feed(chunk) if transform else chunk
            if data:
                await out.write(data)
        if transform:
            tail = transform.flush()
            if tail:
                await out.write(tail)
        await out.write_eof()
        return out, True
    except ConnectionError:  # aiohttp's ClientConnectionResetError is one
        # the client went away; closing the upstream response (by the caller) aborts it there
        return out, None
