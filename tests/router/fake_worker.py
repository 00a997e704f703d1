"""Fake workers that speak SGLang's / pdserve's HTTP protocol, for router tests.

Real aiohttp servers on 127.0.0.1 ephemeral ports, all on one event loop in a daemon
thread (`FakeLoop`). Each `FakeWorker` records every request it gets and answers in
SGLang's shapes (native /generate, OpenAI completions and chat, streamed or not).
Knobs let a test make it fail, slow, loaded or unhealthy.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MODEL = "fake-model"


@dataclass
class Received:
    path: str
    body: Any
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)


class FakeWorker:
    """One fake server. Thread-safe enough for tests: knobs are plain attributes read by
    the server loop, records are appended there and read after requests finish."""

    def __init__(self, name: str, role: str = "decode", *, chunks: int = 3) -> None:
        self.name = name
        self.role = role  # "prefill" | "decode" | "regular": shapes the logprobs it returns
        self.chunks = chunks
        self.received: list[Received] = []
        self.health_status = 200
        self.load: Any = {"num_running_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}
        self.fail_statuses: list[int] = []  # next generation requests answer these, in order
        self.response_delay = 0.0  # before any generation answer (headers included)
        self.chunk_delay = 0.0  # between stream chunks
        self.gate: threading.Event | None = None  # stream: the last chunk waits for it
        self.produced: list[float] = []  # monotonic time each stream chunk was written
        self.cancelled = 0  # generation requests whose client went away
        self.break_after: int | None = None  # stream: drop the connection after this many chunks
        self.send_done = True  # stream: end with `data: [DONE]`
        self.stream_error: dict | None = None  # stream: an event written after the chunks
        self.break_non_stream = False  # non-stream: headers, half a body, then the connection is gone
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def generation_bodies(self, path: str | None = None) -> list[Any]:
        paths = ("/generate", "/v1/completions", "/v1/chat/completions")
        return [r.body for r in self.received if (r.path == path if path else r.path in paths)]

    # ---- app --------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            r.add_post(path, self._generation)
        r.add_get("/health", self._health)
        r.add_get("/health_generate", self._health)
        r.add_get("/get_load", self._answer(lambda: self.load))
        r.add_get(
            "/get_server_info",
            self._answer(
                lambda: {
                    "name": self.name,
                    "role": self.role,
                    "model_path": MODEL,
                    "internal_states": [{"last_gen_throughput": 1.0, "worker": self.name}],
                }
            ),
        )
        r.add_get(
            "/get_model_info",
            self._answer(
                lambda: {"model_path": MODEL, "tokenizer_path": MODEL, "is_generation": True, "worker": self.name}
            ),
        )
        r.add_get(
            "/v1/models",
            self._answer(
                lambda: {
                    "object": "list",
                    "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": self.name}],
                }
            ),
        )
        r.add_route("*", "/flush_cache", self._answer(lambda: "Cache flushed.\n"))
        for path in ("/start_profile", "/stop_profile"):
            r.add_route("*", path, self._answer(lambda: {"success": True, "trace_path": f"/tmp/x-{self.role}"}))
        r.add_get("/metrics", self._answer(lambda: "fake_metric 1\n"))
        r.add_route("*", "/{tail:.*}", self._other)
        return app

    def _answer(self, make):
        async def handler(request: web.Request) -> web.Response:
            self._record(request, None)
            obj = make()
            return web.Response(text=obj) if isinstance(obj, str) else web.json_response(obj)

        return handler

    def _record(self, request: web.Request, body: Any) -> None:
        self.received.append(Received(request.path, body, dict(request.headers)))

    async def _other(self, request: web.Request) -> web.Response:
        self._record(request, await request.text())
        return web.json_response({"error": "not found"}, status=404)

    async def _health(self, request: web.Request) -> web.Response:
        self._record(request, None)
        return web.Response(status=self.health_status)

    async def _generation(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self._record(request, body)
        try:
            if self.response_delay:
                await asyncio.sleep(self.response_delay)
            if self.fail_statuses:
                status = self.fail_statuses.pop(0)
                return web.json_response(
                    {"error": {"message": f"{self.name} fails with {status}", "code": status}, "object": "error"},
                    status=status,
                )
            if request.path == "/generate":
                items = self._generate_items(body)
            elif request.path == "/v1/completions":
                items = self._completion_items(body)
            else:
                items = self._chat_items(body)
            if not body.get("stream"):
                if self.break_non_stream:
                    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
                    await resp.prepare(request)
                    await resp.write(b'{"text": "cut')
                    request.transport.abort()
                    return resp
                return web.json_response(items["full"])
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            chunks = items["chunks"]
            for i, ev in enumerate(chunks):
                if i and self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                if i == len(chunks) - 1 and self.gate is not None:
                    while not self.gate.is_set():
                        await asyncio.sleep(0.01)
                if self.break_after is not None and i == self.break_after:
                    # as a killed process: half an event, then the connection is gone
                    await resp.write(b'data: {"text": "cut')
                    request.transport.abort()
                    return resp
                await resp.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
                self.produced.append(time.monotonic())
            if self.stream_error is not None:
                await resp.write(b"data: " + json.dumps(self.stream_error).encode() + b"\n\n")
            if self.send_done:
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    # ---- SGLang shapes -------------------------------------------------------------------
    def _meta(self, body: dict, n_out: int) -> dict:
        meta = {
            "id": f"{self.name}-req",
            "finish_reason": {"type": "length", "length": n_out},
            "prompt_tokens": 3,
            "completion_tokens": n_out,
            "cached_tokens": 0,
        }
        if body.get("return_logprob"):
            if self.role == "prefill":
                meta["input_token_logprobs"] = [[None, 1, None], [-0.5, 2, None]]
            else:  # decode (and plain): what it computed itself
                meta["input_token_logprobs"] = [[-0.25, 3, None]]
            meta["output_token_logprobs"] = [[-0.1, 7, None]] * n_out
        return meta

    def _generate_items(self, body: dict) -> dict:
        text, ids = body.get("text"), body.get("input_ids")
        batch = (
            len(text)
            if isinstance(text, list)
            else (len(ids) if isinstance(ids, list) and ids and isinstance(ids[0], list) else None)
        )

        def one(k: int) -> dict:
            return {
                "text": f"{self.name} says " + " ".join(f"t{i}" for i in range(k)),
                "meta_info": self._meta(body, k),
            }

        full = one(self.chunks)
        if batch is not None:
            full = [dict(one(self.chunks), index=i) for i in range(batch)]
        chunks = [one(k) for k in range(1, self.chunks + 1)]
        return {"full": full, "chunks": chunks}

    def _usage(self) -> dict:
        return {"prompt_tokens": 3, "completion_tokens": self.chunks, "total_tokens": 3 + self.chunks}

    def _completion_items(self, body: dict) -> dict:
        base = {"id": f"cmpl-{self.name}", "object": "text_completion", "created": 0, "model": MODEL}
        prompts = body.get("prompt")
        n = len(prompts) if isinstance(prompts, list) and prompts and not isinstance(prompts[0], int) else 1
        full = dict(
            base,
            choices=[
                {"index": i, "text": f"{self.name} says hi", "logprobs": None, "finish_reason": "length"}
                for i in range(n)
            ],
            usage=self._usage(),
        )
        chunks = [
            dict(
                base,
                choices=[
                    {
                        "index": 0,
                        "text": f"t{k} ",
                        "logprobs": None,
                        "finish_reason": "length" if k == self.chunks - 1 else None,
                    }
                ],
            )
            for k in range(self.chunks)
        ]
        return {"full": full, "chunks": chunks}

    def _chat_items(self, body: dict) -> dict:
        base = {"id": f"chatcmpl-{self.name}", "created": 0, "model": MODEL}
        full = dict(
            base,
            object="chat.completion",
            choices=[
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"{self.name} says hi"},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            usage=self._usage(),
        )
        chunks = [
            dict(
                base,
                object="chat.completion.chunk",
                choices=[
                    {
                        "index": 0,
                        "delta": ({"role": "assistant", "content": f"t{k} "} if k == 0 else {"content": f"t{k} "}),
                        "logprobs": None,
                        "finish_reason": "stop" if k == self.chunks - 1 else None,
                    }
                ],
            )
            for k in range(self.chunks)
        ]
        return {"full": full, "chunks": chunks}


class FakeLoop:
    """One event loop thread hosting any number of fake workers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-workers", daemon=True)
        self.thread.start()
        self.workers: list[FakeWorker] = []

    def run(self, coro, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, worker: FakeWorker) -> FakeWorker:
        async def go() -> None:
            runner = web.AppRunner(worker.app(), handler_cancellation=True, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            worker._runner = runner
            worker.port = runner.addresses[0][1]

        self.run(go())
        self.workers.append(worker)
        return worker

    def stop(self, worker: FakeWorker) -> None:
        if worker._runner is not None:
            self.run(worker._runner.cleanup())
            worker._runner = None
        if worker in self.workers:
            self.workers.remove(worker)

    def close(self) -> None:
        for w in list(self.workers):
            self.stop(w)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
