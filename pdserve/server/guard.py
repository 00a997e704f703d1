"""What every request passes before a route sees it: the API keys and the body limit.

A pure ASGI middleware (no buffering, streaming responses untouched).

Keys (`--api-key`, `--admin-api-key`; `Authorization: Bearer <key>`):
- paths under `/health` (`/health`, `/health_generate`) are open, as in SGLang;
- admin paths (`ADMIN_PATHS`: cache flush, aborts, and the weight / memory / profiling
  endpoints SGLang has, should they be added) need the admin key when one is set, else the
  API key when one is set; with neither they are open, as every path is;
- every other path needs the API key when one is set; the admin key is accepted too.
Wrong or missing key: 401 with OpenAI's error shape.

Body limit (`--max-payload-size`, bytes): a declared `Content-Length` over the limit is
refused with 413 before any of the body is read; a chunked upload is counted as it
arrives and refused (413) as soon as it passes the limit, so it is never held whole.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable

ADMIN_PATHS = frozenset(
    {
        "/flush_cache",
        "/abort_request",
        "/semi_pd/reallocate",
        # SGLang's admin endpoints, should pdserve grow them
        "/update_weights_from_disk",
        "/update_weights_from_tensor",
        "/update_weights_from_distributed",
        "/init_weights_update_group",
        "/destroy_weights_update_group",
        "/get_weights_by_name",
        "/release_memory_occupation",
        "/resume_memory_occupation",
        "/start_profile",
        "/stop_profile",
        "/configure_logging",
        "/pause_generation",
        "/continue_generation",
    }
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class BodyTooLarge(Exception):
    """A chunked body passed the limit while the route read it (answered 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than the limit of {limit} bytes (--max-payload-size)")


def error_body(message: str, status: int, err_type: str) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": err_type, "code": status}, "object": "error", "message": message}
    ).encode()


async def send_error(send: Send, status: int, message: str, err_type: str) -> None:
    body = error_body(message, status, err_type)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if status == 413:  # the rest of the body is never read: this connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _bearer(key: str | None) -> bytes | None:
    return f"Bearer {key}".encode() if key else None


class Guard:
    def __init__(
        self, app, *, api_key: str | None = None, admin_api_key: str | None = None, max_body: int | None = None
    ) -> None:
        self.app = app
        self.user = _bearer(api_key)
        self.admin = _bearer(admin_api_key)
        self.max_body = max_body

    def _allowed(self, path: str, got: bytes) -> bool:
        if path.startswith("/health"):
            return True
        if path in ADMIN_PATHS:
            need = [k for k in (self.admin or self.user,) if k]
        else:
            need = [k for k in (self.user, self.admin) if k] if self.user else []
        return not need or any(hmac.compare_digest(got, k) for k in need)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if (self.user or self.admin) and not self._allowed(scope.get("path", ""), headers.get(b"authorization", b"")):
            return await send_error(
                send, 401, "missing or invalid API key (Authorization: Bearer <key>)", "AuthenticationError"
            )
        limit = self.max_body
        if limit is None:
            return await self.app(scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await send_error(send, 400, "invalid Content-Length header", "BadRequestError")
            if n > limit:
                return await send_error(send, 413, str(BodyTooLarge(limit)), "RequestTooLarge")
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return msg

        return await self.app(scope, counted, send)
