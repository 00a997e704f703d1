"""What every route answers with: OpenAI-shaped errors, server-sent events, streams that
end knowingly, and generations that a client's disconnect cancels."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from pdserve.json_body import parse_body
from pdserve.server.tokenizer_manager import SchedulerDied

logger = logging.getLogger("pdserve.http")


def error_response(
    message: str,
    status: int = 400,
    err_type: str = "BadRequestError",
    param: str | None = None,
    code: str | int | None = None,
) -> JSONResponse:
    # OpenAI's error shape (param: the offending request field); SGLang clients read error.message too
    err = {"message": message, "type": err_type, "param": param, "code": status if code is None else code}
    return JSONResponse({"error": err, "object": "error", "message": message}, status_code=status)


async def read_json(request: Request) -> dict:
    """The body as a JSON object; ValueError (BadRequest) otherwise."""
    return parse_body(await request.body())


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(message: str, code: int = 500, err_type: str | None = None) -> bytes:
    """The event that ends a failed stream (no [DONE] after it): OpenAI's error shape."""
    err_type = err_type or ("BadRequestError" if code < 500 else "ServerError")
    return sse({"error": {"message": message, "type": err_type, "code": code}})


def abort_event(out: dict) -> bytes | None:
    """The error event for an output whose request the scheduler aborted, else None."""
    fr = out["meta_info"].get("finish_reason") or {}
    if fr.get("type") != "abort":
        return None
    return sse_error(fr.get("message") or "request aborted", int(fr.get("status_code") or 500))


async def guarded(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A stream that ends knowingly: a failure after the response started (the scheduler
    died, a bug) becomes an error event, with no [DONE] after it."""
    try:
        async for chunk in events:
            yield chunk
    except SchedulerDied as e:
        yield sse_error(str(e), 503, "ServiceUnavailable")
    except ValueError as e:
        yield sse_error(str(e), 400)
    except Exception as e:  # noqa: BLE001 - reported to the client, logged here
        logger.exception("stream failed")
        yield sse_error(f"internal error: {type(e).__name__}: {e}", 500)
    finally:
        await events.aclose()


class ModelNotFound(ValueError):
    """A `model` this server does not serve: 404 model_not_found (OpenAI's and vLLM's answer)."""

    param = "model"


class ClientDisconnected(Exception):
    """A non-streaming client went away; its request was aborted (logged at INFO)."""


async def _watch_disconnect(request: Request, task: asyncio.Task, gone: list) -> None:
    while not task.done():
        if await request.is_disconnected():
            gone.append(True)
            task.cancel()
            return
        await asyncio.sleep(0.25)


async def run_until_disconnect(request: Request, coro) -> Any:
    """Run a non-streaming generation; a client that goes away cancels it (and the
    generator's cleanup aborts the request in the scheduler, freeing its pages)."""
    task = asyncio.ensure_future(coro)
    gone: list = []
    watcher = asyncio.ensure_future(_watch_disconnect(request, task, gone))
    try:
        return await task
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if gone and not (me is not None and me.cancelling()):
            raise ClientDisconnected(request.url.path) from None
        raise
    finally:
        watcher.cancel()


async def collect(gen: AsyncIterator[dict]) -> dict:
    last = None
    async for last in gen:
        pass
    return last


def status_of(result: dict) -> int:
    fr = result["meta_info"].get("finish_reason") or {}
    return int(fr.get("status_code") or 500) if fr.get("type") == "abort" else 200


async def merge(gens: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """Interleave several generators as their items arrive: (index, item)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, g: AsyncIterator[dict]) -> None:
        try:
            async for x in g:
                await queue.put((i, x))
        except Exception as e:  # noqa: BLE001 - re-raised to the consumer below
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    remaining = len(tasks)
    try:
        while remaining:
            i, x = await queue.get()
            if x is done:
                remaining -= 1
                continue
            if isinstance(x, Exception):
                raise x
            yield i, x
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now_s() -> int:
    return int(time.time())
