"""HTTP front end: SGLang-style native API and the OpenAI API over one TokenizerManager."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.sampling_params import SamplingParams
from pdserve.enums import DisaggregationMode
from pdserve.router.body import parse_body
from pdserve.server.guard import BodyTooLarge, Guard
from pdserve.server.protocol import as_bool, as_int, is_token_list, sampling_from_dict
from pdserve.server.tokenizer_manager import SchedulerDied, TokenizerManager

logger = logging.getLogger("pdserve.http")


def error_response(message: str, status: int = 400, err_type: str = "BadRequestError",
                   param: str | None = None, code: str | int | None = None) -> JSONResponse:
    # OpenAI's error shape (param: the offending request field); SGLang clients read error.message too
    err = {"message": message, "type": err_type, "param": param, "code": status if code is None else code}
    return JSONResponse({"error": err, "object": "error", "message": message}, status_code=status)


async def read_json(request: Request) -> dict:
    """The body as a JSON object; ValueError (the router's BadRequest) otherwise."""
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


def bootstrap_for(host, port, room, copy: int) -> tuple:
    """PD fields of one generation; the n copies of one prompt use rooms room + i
    (SGLang's rule), so they do not collide."""
    if room is not None:
        if isinstance(room, bool) or not isinstance(room, int):
            raise ValueError("bootstrap_room must be an integer")
        room += copy
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
        raise ValueError("bootstrap_port must be an integer or null")
    if host is not None and not isinstance(host, str):
        raise ValueError("bootstrap_host must be a string")
    return host, port, room


def check_pd_fields(tm: TokenizerManager, boots: list[tuple]) -> None:
    """A prefill or decode server answers only the router's requests: alone it would prefill
    and stop, or wait for KV that never comes (SGLang answers them with garbage)."""
    mode = tm.args.disaggregation_mode
    if mode == DisaggregationMode.NULL:
        return
    if any(host is None or room is None for host, _, room in boots):
        raise ValueError(f"this is a PD {mode} server: send requests to the router in front of it "
                         "(the `pdserve launch` endpoint, or `pdserve router --pd-disaggregation`), "
                         "which adds bootstrap_host, bootstrap_port and bootstrap_room")


class GenerateInputs:
    """Normalized /generate body: a list of single requests."""

    def __init__(self, body: dict, tm: TokenizerManager) -> None:
        text, ids = body.get("text"), body.get("input_ids")
        if (text is None) == (ids is None):
            raise ValueError("exactly one of `text` or `input_ids` is required")
        if text is not None:
            if isinstance(text, str):
                prompts, self.batched = [tm.tokenize(text)], False
            elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
                prompts, self.batched = [tm.tokenize(t) for t in text], True
            else:
                raise ValueError("text must be a string or a non-empty list of strings")
        else:
            if is_token_list(ids):
                prompts, self.batched = [ids], False
            elif isinstance(ids, list) and ids and all(is_token_list(x) for x in ids):
                prompts, self.batched = ids, True
            else:
                raise ValueError("input_ids must be a non-empty list of token ids or a list of such lists")
        n = len(prompts)
        sp = body.get("sampling_params")
        sps = [sampling_from_dict(s) for s in sp] if isinstance(sp, list) else [sampling_from_dict(sp)] * n
        if len(sps) != n:
            raise ValueError(f"sampling_params has {len(sps)} entries for {n} prompts")
        rid = body.get("rid")
        rids = rid if isinstance(rid, list) else [rid] * n
        if len(rids) != n or (n > 1 and rid is not None and not isinstance(rid, list)):
            raise ValueError("rid must be a list with one id per prompt for batched requests")
        if not all(r is None or isinstance(r, str) for r in rids):
            raise ValueError("rid must be a string (or, for batched requests, a list of strings)")

        def per(key: str) -> list:
            v = body.get(key)
            if isinstance(v, list) and len(v) != n:
                raise ValueError(f"{key} must be a list with one entry per prompt ({n}), got {len(v)}")
            return v if isinstance(v, list) else [v] * n

        hosts, ports, rooms = per("bootstrap_host"), per("bootstrap_port"), per("bootstrap_room")
        self.stream = as_bool(body, "stream")
        self.return_logprob = as_bool(body, "return_logprob")
        self.top_logprobs_num = as_int(body, "top_logprobs_num", 0, 0, 20)
        self.items: list[tuple[list[int], SamplingParams, str | None, tuple]] = []
        for i in range(n):
            copies = sps[i].n
            for j in range(copies):
                r = rids[i] if copies == 1 else (f"{rids[i]}-{j}" if rids[i] else None)
                self.items.append((prompts[i], sps[i], r, bootstrap_for(hosts[i], ports[i], rooms[i], j)))
        if len(self.items) > 1:
            self.batched = True


def build_app(tm: TokenizerManager, metrics, served_model_name: str, model_path: str) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)
    app.state.tm = tm

    @app.exception_handler(ValueError)
    async def _bad_request(_: Request, e: ValueError):
        if isinstance(e, ModelNotFound):
            return error_response(str(e), 404, "NotFoundError", param="model", code="model_not_found")
        return error_response(str(e), 400, param=getattr(e, "param", None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        # unknown routes and wrong methods in the same shape as every other error
        msg = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404:
            msg = f"{request.method} {request.url.path}: no such route (see /v1/models, /v1/chat/completions)"
        kinds = {404: "NotFoundError", 405: "MethodNotAllowed"}
        return error_response(msg, e.status_code, kinds.get(e.status_code, "Error"))

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, e: ClientDisconnected):
        logger.info("client disconnected from %s %s; request aborted", request.method, request.url.path)
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.exception_handler(SchedulerDied)
    async def _dead(_: Request, e: SchedulerDied):
        return error_response(str(e), 503, "ServiceUnavailable")

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, e: BodyTooLarge):
        return error_response(str(e), 413, "RequestTooLarge")

    app.add_middleware(Guard, api_key=tm.args.api_key, admin_api_key=tm.args.admin_api_key,
                       max_body=tm.args.max_payload_size)

    # ---- native API ---------------------------------------------------------------------
    @app.post("/generate")
    async def generate(request: Request):
        body = await read_json(request)
        g = GenerateInputs(body, tm)
        check_pd_fields(tm, [boot for _, _, _, boot in g.items])

        def start(item):
            ids, sp, rid, boot = item
            return tm.generate(ids, sp, rid=rid, return_logprob=g.return_logprob,
                               top_logprobs_num=g.top_logprobs_num, bootstrap=boot)

        for ids, sp, _, _ in g.items:  # validate all before starting any
            tm.validate(ids, sp, g.top_logprobs_num)
            await tm.check_grammar(sp)
        if g.stream:
            gens = [start(it) for it in g.items]

            async def stream() -> AsyncIterator[bytes]:
                events = _events()
                try:
                    async for chunk in events:
                        yield chunk
                finally:  # in order: the merge's pumps stop before their generators close
                    await events.aclose()
                    for gen in gens:
                        await gen.aclose()

            async def _events() -> AsyncIterator[bytes]:
                if len(gens) == 1:
                    async for out in gens[0]:
                        err = abort_event(out)
                        if err is not None:  # failed: an error event ends the stream, no [DONE]
                            yield err
                            return
                        yield sse(out)
                else:
                    merged = merge(gens)
                    try:
                        async for i, out in merged:
                            err = abort_event(out)
                            if err is not None:
                                yield err
                                return
                            out["index"] = i
                            yield sse(out)
                    finally:
                        await merged.aclose()
                yield SSE_DONE

            return StreamingResponse(guarded(stream()), media_type="text/event-stream")
        results = await run_until_disconnect(
            request, asyncio.gather(*(collect(start(it)) for it in g.items)))
        if not g.batched:
            code = status_of(results[0])
            if code != 200:  # failed: SGLang's error shape, the partial result beside it
                fr = results[0]["meta_info"]["finish_reason"]
                return error_response(fr.get("message") or "request aborted", code, "Error")
            return JSONResponse(results[0])
        return JSONResponse(results)

    @app.get("/health")
    async def health():
        if tm.dead:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate():
        out = await asyncio.wait_for(
            collect(tm.generate([1], SamplingParams(max_new_tokens=1, temperature=0))), 60)
        return Response(status_code=200 if out else 503)

    @app.get("/get_model_info")
    @app.get("/model_info")  # SGLang serves both names
    async def get_model_info():
        return {"model_path": model_path, "tokenizer_path": tm.args.tokenizer_path or model_path,
                "served_model_name": served_model_name, "is_generation": True,
                "arch": tm.info.get("arch"), "context_length": tm.info.get("context_length")}

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info():
        from dataclasses import asdict

        args = asdict(tm.args)
        for k in ("api_key", "admin_api_key"):  # never shown
            args[k] = "<set>" if args.get(k) else None
        args["model_path"] = model_path
        args["served_model_name"] = served_model_name
        info = dict(tm.info)
        info.update(await tm.get_load())
        return {**args, **info, "version": __import__("pdserve").__version__}

    @app.get("/get_load")
    async def get_load():
        return await tm.get_load()

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        if await tm.flush_cache():
            return Response("Cache flushed.\n", status_code=200)
        return Response("Cache not flushed: requests are running.\n", status_code=400)

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await read_json(request)
        rid = body.get("rid")
        if not isinstance(rid, str):
            raise ValueError("rid must be a string")
        st = tm.states.get(rid)
        if st is not None:
            from pdserve.messages import AbortReq, encode

            await tm.send_sock.send(encode(AbortReq(rid)))
        return {"success": st is not None}

    @app.get("/metrics")
    async def get_metrics():
        metrics.set_load(await tm.get_load())
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    from pdserve.server.openai_api import add_openai_routes

    add_openai_routes(app, tm, served_model_name, model_path)
    return app


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
