"""Plain (non-PD) dispatch: one worker per request, the body forwarded unchanged."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from pdserve.router.attempt import AttemptContext
from pdserve.router.relay import relay
from pdserve.router.upstream import AttemptFailed, is_ok, open_request, read_body, read_first_chunk, status_failure
from pdserve.router.workers import Role


async def plain_attempt(
    router: AttemptContext, request: web.Request, path: str, body: dict, raw: bytes, key: str | None, excluded: set[str]
) -> web.StreamResponse:
    """One try on one worker; raises `AttemptFailed` when nothing reached the client."""
    w = router.select(Role.REGULAR, key, excluded)
    router.begin(w)
    ok: bool | None = None
    resp: aiohttp.ClientResponse | None = None
    try:
        resp = await open_request(
            router.session, w, path, raw, router.upstream_headers(request), router.upstream_timeout
        )
        if not is_ok(resp.status):
            fail = status_failure(w, resp, await read_body(w, resp))
            ok = not fail.blames_worker
            raise fail
        streaming = bool(body.get("stream")) or resp.headers.get("Content-Type", "").startswith("text/event-stream")
        if streaming:
            first = await read_first_chunk(w, resp)  # still retryable until this arrives
            out, ok = await relay(request, w, resp, first)
            return out
        data = await read_body(w, resp)
        ok = True
        return web.Response(
            status=resp.status,
            body=data,
            headers={"Content-Type": resp.headers.get("Content-Type", "application/json")},
        )
    except AttemptFailed as f:
        if ok is None and f.worker is w:
            ok = not f.blames_worker
        raise
    finally:
        if resp is not None:
            resp.close()
        router.end(w, ok)
