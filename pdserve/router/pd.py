"""PD dispatch: pick a (prefill, decode) pair, add the bootstrap fields, send the same
body to both at once, answer with decode's response, merge prefill's input logprobs.

One attempt, step by step:
1. `bootstrap_host` (the prefill URL's host), `bootstrap_port` (its bootstrap port or
   null) and `bootstrap_room` (random in [0, 2**63-1]) are added; lists of the batch
   size for batched requests. The same bytes go to both workers.
2. Prefill runs as its own job: once its status is known it settles a verdict; on
   success it keeps draining its answer in the background.
3. Decode is read until it has produced data (the whole body, or for `stream: true`
   its first chunk) while the prefill verdict is watched: a prefill failure cancels
   decode at once (no waiting for decode's bootstrap timeout).
4. Nothing has reached the client until then, so failures can be retried on a new
   pair. After that decode's status and body are relayed as they arrive.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
from typing import Any

import aiohttp
from aiohttp import web

from pdserve.router.attempt import AttemptContext
from pdserve.router.body import batch_size
from pdserve.router.metrics import ErrorKind
from pdserve.router.relay import SSETransform, relay
from pdserve.router.upstream import AttemptFailed, is_ok, open_request, read_body, read_first_chunk, status_failure
from pdserve.router.workers import Role, Worker

logger = logging.getLogger("pdserve.router")

MAX_ROOM = 2**63 - 1
LOGPROB_KEYS = ("input_token_logprobs", "input_top_logprobs", "input_token_ids_logprobs")


def new_room(rng: random.Random | None = None) -> int:
    return (rng or random).randint(0, MAX_ROOM)


def inject_bootstrap(body: dict, prefill: Worker, batch: int | None, rng: random.Random | None = None) -> dict:
    """A copy of `body` with SGLang's three bootstrap fields (lists for a batch)."""
    out = dict(body)
    if batch is None:
        out["bootstrap_host"] = prefill.bootstrap_host
        out["bootstrap_port"] = prefill.bootstrap_port
        out["bootstrap_room"] = new_room(rng)
    else:
        out["bootstrap_host"] = [prefill.bootstrap_host] * batch
        out["bootstrap_port"] = [prefill.bootstrap_port] * batch
        out["bootstrap_room"] = [new_room(rng) for _ in range(batch)]
    return out


# ---- logprob merge -------------------------------------------------------------------------
def merge_meta(decode_out: Any, prefill_out: Any) -> None:
    """decode.meta_info[k] = prefill.meta_info[k] + decode.meta_info[k] for the input
    logprob keys prefill has (in place; one result dict each)."""
    if not (isinstance(decode_out, dict) and isinstance(prefill_out, dict)):
        return
    dm, pm = decode_out.get("meta_info"), prefill_out.get("meta_info")
    if not (isinstance(dm, dict) and isinstance(pm, dict)):
        return
    for k in LOGPROB_KEYS:
        if isinstance(pm.get(k), list):
            dm[k] = pm[k] + (dm.get(k) if isinstance(dm.get(k), list) else [])


def merge_logprobs(decode_body: bytes, prefill_body: bytes) -> bytes:
    """Non-stream /generate: single results or batched lists, element by element."""
    try:
        d, p = json.loads(decode_body), json.loads(prefill_body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return decode_body
    if isinstance(d, list) and isinstance(p, list):
        for di, pi in zip(d, p):
            merge_meta(di, pi)
    else:
        merge_meta(d, p)
    return json.dumps(d).encode()


def sse_events(raw: bytes) -> list[Any]:
    """The JSON objects of an SSE body (skips [DONE] and anything unparsable)."""
    out = []
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data and data != b"[DONE]":
                try:
                    out.append(json.loads(data))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    pass
    return out


def stream_merger(prefill_body: bytes) -> SSETransform:
    """Streamed /generate with logprobs: every decode event gets the input logprobs of
    prefill's first event with the same `index`."""
    firsts: dict[int, dict] = {}
    for ev in sse_events(prefill_body):
        if isinstance(ev, dict):
            firsts.setdefault(int(ev.get("index", 0) or 0), ev)

    def fn(event: bytes) -> bytes:
        text = event.strip()
        if not text.startswith(b"data:") or text[5:].strip() == b"[DONE]":
            return event
        try:
            ev = json.loads(text[5:].strip())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return event
        if isinstance(ev, dict):
            merge_meta(ev, firsts.get(int(ev.get("index", 0) or 0)))
        return b"data: " + json.dumps(ev).encode() + b"\n\n"

    return SSETransform(fn)


# ---- one attempt ---------------------------------------------------------------------------
async def _prefill_job(
    router: AttemptContext,
    w: Worker,
    path: str,
    data: bytes,
    headers: dict[str, str],
    verdict: asyncio.Future,
    need_body: bool,
) -> bool:
    """Sends to prefill; settles `verdict` with the body (b"" when not needed) or an
    `AttemptFailed`; then drains the rest of a successful answer. Returns the verdict
    on the worker for its circuit breaker (cancelled: no verdict)."""
    resp: aiohttp.ClientResponse | None = None
    try:
        resp = await open_request(router.session, w, path, data, headers, router.upstream_timeout)
        if not is_ok(resp.status):
            fail = status_failure(w, resp, await read_body(w, resp))
            _settle(verdict, fail)
            return not fail.blames_worker
        if need_body:
            _settle(verdict, await read_body(w, resp))
            return True
        _settle(verdict, b"")
        await read_body(w, resp)  # drain: prefill's own answer is not the client's
        return True
    except AttemptFailed as f:
        if verdict.done():
            logger.warning("prefill %s failed after answering: %s", w.url, f.message)
        _settle(verdict, f)
        return False
    finally:
        if resp is not None:
            resp.close()


def _prefill_done(router: AttemptContext, w: Worker, verdict: asyncio.Future, task: asyncio.Task) -> None:
    """Bookkeeping once the prefill job ended, however it ended (even cancelled
    before it ran): the worker's in-flight count and breaker, and a verdict for a
    waiter if the job left none."""
    ok = None if task.cancelled() or task.exception() is not None else task.result()
    router.end(w, ok)
    _settle(verdict, AttemptFailed(w, ErrorKind.CONNECTION, f"prefill worker {w.url}: request ended without an answer"))


def _settle(verdict: asyncio.Future, value: Any) -> None:
    if not verdict.done():
        verdict.set_result(value)


async def _decode_first(
    router: AttemptContext, w: Worker, path: str, data: bytes, headers: dict[str, str], stream: bool
) -> tuple[aiohttp.ClientResponse, bytes]:
    """Decode's response and its first data: the whole body unless it is a 2xx stream."""
    resp = await open_request(router.session, w, path, data, headers, router.upstream_timeout)
    try:
        if stream and is_ok(resp.status):
            return resp, await read_first_chunk(w, resp)
        return resp, await read_body(w, resp)
    except BaseException:
        resp.close()
        raise


def _decode_succeeded(task: asyncio.Task) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None and is_ok(task.result()[0].status)


async def pd_attempt(
    router: AttemptContext, request: web.Request, path: str, body: dict, raw: bytes, key: str | None, excluded: set[str]
) -> web.StreamResponse:
    """One try on one pair; raises `AttemptFailed` when nothing reached the client."""
    prefill = router.select(Role.PREFILL, key, excluded)
    decode = router.select(Role.DECODE, key, excluded)
    payload = inject_bootstrap(body, prefill, batch_size(body, path), router.rng)
    data = json.dumps(payload).encode()
    headers = router.upstream_headers(request)
    stream = bool(body.get("stream"))
    merge = path == "/generate" and bool(body.get("return_logprob"))

    verdict: asyncio.Future = asyncio.get_running_loop().create_future()
    router.begin(prefill)  # now, not when the task first runs: a half-open probe is taken at once
    p_task = router.spawn(_prefill_job(router, prefill, path, data, headers, verdict, need_body=merge))
    p_task.add_done_callback(functools.partial(_prefill_done, router, prefill, verdict))

    router.begin(decode)
    decode_ok: bool | None = None
    committed = False
    d_task = asyncio.ensure_future(_decode_first(router, decode, path, data, headers, stream))
    try:
        while not d_task.done():
            await asyncio.wait(
                {d_task, verdict} if not verdict.done() else {d_task}, return_when=asyncio.FIRST_COMPLETED
            )
            v = verdict.result() if verdict.done() else None
            if isinstance(v, AttemptFailed) and not _decode_succeeded(d_task):
                raise v  # the client gets prefill's error now; decode is cancelled below
        try:
            resp, first = d_task.result()
        except AttemptFailed as f:
            decode_ok = False
            raise f
        if not is_ok(resp.status):
            fail = status_failure(decode, resp, first)
            decode_ok = not fail.blames_worker
            raise fail
        committed = True
        if not stream:
            if merge:
                v = await verdict
                if isinstance(v, bytes):
                    first = merge_logprobs(first, v)
            decode_ok = True
            ctype = resp.headers.get("Content-Type", "application/json")
            return web.Response(status=resp.status, body=first, headers={"Content-Type": ctype})
        transform = None
        if merge:
            v = await verdict
            if isinstance(v, bytes):
                transform = stream_merger(v)
        out, decode_ok = await relay(request, decode, resp, first, transform)
        return out
    finally:
        if not d_task.done():
            d_task.cancel()
        try:
            resp_, _ = await d_task
            resp_.close()
        except BaseException:  # cancelled or failed: nothing left open
            pass
        if not committed and not p_task.done():
            p_task.cancel()  # the pair failed: stop prefill's work too
        router.end(decode, decode_ok)
