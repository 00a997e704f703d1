"""The router's HTTP app (aiohttp): generation routes, probes, proxies, admin, metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from pdserve.router.config import check_url, normalize_url
from pdserve.router.metrics import ErrorKind
from pdserve.router.router import Router
from pdserve.router.upstream import error_response
from pdserve.router.weights import add_weights_routes
from pdserve.router.workers import Role, Worker, parse_load

ROUTER_KEY = web.AppKey("router", Router)
GENERATION_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
OPEN_PATHS = frozenset({"/health", "/liveness", "/readiness"})  # probes need no API key
PROXY_TIMEOUT = aiohttp.ClientTimeout(total=30)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(obj), content_type="application/json")


def build_app(router: Router) -> web.Application:
    """The aiohttp application; `router.start/stop` run on its startup/cleanup."""
    app = web.Application(
        client_max_size=router.config.max_payload_size, middlewares=[_auth_middleware(router), _size_middleware(router)]
    )
    app[ROUTER_KEY] = router

    async def on_startup(_: web.Application) -> None:
        await router.start()

    async def on_cleanup(_: web.Application) -> None:
        await router.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    h = _Handlers(router)
    for path in GENERATION_ROUTES:
        app.router.add_post(path, h.generation(path))
    app.router.add_get("/health", h.health)
    app.router.add_get("/liveness", h.health)
    app.router.add_get("/readiness", h.readiness)
    app.router.add_get("/health_generate", h.health_generate)
    app.router.add_get("/v1/models", h.proxy_get("/v1/models"))
    app.router.add_get("/get_model_info", h.proxy_get("/get_model_info"))
    app.router.add_get("/get_server_info", h.get_server_info)
    app.router.add_route("*", "/flush_cache", h.flush_cache)
    for path in ("/start_profile", "/stop_profile"):  # every worker profiles; traces named by role
        app.router.add_route("*", path, h.profile(path))
    app.router.add_get("/get_load", h.get_load)
    app.router.add_get("/get_loads", h.get_load)
    app.router.add_post("/abort_request", h.abort_request)
    app.router.add_get("/metrics", h.metrics)
    app.router.add_get("/workers", h.list_workers)
    app.router.add_get("/list_workers", h.list_workers)
    app.router.add_post("/add_worker", h.add_worker)
    app.router.add_post("/remove_worker", h.remove_worker)
    add_weights_routes(app, h)  # RL weight sync and memory release, to every worker (#15)
    return app


def _size_middleware(router: Router):
    """Bodies over --max-payload-size: 413 with a message, from the declared length before
    any of the body is read, or as soon as a chunked body passes the limit (aiohttp counts
    while it reads and stops there)."""
    limit = router.config.max_payload_size
    message = f"request body is larger than the limit of {limit} bytes (--max-payload-size)"

    @web.middleware
    async def size(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if request.content_length is not None and request.content_length > limit:
            router.metrics.error(ErrorKind.BAD_REQUEST)
            return error_response(413, message, "RequestTooLarge")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            router.metrics.error(ErrorKind.BAD_REQUEST)
            return error_response(413, message, "RequestTooLarge")

    return size


def _auth_middleware(router: Router):
    key = router.config.api_key
    expected = f"Bearer {key}".encode() if key else None

    @web.middleware
    async def auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if expected is not None and request.path not in OPEN_PATHS:
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                router.metrics.error(ErrorKind.UNAUTHORIZED)
                return error_response(
                    401, "missing or invalid API key (Authorization: Bearer <key>)", "AuthenticationError"
                )
        return await handler(request)

    return auth


class _Handlers:
    def __init__(self, router: Router) -> None:
        self.r = router

    # ---- generation -----------------------------------------------------------------------
    def generation(self, path: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self.r.dispatch(request, path)

        return handler

    # ---- probes ---------------------------------------------------------------------------
    async def health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    def _readiness(self) -> tuple[bool, dict]:
        pool = self.r.pool
        roles = (Role.PREFILL, Role.DECODE) if self.r.pd else (Role.REGULAR,)
        counts = {role.value: {"healthy": len(pool.healthy(role)), "total": len(pool.by_role(role))} for role in roles}
        return all(counts[r.value]["healthy"] > 0 for r in roles), counts

    async def readiness(self, _: web.Request) -> web.Response:
        ready, counts = self._readiness()
        return _json({"status": "ready" if ready else "not ready", "workers": counts}, 200 if ready else 503)

    async def health_generate(self, _: web.Request) -> web.Response:
        results = await self._fan_out("GET", "/health_generate", self.r.pool.workers, timeout=60)
        ok = bool(results) and all(x["status"] == 200 for x in results)
        return _json({"healthy": ok, "workers": results}, 200 if ok else 503)

    # ---- proxies --------------------------------------------------------------------------
    def _proxy_order(self) -> list[Worker]:
        """Decode first in PD mode (it answers the client), healthy ones first."""
        pool = self.r.pool
        roles = (Role.DECODE, Role.PREFILL) if self.r.pd else (Role.REGULAR,)
        ws = [w for role in roles for w in pool.by_role(role)]
        return sorted(ws, key=lambda w: not w.available)

    def proxy_get(self, path: str):
        async def handler(request: web.Request) -> web.Response:
            last = "no worker registered"
            for w in self._proxy_order():
                try:
                    async with self.r.session.get(
                        w.url + path, headers=self.r.upstream_headers(request), timeout=PROXY_TIMEOUT
                    ) as resp:
                        body = await resp.read()
                        if resp.status < 500:
                            return web.Response(
                                status=resp.status,
                                body=body,
                                headers={"Content-Type": resp.headers.get("Content-Type", "application/json")},
                            )
                        last = f"{w.url} answered {resp.status}"
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                    last = f"{w.url}: {type(e).__name__}: {e}"
            return error_response(503, f"no worker answered {path}: {last}", "ServiceUnavailable")

        return handler

    async def get_server_info(self, request: web.Request) -> web.Response:
        if not self.r.pd:
            return await self.proxy_get("/get_server_info")(request)
        prefill = await self._fan_out("GET", "/get_server_info", self.r.pool.by_role(Role.PREFILL))
        decode = await self._fan_out("GET", "/get_server_info", self.r.pool.by_role(Role.DECODE))
        infos = [x.get("body") for x in decode]
        states = [s for i in infos if isinstance(i, dict) for s in i.get("internal_states", []) or []]
        # SGLang's shape: what bench_one_batch_server reads, plus each side's own info
        return _json(
            {
                "internal_states": states or [{"last_gen_throughput": 0.0, "avg_spec_accept_length": None}],
                "prefill": [x.get("body") for x in prefill],
                "decode": infos,
            }
        )

    async def flush_cache(self, _: web.Request) -> web.Response:
        results = await self._fan_out("POST", "/flush_cache", self.r.pool.workers, admin=True)
        failed = [x for x in results if x["status"] != 200]
        if not failed:
            return _json({"success": True, "workers": results})
        status = failed[0]["status"] if isinstance(failed[0]["status"], int) else 502
        return _json({"success": False, "workers": results}, status)

    def profile(self, path: str):
        """/start_profile, /stop_profile: sent to every worker (the body as it came), so a
        PD deployment's prefill and decode servers each write their own trace."""

        async def handler(request: web.Request) -> web.Response:
            raw = await request.read()
            results = await self._fan_out("POST", path, self.r.pool.workers, timeout=120, data=raw or None, admin=True)
            failed = [x for x in results if x["status"] != 200]
            if not failed:
                return _json({"success": True, "workers": results})
            status = failed[0]["status"] if isinstance(failed[0]["status"], int) else 502
            return _json({"success": False, "workers": results}, status)

        return handler

    async def get_load(self, _: web.Request) -> web.Response:
        results = await self._fan_out("GET", "/get_load", self.r.pool.workers)
        for x in results:
            x["load"] = parse_load(x.get("body")) if x["status"] == 200 else None
        if not self.r.pd:
            return _json({"workers": results})
        return _json(
            {role.value: [x for x in results if x["role"] == role.value] for role in (Role.PREFILL, Role.DECODE)}
        )

    async def abort_request(self, request: web.Request) -> web.Response:
        raw = await request.read()
        results = await self._fan_out("POST", "/abort_request", self.r.pool.workers, data=raw, admin=True)
        hit = any(isinstance(x.get("body"), dict) and x["body"].get("success") for x in results)
        return _json({"success": hit, "workers": results})

    async def _fan_out(
        self,
        method: str,
        path: str,
        workers: list[Worker],
        timeout: float = 30,
        data: bytes | None = None,
        admin: bool = False,
    ) -> list[dict]:
        """One call per worker, concurrently; never raises."""
        headers = self.r.worker_headers(admin)
        if data is not None:
            headers["Content-Type"] = "application/json"

        async def one(w: Worker) -> dict:
            out: dict[str, Any] = {"url": w.url, "role": w.role.value}
            try:
                async with self.r.session.request(
                    method, w.url + path, headers=headers, data=data, timeout=aiohttp.ClientTimeout(total=timeout)
                ) as resp:
                    out["status"] = resp.status
                    text = await resp.text()
                    try:
                        out["body"] = json.loads(text)
                    except ValueError:
                        out["body"] = text
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                out["status"] = None
                out["error"] = f"{type(e).__name__}: {e}"
            return out

        return list(await asyncio.gather(*(one(w) for w in workers)))

    # ---- metrics and admin ----------------------------------------------------------------
    async def metrics(self, _: web.Request) -> web.Response:
        body = self.r.metrics.render(self.r.pool.workers)
        return web.Response(body=body, headers={"Content-Type": self.r.metrics.content_type})

    async def list_workers(self, _: web.Request) -> web.Response:
        ws = [w.to_json() for w in self.r.pool.workers]
        return _json(
            {
                "mode": "pd" if self.r.pd else "plain",
                "workers": ws,
                "policies": {role.value: p.name for role, p in self.r.policies.items()},
            }
        )

    async def add_worker(self, request: web.Request) -> web.Response:
        """`?url=...&role=prefill|decode|regular&bootstrap_port=N|none` (role defaults to
        `regular` in plain mode)."""
        q = request.query
        url = q.get("url")
        default_role = "" if self.r.pd else Role.REGULAR.value
        try:
            role = Role(q.get("role", default_role))
        except ValueError:
            return error_response(400, "role must be prefill, decode or regular", "BadRequestError")
        if not url:
            return error_response(400, "url is required", "BadRequestError")
        if (role is Role.REGULAR) == self.r.pd:
            return error_response(400, f"role {role.value} does not fit this router's mode", "BadRequestError")
        port_s = q.get("bootstrap_port", "none")
        try:
            port = None if port_s.lower() in ("", "none", "null") else int(port_s)
            check_url("url", normalize_url(url))
            w = self.r.pool.add(url, role, port if role is Role.PREFILL else None)
        except ValueError as e:
            return error_response(400, str(e), "BadRequestError")
        return _json({"success": True, "worker": w.to_json()})

    async def remove_worker(self, request: web.Request) -> web.Response:
        url = request.query.get("url", "")
        try:
            w = self.r.pool.remove(url)
        except KeyError:
            return error_response(404, f"worker {url!r} is not registered", "NotFound")
        policy = self.r.policies.get(w.role)
        if policy is not None:
            policy.on_worker_removed(w.url)
        return _json({"success": True, "worker": w.to_json()})
