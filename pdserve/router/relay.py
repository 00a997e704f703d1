"""Relaying an upstream stream to the client, chunk by chunk as it arrives.

Nothing is buffered beyond one SSE event: complete events are written to the client at
once (HTTP chunked encoding); a partial event waits for its end, so that a stream the
worker breaks mid-event never reaches the client half-written. An optional transform
rewrites whole SSE events (used to merge prefill's input logprobs into decode's stream).

Every stream ends knowingly: with the worker's `data: [DONE]`, with an error event the
worker sent, or, when the worker broke the stream (killed, connection reset, timeout) or
ended it without either, with an error event written here in OpenAI's shape
(`data: {"error": {"message", "type", "code"}}`) and no `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

import aiohttp
from aiohttp import web

from pdserve.router.workers import Worker

logger = logging.getLogger("pdserve.router")

DONE = b"data: [DONE]"


def sse_error(message: str, code: int = 502, err_type: str = "BadGateway") -> bytes:
    """One SSE error event in OpenAI's shape (SGLang's clients read `error.message`)."""
    return b"data: " + json.dumps({"error": {"message": message, "type": err_type, "code": code}}).encode() + b"\n\n"


def _is_error_event(event: bytes) -> bool:
    text = event.strip()
    if not text.startswith(b"data:"):
        return False
    try:
        ev = json.loads(text[5:].strip())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(ev, dict) and "error" in ev


class SSEFramer:
    """Splits a byte stream into whole SSE events (separated by a blank line), passes
    each through `fn` (identity by default) and remembers whether the stream carried
    `[DONE]` or an error event."""

    def __init__(self, fn: Callable[[bytes], bytes] | None = None) -> None:
        self.fn = fn
        self.buf = b""
        self.done = False
        self.errored = False

    def _event(self, event: bytes) -> bytes:
        text = event.strip()
        if text == DONE:
            self.done = True
        elif b'"error"' in text[:64] and _is_error_event(text):
            self.errored = True
        return self.fn(event) if self.fn else event

    def feed(self, chunk: bytes) -> bytes:
        self.buf += chunk.replace(b"\r\n", b"\n")
        end = self.buf.rfind(b"\n\n")
        if end < 0:
            return b""
        whole, self.buf = self.buf[: end + 2], self.buf[end + 2 :]
        out = []
        start = 0
        while start < len(whole):
            i = whole.find(b"\n\n", start)
            out.append(self._event(whole[start : i + 2]))
            start = i + 2
        return b"".join(out)

    def flush(self) -> bytes:
        """At a clean end of stream: whatever is left, as an event of its own."""
        rest, self.buf = self.buf, b""
        if not rest.strip():
            return b""
        return self._event(rest if rest.endswith(b"\n\n") else rest.rstrip(b"\n") + b"\n\n")

    @property
    def ended_knowingly(self) -> bool:
        return self.done or self.errored


# The logprob merge's name for the framer with a transform.
SSETransform = SSEFramer


async def relay(
    request: web.Request, worker: Worker, resp: aiohttp.ClientResponse, first: bytes, transform: SSEFramer | None = None
) -> tuple[web.StreamResponse, bool | None]:
    """Commits the worker's status and content type to the client, writes `first`, then
    every further chunk. Returns the response and a verdict on the worker: True (the
    stream ended cleanly), False (the worker broke it), None (the client went away)."""
    ctype = resp.headers.get("Content-Type", "text/event-stream")
    headers = {"Content-Type": ctype, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    framer = transform
    if framer is None and ctype.startswith("text/event-stream"):
        framer = SSEFramer()
    out = web.StreamResponse(status=resp.status, headers=headers)
    try:
        await out.prepare(request)
        if first:
            data = framer.feed(first) if framer else first
            if data:
                await out.write(data)
        while True:
            try:
                chunk = await resp.content.readany()
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                why = "timed out" if isinstance(e, asyncio.TimeoutError) else f"{type(e).__name__}: {e}"
                logger.warning("%s worker %s broke its stream: %s", worker.role.value, worker.url, why)
                if framer is not None:
                    # the partial event (if any) is dropped: it was cut by the failure
                    await out.write(
                        sse_error(
                            f"{worker.role.value} worker {worker.url} broke the stream "
                            f"before it ended ({why}); the output is incomplete"
                        )
                    )
                await out.write_eof()
                return out, False
            if not chunk:
                break
            data = framer.feed(chunk) if framer else chunk
            if data:
                await out.write(data)
        if framer is not None:
            tail = framer.flush()
            if tail:
                await out.write(tail)
            if not framer.ended_knowingly:
                logger.warning("%s worker %s ended its stream without [DONE]", worker.role.value, worker.url)
                await out.write(
                    sse_error(
                        f"{worker.role.value} worker {worker.url} ended the stream without "
                        "[DONE]; the output may be incomplete"
                    )
                )
                await out.write_eof()
                return out, False
        await out.write_eof()
        return out, True
    except ConnectionError:  # aiohttp's ClientConnectionResetError is one
        # the client went away; closing the upstream response (by the caller) aborts it there
        return out, None
