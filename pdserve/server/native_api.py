"""SGLang's native routes: /generate, health, model and server info, load, cache flush,
abort and /metrics; and Semi-PD's /semi_pd/status and /semi_pd/reallocate (docs/semi_pd.md)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pdserve.messages import AbortReq, encode
from pdserve.sampling_params import SamplingParams
from pdserve.semi_pd.allocation import SMAllocation
from pdserve.server.metrics import ServerMetrics
from pdserve.server.pd_fields import bootstrap_for, check_pd_fields
from pdserve.server.protocol import as_bool, as_int, is_token_list, sampling_from_dict
from pdserve.server.responses import (
    SSE_DONE,
    abort_event,
    collect,
    error_response,
    guarded,
    merge,
    read_json,
    run_until_disconnect,
    sse,
    status_of,
)
from pdserve.server.tokenizer_manager import TokenizerManager


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


async def _generate_events(gens: list[AsyncIterator[dict]]) -> AsyncIterator[bytes]:
    """/generate's stream: each output as an event (with its `index` when batched), [DONE]
    at the end; an aborted request's error event ends it instead."""
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


async def _closing_stream(gens: list[AsyncIterator[dict]]) -> AsyncIterator[bytes]:
    events = _generate_events(gens)
    try:
        async for chunk in events:
            yield chunk
    finally:  # in order: the merge's pumps stop before their generators close
        await events.aclose()
        for gen in gens:
            await gen.aclose()


class NativeRoutes:
    """The native routes of one server (SGLang's names and answers)."""

    def __init__(self, tm: TokenizerManager, metrics: ServerMetrics, served_model_name: str, model_path: str) -> None:
        self.tm = tm
        self.metrics = metrics
        self.served_model_name = served_model_name
        self.model_path = model_path

    async def generate(self, request: Request):
        tm = self.tm
        body = await read_json(request)
        g = GenerateInputs(body, tm)
        check_pd_fields(tm, [boot for _, _, _, boot in g.items])

        def start(item):
            ids, sp, rid, boot = item
            return tm.generate(
                ids, sp, rid=rid, return_logprob=g.return_logprob, top_logprobs_num=g.top_logprobs_num, bootstrap=boot
            )

        for ids, sp, _, _ in g.items:  # validate all before starting any
            tm.validate(ids, sp, g.top_logprobs_num)
            await tm.check_grammar(sp)
        if g.stream:
            gens = [start(it) for it in g.items]
            return StreamingResponse(guarded(_closing_stream(gens)), media_type="text/event-stream")
        results = await run_until_disconnect(request, asyncio.gather(*(collect(start(it)) for it in g.items)))
        if not g.batched:
            code = status_of(results[0])
            if code != 200:  # failed: SGLang's error shape, the partial result beside it
                fr = results[0]["meta_info"]["finish_reason"]
                return error_response(fr.get("message") or "request aborted", code, "Error")
            return JSONResponse(results[0])
        return JSONResponse(results)

    async def health(self):
        if self.tm.dead:
            return Response(status_code=503)
        return Response(status_code=200)

    async def health_generate(self):
        out = await asyncio.wait_for(
            collect(self.tm.generate([1], SamplingParams(max_new_tokens=1, temperature=0))), 60
        )
        return Response(status_code=200 if out else 503)

    async def get_model_info(self):
        tm = self.tm
        return {
            "model_path": self.model_path,
            "tokenizer_path": tm.args.tokenizer_path or self.model_path,
            "served_model_name": self.served_model_name,
            "is_generation": True,
            "arch": tm.info.get("arch"),
            "context_length": tm.info.get("context_length"),
        }

    async def get_server_info(self):
        tm = self.tm
        args = asdict(tm.args)
        for k in ("api_key", "admin_api_key"):  # never shown
            args[k] = "<set>" if args.get(k) else None
        args["model_path"] = self.model_path
        args["served_model_name"] = self.served_model_name
        info = dict(tm.info)
        info.update(await tm.get_load())
        return {**args, **info, "version": __import__("pdserve").__version__}

    async def get_load(self):
        return await self.tm.get_load()

    async def flush_cache(self):
        if await self.tm.flush_cache():
            return Response("Cache flushed.\n", status_code=200)
        return Response("Cache not flushed: requests are running.\n", status_code=400)

    async def abort_request(self, request: Request):
        body = await read_json(request)
        rid = body.get("rid")
        if not isinstance(rid, str):
            raise ValueError("rid must be a string")
        st = self.tm.states.get(rid)
        if st is not None:
            await self.tm.send_sock.send(encode(AbortReq(rid)))
        return {"success": st is not None}

    async def semi_pd_status(self):
        return await self.tm.semi_pd_status()  # ValueError (400) when Semi-PD is off

    async def semi_pd_reallocate(self, request: Request):
        body = await read_json(request)
        unknown = set(body) - {"prefill_percentage", "decode_percentage"}
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}: send prefill_percentage and decode_percentage")
        alloc = SMAllocation(body.get("prefill_percentage"), body.get("decode_percentage"))  # ValueError -> 400
        resp = await self.tm.semi_pd_reallocate(alloc.prefill_percentage, alloc.decode_percentage)
        if not resp.ok:
            return error_response(resp.error or "reallocation refused", 409, "Conflict")
        return resp.status

    async def get_metrics(self):
        self.metrics.set_load(await self.tm.get_load())
        if self.tm.args.semi_pd_enabled:
            self.metrics.set_semi_pd(await self.tm.semi_pd_status())
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")


def add_native_routes(
    app: FastAPI, tm: TokenizerManager, metrics: ServerMetrics, served_model_name: str, model_path: str
) -> None:
    routes = NativeRoutes(tm, metrics, served_model_name, model_path)
    app.post("/generate")(routes.generate)
    app.get("/health")(routes.health)
    app.get("/health_generate")(routes.health_generate)
    app.get("/get_model_info")(routes.get_model_info)
    app.get("/model_info")(routes.get_model_info)  # SGLang serves both names
    app.get("/get_server_info")(routes.get_server_info)
    app.get("/server_info")(routes.get_server_info)
    app.get("/get_load")(routes.get_load)
    app.api_route("/flush_cache", methods=["GET", "POST"])(routes.flush_cache)
    app.post("/abort_request")(routes.abort_request)
    app.get("/metrics")(routes.get_metrics)
    app.get("/semi_pd/status")(routes.semi_pd_status)
    app.post("/semi_pd/reallocate")(routes.semi_pd_reallocate)  # an admin path (guard.py)
