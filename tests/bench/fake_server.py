"""A real HTTP server that streams tokens on a schedule the test controls.

It speaks pdserve's `/generate` (cumulative SSE chunks with `meta_info`) and the
OpenAI `/v1/completions` and `/v1/chat/completions` streams, on 127.0.0.1 in a
background thread. Token k (0-based) of a request leaves at
`arrival + ttft + k * itl` (absolute times, so delays do not drift).

Markers in the prompt change one request's behaviour:
- "FAIL": HTTP 500 with an error message.
- "HANG": headers, then silence for `hang_s` (the client must time out).
- "DIE": two tokens, then the connection is dropped.
- "SLOW": TTFT is `slow_ttft_s` instead of `ttft_s`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

from aiohttp import web

VOCAB = 500


@dataclass
class FakeConfig:
    ttft_s: float = 0.2
    itl_s: float = 0.04
    tokens_per_chunk: int = 1  # /generate only: >1 sends several tokens per SSE chunk
    slow_ttft_s: float = 0.6
    hang_s: float = 5.0
    model: str = "fake-model"
    model_path: str = "/nonexistent/fake-model"
    phases: dict[str, float] = field(
        default_factory=lambda: {"queue_time": 0.01, "prefill_time": 0.03, "transfer_time": 0.02, "decode_time": 0.14}
    )


class FakeServer:
    """Start with `with FakeServer(cfg) as srv:`; `srv.url`, `srv.received` (bodies by path)."""

    def __init__(self, cfg: FakeConfig | None = None) -> None:
        self.cfg = cfg or FakeConfig()
        self.received: list[tuple[str, dict]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle -------------------------------------------------------------
    def __enter__(self) -> "FakeServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/get_model_info", self._model_info)
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        await self._runner.cleanup()
        # Handlers still sleeping (HANG) would outlive the loop: cancel them.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- handlers ----------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.cfg.model, "object": "model"}]})

    async def _model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": self.cfg.model_path, "is_generation": True})

    async def _begin(self, request: web.Request, prompt: str):
        """Common start: record the body, handle FAIL/HANG, open the SSE stream."""
        if "FAIL" in prompt:
            return None, web.json_response({"error": {"message": "fake failure: boom"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if "HANG" in prompt:
            await asyncio.sleep(self.cfg.hang_s)
            return None, resp
        return resp, None

    async def _token_times(self, n: int, prompt: str):
        """Yields token indices 0..n-1, each at its scheduled time."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ttft = self.cfg.slow_ttft_s if "SLOW" in prompt else self.cfg.ttft_s
        for k in range(n):
            delay = t0 + ttft + k * self.cfg.itl_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            yield k

    @staticmethod
    async def _send(resp: web.StreamResponse, obj) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        await resp.write(f"data: {data}\n\n".encode())

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(("/generate", body))
        prompt = body.get("text", "")
        n = int(body["sampling_params"]["max_new_tokens"])
        resp, early = await self._begin(request, prompt)
        if resp is None:
            return early
        ids: list[int] = []
        per = max(1, self.cfg.tokens_per_chunk)
        async for k in self._token_times(n, prompt):
            ids.append(k % VOCAB)
            if "DIE" in prompt and k == 2:
                request.transport.close()
                return resp
            last = k == n - 1
            if len(ids) % per and not last:
                continue  # hold tokens back until the chunk is full
            meta = {
                "id": "r",
                "prompt_tokens": len(prompt.split()),
                "completion_tokens": len(ids),
                "cached_tokens": 0,
                "finish_reason": {"type": "length", "length": n} if last else None,
            }
            if last:
                meta.update(self.cfg.phases, e2e_latency=0.0)
            await self._send(resp, {"text": " ".join(f"w{i}" for i in ids), "output_ids": list(ids), "meta_info": meta})
        await self._send(resp, "[DONE]")
        return resp

    async def _openai(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        self.received.append(("/v1/chat/completions" if chat else "/v1/completions", body))
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        n = int(body["max_tokens"])
        resp, early = await self._begin(request, prompt)
        if resp is None:
            return early
        if chat:  # OpenAI servers open with a role-only delta
            await self._send(resp, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        async for k in self._token_times(n, prompt):
            if "DIE" in prompt and k == 2:
                request.transport.close()
                return resp
            text = f" w{k % VOCAB}"
            reason = "length" if k == n - 1 else None
            choice = {"index": 0, "finish_reason": reason}
            choice.update({"delta": {"content": text}} if chat else {"text": text})
            await self._send(resp, {"choices": [choice]})
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n, "total_tokens": n}
            await self._send(resp, {"choices": [], "usage": usage})
        await self._send(resp, "[DONE]")
        return resp

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=True)


class WordTokenizer:
    """A tokenizer stand-in: token i is the word `w{i}`; unknown words hash into the vocab."""

    vocab_size = VOCAB
    all_special_ids = [0]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out = []
        for word in text.split():
            if word.startswith("w") and word[1:].isdigit():
                out.append(int(word[1:]) % VOCAB)
            else:
                out.append(sum(map(ord, word)) % (VOCAB - 1) + 1)
        return out

    def decode(self, ids) -> str:
        return " ".join(f"w{i}" for i in ids)
