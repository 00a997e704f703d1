"""One streaming request function per server API, and the backend names that pick them.

- `/generate` (pdserve, SGLang): SSE chunks carry the cumulative `text` and
  `output_ids`, plus `meta_info` (token counts, finish reason and, where the server
  reports them, the per-phase times used for the prefill/transfer/decode split).
- `/v1/completions` and `/v1/chat/completions` (any OpenAI-compatible server):
  SSE chunks carry text deltas; the last one carries `usage` when asked for with
  `stream_options.include_usage`.

Timing is taken on the client with `time.perf_counter()`: TTFT is the time to the
first chunk that carries output; each later chunk adds inter-token latencies (a
chunk holding k new tokens adds k gaps of (its delay / k), as SGLang does).
A request function never raises: errors and timeouts come back as a failed
`RequestOutput` whose `error` says what happened.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp

# Per-request phase times a pdserve server may report in `meta_info` (seconds).
PHASE_KEYS = ("queue_time", "prefill_time", "transfer_time", "decode_time")


@dataclass(frozen=True)
class RequestInput:
    """What to send, plus what the request function needs to send it."""

    prompt: str
    prompt_len: int
    output_len: int
    model: str | None = None
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    kind: str = ""


@dataclass
class RequestOutput:
    """What one request measured. Times are seconds; `start` is from the run's start."""

    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    generated_text: str = ""
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0  # end to end, as the client saw it
    itl: list[float] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)  # phase times, cached_tokens, finish reason
    kind: str = ""


TokenCounter = Callable[[str], int]
RequestFunc = Callable[[aiohttp.ClientSession, str, RequestInput, TokenCounter], Awaitable[RequestOutput]]


class _StreamError(Exception):
    """The server answered, but not with a usable stream."""


async def _sse_payloads(response: aiohttp.ClientResponse):
    """Yields the decoded JSON of each `data:` line; stops at `data: [DONE]`.

    Yields the string "[DONE]" last when the server sent it, so callers can tell a
    complete stream from a connection that closed early.
    """
    async for raw in response.content:
        line = raw.strip()
        if not line or not line.startswith(b"data:"):
            continue  # blank separators, SSE comments (keep-alives), event names
        data = line[5:].strip()
        if data == b"[DONE]":
            yield "[DONE]"
            return
        try:
            payload = json.loads(data)
        except json.JSONDecodeError:
            raise _StreamError(f"bad SSE data: {data[:200]!r}") from None
        if isinstance(payload, dict) and payload.get("error"):
            err = payload["error"]
            raise _StreamError(str(err.get("message", err) if isinstance(err, dict) else err))
        yield payload


async def _post_stream(
    session: aiohttp.ClientSession, url: str, payload: dict, inp: RequestInput, handle_chunk
) -> RequestOutput:
    """POSTs `payload`, feeds each SSE payload with its timestamp to `handle_chunk`,
    and turns every exception into a failed output."""
    out = RequestOutput(prompt_len=inp.prompt_len, kind=inp.kind)
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                body = (await resp.text())[:500]
                out.error = f"HTTP {resp.status}: {body}"
                return out
            done = False
            async for chunk in _sse_payloads(resp):
                if chunk == "[DONE]":
                    done = True
                    break
                handle_chunk(chunk, time.perf_counter(), out, t0)
            out.latency = time.perf_counter() - t0
            if not done and not out.server.get("finish_reason"):
                out.error = "stream ended before [DONE]"
                return out
    except asyncio.TimeoutError as e:
        out.error = f"{_timeout_kind(e)} after {time.perf_counter() - t0:.1f} s"
        return out
    except _StreamError as e:
        out.error = f"server error: {e}"
        return out
    except aiohttp.ClientError as e:
        out.error = f"{type(e).__name__}: {e}"
        return out
    except (ConnectionError, OSError) as e:
        out.error = f"{type(e).__name__}: {e}"
        return out
    if out.ttft == 0.0:
        out.error = "no output tokens received"
        return out
    out.success = True
    return out


def _timeout_kind(e: BaseException) -> str:
    """Which of the session's timeouts fired (aiohttp >= 3.10 tells them apart)."""
    if isinstance(e, getattr(aiohttp, "SocketTimeoutError", ())):
        return "read timeout (no data for --read-timeout)"
    if isinstance(e, getattr(aiohttp, "ConnectionTimeoutError", ())):
        return "connect timeout"
    return "timeout (--request-timeout)"


def _mark_tokens(out: RequestOutput, now: float, t0: float, last: list[float], n_new: int) -> None:
    """Records TTFT for the first output, then `n_new` inter-token gaps."""
    if n_new <= 0:
        return
    if out.ttft == 0.0:
        # The first chunk is the TTFT; extra tokens in it add no ITL (as in SGLang).
        out.ttft = now - t0
    else:
        out.itl.extend([(now - last[0]) / n_new] * n_new)
    last[0] = now


async def generate_request(
    session: aiohttp.ClientSession, base_url: str, inp: RequestInput, count_tokens: TokenCounter
) -> RequestOutput:
    """`POST /generate` (pdserve / SGLang native), streamed."""
    payload = {
        "text": inp.prompt,
        "sampling_params": {"max_new_tokens": inp.output_len, "temperature": 0.0, "ignore_eos": inp.ignore_eos},
        "stream": True,
        **inp.extra_body,
    }
    state = {"n": 0}
    last = [0.0]

    def handle(chunk: dict, now: float, out: RequestOutput, t0: float) -> None:
        meta = chunk.get("meta_info") or {}
        if "output_ids" in chunk and chunk["output_ids"] is not None:
            n = len(chunk["output_ids"])
        elif "completion_tokens" in meta:
            n = int(meta["completion_tokens"])
        else:  # neither: one chunk = one token
            n = state["n"] + (1 if chunk.get("text") else 0)
        _mark_tokens(out, now, t0, last, n - state["n"])
        state["n"] = max(state["n"], n)
        out.generated_text = chunk.get("text", out.generated_text)
        out.output_len = int(meta.get("completion_tokens", state["n"]))
        for key in (*PHASE_KEYS, "cached_tokens", "prompt_tokens", "e2e_latency"):
            if meta.get(key) is not None:
                out.server[key] = meta[key]
        reason = meta.get("finish_reason")
        if reason:
            out.server["finish_reason"] = reason
            if isinstance(reason, dict) and reason.get("type") == "abort":
                raise _StreamError(f"aborted: {reason.get('message', reason)}")

    return await _post_stream(session, base_url + "/generate", payload, inp, handle)


def _openai_handler(text_of: Callable[[dict], str | None]):
    last = [0.0]

    def handle(chunk: dict, now: float, out: RequestOutput, t0: float) -> None:
        choices = chunk.get("choices") or []
        if choices:
            text = text_of(choices[0])
            if text:
                _mark_tokens(out, now, t0, last, 1)
                out.generated_text += text
            if choices[0].get("finish_reason"):
                out.server["finish_reason"] = choices[0]["finish_reason"]
        usage = chunk.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            out.server["usage"] = usage

    return handle


async def _openai_request(
    session: aiohttp.ClientSession,
    url: str,
    payload: dict,
    inp: RequestInput,
    count_tokens: TokenCounter,
    text_of: Callable[[dict], str | None],
) -> RequestOutput:
    out = await _post_stream(session, url, payload, inp, _openai_handler(text_of))
    usage = out.server.get("usage")
    if usage:
        out.output_len = int(usage["completion_tokens"])
    else:
        out.output_len = count_tokens(out.generated_text) if out.generated_text else 0
    return out


def _openai_common(inp: RequestInput) -> dict[str, Any]:
    return {
        "max_tokens": inp.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": inp.ignore_eos,
    }


async def completions_request(
    session: aiohttp.ClientSession, base_url: str, inp: RequestInput, count_tokens: TokenCounter
) -> RequestOutput:
    """`POST /v1/completions` (OpenAI-compatible), streamed."""
    payload = {"model": inp.model, "prompt": inp.prompt, **_openai_common(inp), **inp.extra_body}
    return await _openai_request(
        session, base_url + "/v1/completions", payload, inp, count_tokens, lambda c: c.get("text")
    )


async def chat_request(
    session: aiohttp.ClientSession, base_url: str, inp: RequestInput, count_tokens: TokenCounter
) -> RequestOutput:
    """`POST /v1/chat/completions` (OpenAI-compatible), streamed; the prompt is one user turn."""
    payload = {
        "model": inp.model,
        "messages": [{"role": "user", "content": inp.prompt}],
        **_openai_common(inp),
        **inp.extra_body,
    }
    return await _openai_request(
        session,
        base_url + "/v1/chat/completions",
        payload,
        inp,
        count_tokens,
        lambda c: (c.get("delta") or {}).get("content"),
    )


# Backend names as in SGLang's bench_serving, plus pdserve's own.
BACKENDS: dict[str, RequestFunc] = {
    "pdserve": generate_request,
    "sglang": generate_request,
    "pdserve-oai": completions_request,
    "sglang-oai": completions_request,
    "vllm": completions_request,
    "openai": completions_request,
    "pdserve-oai-chat": chat_request,
    "sglang-oai-chat": chat_request,
    "vllm-chat": chat_request,
    "openai-chat": chat_request,
}


def uses_openai_api(backend: str) -> bool:
    """True when the backend needs a `model` name (OpenAI APIs)."""
    return BACKENDS[backend] is not generate_request
