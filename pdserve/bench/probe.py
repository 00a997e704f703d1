"""What the benchmark asks a server before it starts: is it up, what does it serve.

Only `/health` decides reachability: any HTTP answer (even 404 from a server that
has no such route) means something is listening; a refused connection, a DNS
failure or a timeout means the target is unreachable and the benchmark stops with
a non-zero exit before sending any work.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp


class UnreachableError(RuntimeError):
    """The target server did not answer at all."""


@dataclass
class ServerInfo:
    health_status: int
    models: list[str] = field(default_factory=list)  # ids from /v1/models
    model_info: dict[str, Any] = field(default_factory=dict)  # /get_model_info

    @property
    def model_path(self) -> str | None:
        path = self.model_info.get("model_path")
        return path if isinstance(path, str) and path else None


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return None
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


async def probe_server(base_url: str, timeout_s: float = 10.0) -> ServerInfo:
    """Checks that `base_url` answers and collects its model names.

    Raises `UnreachableError` when `GET /health` gets no HTTP answer in `timeout_s`.
    """
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with session.get(base_url + "/health") as resp:
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            detail = str(e) or f"no answer in {timeout_s:g} s"
            raise UnreachableError(f"cannot reach {base_url}: {type(e).__name__}: {detail}") from None
        info = ServerInfo(health_status=status)
        models = await _get_json(session, base_url + "/v1/models")
        if isinstance(models, dict):
            info.models = [m["id"] for m in models.get("data", []) if isinstance(m, dict) and "id" in m]
        model_info = await _get_json(session, base_url + "/get_model_info")
        if isinstance(model_info, dict):
            info.model_info = model_info
        return info


async def flush_cache(session: aiohttp.ClientSession, base_url: str) -> str | None:
    """`POST /flush_cache` (pdserve/SGLang); returns an error text or None."""
    try:
        async with session.post(base_url + "/flush_cache") as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return f"{type(e).__name__}: {e}"


async def profile(session: aiohttp.ClientSession, base_url: str, start: bool) -> tuple[list[str], str | None]:
    """`POST /start_profile` or `/stop_profile` (SGLang's names): (trace paths the server, or
    each worker behind a router, reported; an error text or None). The traces are written on
    the servers' machines, named `<id>-<role>.trace.json.gz`."""
    path = "/start_profile" if start else "/stop_profile"
    try:
        async with session.post(base_url + path, json={}) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = None
            if resp.status != 200:
                msg = (
                    body.get("error", {}).get("message")
                    if isinstance(body, dict) and isinstance(body.get("error"), dict)
                    else None
                )
                return [], f"HTTP {resp.status}" + (f": {msg}" if msg else "")
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return [], f"{type(e).__name__}: {e}"
    bodies = (
        [w.get("body") for w in body.get("workers", [])] if isinstance(body, dict) and "workers" in body else [body]
    )
    return [b["trace_path"] for b in bodies if isinstance(b, dict) and b.get("trace_path")], None
