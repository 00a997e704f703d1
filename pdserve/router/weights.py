"""The router's weight-sync and memory endpoints (issue #15): sent to every worker.

An RL trainer talks to one URL: the router sends each call to every worker (prefill and
decode in PD mode), with the worker admin key (`--worker-admin-api-key`, else the worker
key), as it does /flush_cache. The answer is `{"success": all succeeded, "workers": [per
worker url, role, status, body]}`, with the first failing worker's status when one failed.

- `/update_weights_from_disk`, `/update_weights_from_tensor`, `/update_weights_from_distributed`,
  `/destroy_weights_update_group`, `/release_memory_occupation`, `/resume_memory_occupation`,
  `/pause_generation`, `/continue_generation`: the body as it came, to every worker. (Every
  engine receives the same broadcasts in `update_weights_from_distributed`.)
- `/init_weights_update_group`: the only one whose body differs per worker. Worker i joins
  with rank_offset + the tp sizes of the workers before it (each asked at /get_server_info),
  slime's numbering, so prefill and decode may have different tp sizes; `world_size` must be
  rank_offset + the sum of all tp sizes (the trainer is rank 0).
- `/get_weights_by_name`: every worker's answer; the common one when all workers agree (what
  SGLang answers), else 409 with each worker's.

Each engine checks an update whole and keeps its old weights when it refuses one; the router
does not undo an update on the workers that took it when another refused (they hold the same
model, so they accept and refuse the same updates).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from pdserve.router.upstream import error_response

FAN_OUT = (  # path -> timeout (s): a broadcast waits for the trainer; a release spools to disk
    ("/update_weights_from_disk", 600),
    ("/update_weights_from_tensor", 600),
    ("/update_weights_from_distributed", 3600),
    ("/destroy_weights_update_group", 60),
    ("/release_memory_occupation", 600),
    ("/resume_memory_occupation", 600),
    ("/pause_generation", 60),
    ("/continue_generation", 60),
)
JOIN_TIMEOUT = 600  # an engine answers /init_weights_update_group once the whole group is built


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(obj), content_type="application/json")


def _summary(results: list[dict]) -> web.Response:
    failed = [x for x in results if x["status"] != 200]
    if not failed:
        return _json({"success": True, "workers": results})
    status = failed[0]["status"] if isinstance(failed[0]["status"], int) else 502
    return _json({"success": False, "message": _first_message(failed[0]), "workers": results}, status)


def _first_message(x: dict) -> str:
    body = x.get("body")
    msg = body.get("message") if isinstance(body, dict) else body
    return f"{x['url']}: {msg or x.get('error') or x['status']}"


def add_weights_routes(app: web.Application, h: Any) -> None:
    """`h`: the app's handlers (pdserve/router/app.py: `_fan_out`, `r` the Router)."""

    def fan_out(path: str, timeout: float):
        async def handler(request: web.Request) -> web.Response:
            raw = await request.read()
            return _summary(
                await h._fan_out("POST", path, h.r.pool.workers, timeout=timeout, data=raw or None, admin=True)
            )

        return handler

    for path, timeout in FAN_OUT:
        app.router.add_post(path, fan_out(path, timeout))

    async def init_weights_update_group(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            return error_response(400, "the body is not JSON", "BadRequestError")
        if not isinstance(body, dict):
            return error_response(400, "the body must be a JSON object", "BadRequestError")
        base, world = body.get("rank_offset", 1), body.get("world_size")
        if not isinstance(base, int) or isinstance(base, bool) or base < 1:
            return error_response(400, "rank_offset must be an integer >= 1 (the trainer is rank 0)", "BadRequestError")
        workers = list(h.r.pool.workers)
        if not workers:
            return error_response(503, "no workers", "ServiceUnavailable")
        infos = await h._fan_out("GET", "/get_server_info", workers)
        sizes = []
        for x in infos:
            info = x.get("body")
            if x["status"] != 200 or not isinstance(info, dict):
                return error_response(502, f"cannot read {x['url']}/get_server_info: {_first_message(x)}", "BadGateway")
            sizes.append(int(info.get("tp_size") or 1))
        if world != base + sum(sizes):
            return error_response(
                400,
                f"world_size must be rank_offset + every worker's tp size = {base} + {sum(sizes)} = "
                f"{base + sum(sizes)} (workers' tp sizes {sizes}), got {world!r}",
                "BadRequestError",
            )
        offsets = [base + sum(sizes[:i]) for i in range(len(workers))]

        async def join(w, offset: int) -> dict:
            data = json.dumps({**body, "rank_offset": offset}).encode()
            (out,) = await h._fan_out("POST", "/init_weights_update_group", [w], JOIN_TIMEOUT, data, admin=True)
            out["rank_offset"] = offset
            return out

        return _summary(list(await asyncio.gather(*(join(w, o) for w, o in zip(workers, offsets)))))

    app.router.add_post("/init_weights_update_group", init_weights_update_group)

    async def get_weights_by_name(request: web.Request) -> web.Response:
        raw = await request.read()
        if not raw.strip() and request.query:
            raw = json.dumps(dict(request.query)).encode()
        results = await h._fan_out("POST", "/get_weights_by_name", h.r.pool.workers, 120, raw or None, admin=True)
        failed = [x for x in results if x["status"] != 200]
        if failed:
            return _summary(results)
        bodies = [x["body"] for x in results]
        if any(b != bodies[0] for b in bodies[1:]):
            return _json({"success": False, "message": "the workers' weights differ", "workers": results}, 409)
        return _json(bodies[0])

    app.router.add_route("*", "/get_weights_by_name", get_weights_by_name)
