"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pdserve.sampling_params import SamplingParams
from pdserve.server.pd_fields import bootstrap_for, check_pd_fields
from pdserve.server.protocol import FieldError, as_bool, as_int, chat_message, is_token_list, openai_sampling
from pdserve.server.responses import (
    SSE_DONE,
    ModelNotFound,
    abort_event,
    collect,
    guarded,
    merge,
    new_id,
    now_s,
    read_json,
    run_until_disconnect,
    sse,
)
from pdserve.server.tokenizer_manager import TokenizerManager
from pdserve.server.tools.base import ARCH_PARSERS, ToolCallStream
from pdserve.server.tools.request import ToolPlan, plan_tools


def _finish_reason(meta: dict) -> str | None:
    fr = meta.get("finish_reason")
    if fr is None:
        return None
    if fr["type"] == "abort":
        return "abort"
    return "length" if fr["type"] == "length" else "stop"


def _check_abort(results: list[dict]) -> JSONResponse | None:
    for r in results:
        fr = r["meta_info"].get("finish_reason") or {}
        if fr.get("type") == "abort":
            code = int(fr.get("status_code") or 500)
            msg = fr.get("message") or "request aborted"
            return JSONResponse(
                {"error": {"message": msg, "type": "Error", "code": code}, "object": "error", "message": msg},
                status_code=code,
            )
    return None


def _usage(results: list[dict], prompts: list[int], n: int = 1) -> dict:
    """`prompts`: each prompt's length, counted once however many (n) choices it has;
    results[k] is choice k % n of prompt k // n."""
    p = sum(prompts)
    c = sum(r["meta_info"]["completion_tokens"] for r in results)
    cached = sum(
        min(prompts[i], max(r["meta_info"].get("cached_tokens", 0) for r in results[i * n : (i + 1) * n]))
        for i in range(len(prompts))
    )
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def _only(gen: AsyncIterator[dict]) -> AsyncIterator[tuple[int, dict]]:
    async for out in gen:
        yield 0, out


def _include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ValueError(f"stream_options must be an object, got {type(opts).__name__}")
    return bool((opts or {}).get("include_usage"))


@dataclass
class Completion:
    """One /v1/completions or /v1/chat/completions call, validated: its n choices per
    prompt are the generations `jobs[k]` (prompt ids, PD fields)."""

    rid: str
    created: int
    chat: bool
    sp: SamplingParams
    logprobs: int | None
    include_usage: bool
    tools: ToolPlan | None
    jobs: list[tuple[list[int], tuple]]
    lens: list[int]  # each prompt's length: usage counts each prompt once, whatever n


class OpenAIRoutes:
    """The OpenAI routes of one server: the model names it answers to, its TokenizerManager."""

    def __init__(self, tm: TokenizerManager, served: str, model_path: str) -> None:
        self.tm = tm
        self.served = served
        self.model_path = model_path
        self.accepted = {served, model_path, "default"}

    # ---- routes -------------------------------------------------------------------------
    async def models(self):
        return {
            "object": "list",
            "data": [
                {
                    "id": self.served,
                    "object": "model",
                    "created": now_s(),
                    "owned_by": "pdserve",
                    "root": self.model_path,
                    "max_model_len": self.tm.info.get("context_length"),
                }
            ],
        }

    async def completions(self, request: Request):
        tm = self.tm
        body = await read_json(request)
        self.check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [tm.tokenize(prompt)]
        elif is_token_list(prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = [tm.tokenize(p) for p in prompt]
        elif isinstance(prompt, list) and prompt and all(is_token_list(p) for p in prompt):
            prompts = prompt
        else:
            raise ValueError("prompt must be a string, a list of strings, or token ids")
        sp, names = openai_sampling(body, 16, chat=False)
        if sp.max_new_tokens == 0:
            raise FieldError(f"{names['max_new_tokens']} must be at least 1", names["max_new_tokens"])
        logprobs = as_int(body, "logprobs", None, 0, 20)
        stream = as_bool(body, "stream")
        include_usage = _include_usage(body)
        return await self._serve(request, body, prompts, sp, names, logprobs, stream, include_usage, chat=False)

    async def chat(self, request: Request):
        tm = self.tm
        body = await read_json(request)
        self.check_model(body)
        msgs = body.get("messages")
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs)
        ):
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        tools = plan_tools(body, self.template_text(), self.tool_parser_name(), self.served)
        norm = [chat_message(m, i) for i, m in enumerate(msgs)]
        ids = tm.apply_chat_template(
            norm, add_generation_prompt=True, tools=[t.as_openai() for t in tools.tools] if tools else None
        )
        sp, names = openai_sampling(body, tm.info["context_length"] - len(ids), chat=True)
        if tools is not None and tools.grammar is not None:
            sp.ebnf = tools.grammar
            names["ebnf"] = "tool_choice"
        if sp.max_new_tokens == 0:
            raise FieldError(f"{names['max_new_tokens']} must be at least 1", names["max_new_tokens"])
        logprobs = None
        if as_bool(body, "logprobs"):
            logprobs = as_int(body, "top_logprobs", 0, 0, 20)
        stream = as_bool(body, "stream")
        include_usage = _include_usage(body)
        return await self._serve(
            request, body, [ids], sp, names, logprobs, stream, include_usage, chat=True, tools=tools
        )

    # ---- request checks -----------------------------------------------------------------
    def check_model(self, body: dict) -> None:
        m = body.get("model")
        if m is not None and not isinstance(m, str):
            raise ValueError(f"model must be a string, got {type(m).__name__}")
        if m is not None and m not in self.accepted:
            raise ModelNotFound(f"The model {m[:200]!r} does not exist; this server serves {self.served!r}")

    @staticmethod
    def boot(body: dict, prompt_index: int, copy: int) -> tuple:
        """PD fields for one generation: batched requests carry one entry per prompt."""
        vals = []
        for key in ("bootstrap_host", "bootstrap_port", "bootstrap_room"):
            v = body.get(key)
            if isinstance(v, list):
                if prompt_index >= len(v):
                    raise ValueError(f"{key} has fewer entries than prompts")
                v = v[prompt_index]
            vals.append(v)
        return bootstrap_for(*vals, copy)

    def template_text(self) -> str:
        tm = self.tm
        return str(tm.chat_template or getattr(tm.tokenizer, "chat_template", None) or "")

    def tool_parser_name(self) -> str | None:
        """--tool-call-parser, else the one the model's architecture is known to use."""
        tm = self.tm
        return tm.args.tool_call_parser or ARCH_PARSERS.get(tm.info.get("arch", ""))

    # ---- generation ---------------------------------------------------------------------
    async def _serve(
        self,
        request: Request,
        body: dict,
        prompts: list[list[int]],
        sp,
        names: dict[str, str],
        logprobs: int | None,
        stream: bool,
        include_usage: bool,
        chat: bool,
        tools: ToolPlan | None = None,
    ):
        tm = self.tm
        n = sp.n
        for ids in prompts:
            tm.validate(ids, sp, logprobs or 0, names)
        await tm.check_grammar(sp, names)
        jobs = [(ids, self.boot(body, p, i)) for p, ids in enumerate(prompts) for i in range(n)]
        check_pd_fields(tm, [b for _, b in jobs])
        call = Completion(
            rid=new_id("chatcmpl" if chat else "cmpl"),
            created=now_s(),
            chat=chat,
            sp=sp,
            logprobs=logprobs,
            include_usage=include_usage,
            tools=tools,
            jobs=jobs,
            lens=[len(ids) for ids in prompts],
        )
        if not stream:
            return await self._respond(request, call)
        gens = [self._start(call, k) for k in range(len(jobs))]
        return StreamingResponse(guarded(self._events(call, gens)), media_type="text/event-stream")

    def _start(self, call: Completion, k: int):
        ids, boot = call.jobs[k]
        return self.tm.generate(
            ids,
            call.sp,
            rid=f"{call.rid}-{k}",
            return_logprob=call.logprobs is not None,
            top_logprobs_num=call.logprobs or 0,
            bootstrap=boot,
        )

    async def _respond(self, request: Request, call: Completion):
        """The whole answer at once."""
        chat, logprobs, tools = call.chat, call.logprobs, call.tools
        results = await run_until_disconnect(
            request, asyncio.gather(*(collect(self._start(call, k)) for k in range(len(call.jobs))))
        )
        err = _check_abort(results)
        if err is not None:
            return err
        choices = []
        for k, r in enumerate(results):
            lp = self._logprobs(r["meta_info"], chat, logprobs) if logprobs is not None else None
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": r["text"]}
                finish = _finish_reason(r["meta_info"])
                if tools is not None:
                    parsed = tools.parser.parse(r["text"])
                    if parsed.calls:
                        message = {
                            "role": "assistant",
                            "content": parsed.content,
                            "tool_calls": [c.as_openai() for c in parsed.calls],
                        }
                        finish = "tool_calls" if finish == "stop" else finish
                choices.append({"index": k, "message": message, "logprobs": lp, "finish_reason": finish})
            else:
                choices.append(
                    {"index": k, "text": r["text"], "logprobs": lp, "finish_reason": _finish_reason(r["meta_info"])}
                )
        return {
            "id": call.rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": call.created,
            "model": self.served,
            "choices": choices,
            "usage": _usage(results, call.lens, call.sp.n),
        }

    async def _events(self, call: Completion, gens: list[AsyncIterator[dict]]) -> AsyncIterator[bytes]:
        """The streamed answer: a role chunk per choice (chat), then text deltas as they
        come, tool calls whole at the end, usage if asked, [DONE]."""
        rid, created, served, chat = call.rid, call.created, self.served, call.chat
        logprobs, tools = call.logprobs, call.tools
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        sent = [0] * len(gens)
        lp_sent = [0] * len(gens)
        finals: list[dict | None] = [None] * len(gens)
        tool_streams: list[ToolCallStream | None] = [tools.parser.stream() if tools is not None else None for _ in gens]
        if chat:
            for k in range(len(gens)):
                yield sse(
                    {
                        "id": rid,
                        "object": chunk_obj,
                        "created": created,
                        "model": served,
                        "choices": [
                            {
                                "index": k,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
        # one choice (the usual case): no merge task and queue hop per token, as in /generate
        merged = merge(gens) if len(gens) > 1 else _only(gens[0])
        try:
            async for k, out in merged:
                meta = out["meta_info"]
                fr = meta.get("finish_reason")
                err = abort_event(out)
                if err is not None:  # failed: an error event ends the stream, no [DONE]
                    yield err
                    return
                delta = out["text"][sent[k] :]
                sent[k] = len(out["text"])
                lp = None
                if logprobs is not None:
                    lp = self._logprobs(meta, chat, logprobs, start=lp_sent[k])
                    lp_sent[k] = meta["completion_tokens"]
                finish = _finish_reason(meta)
                calls: list[dict] = []
                tool_stream = tool_streams[k]
                if tool_stream is not None:  # content passes through; calls are sent whole at the end
                    delta = tool_stream.feed(delta)
                    if fr is not None:
                        parsed = tool_stream.finish()
                        delta += parsed.content or ""
                        if parsed.calls:
                            calls = [c.as_openai(index=j) for j, c in enumerate(parsed.calls)]
                            finish = "tool_calls" if finish == "stop" else finish
                if not delta and fr is None and not calls:
                    continue
                choice: dict[str, Any] = {"index": k, "logprobs": lp, "finish_reason": finish}
                if chat:
                    choice["delta"] = {"content": delta} if delta else {}
                    if calls:
                        choice["delta"]["tool_calls"] = calls
                else:
                    choice["text"] = delta
                yield sse({"id": rid, "object": chunk_obj, "created": created, "model": served, "choices": [choice]})
                if fr is not None:
                    finals[k] = out
        finally:  # in order: the merge's pumps stop before their generators close
            await merged.aclose()
            for gen in gens:
                await gen.aclose()
        if call.include_usage and all(f is not None for f in finals):
            yield sse(
                {
                    "id": rid,
                    "object": chunk_obj,
                    "created": created,
                    "model": served,
                    "choices": [],
                    "usage": _usage(finals, call.lens, call.sp.n),
                }
            )
        yield SSE_DONE

    def _logprobs(self, meta: dict, chat: bool, top: int, start: int = 0) -> dict:
        toks = meta.get("output_token_logprobs", [])[start:]
        tops = meta.get("output_top_logprobs", [])[start:] if top else [[] for _ in toks]
        dec = self.tm.tokenizer.convert_ids_to_tokens
        if chat:
            content = []
            for (lp, tid, _), row in zip(toks, tops):
                content.append(
                    {
                        "token": dec(tid),
                        "logprob": lp,
                        "bytes": None,
                        "top_logprobs": [{"token": dec(t), "logprob": top_lp, "bytes": None} for top_lp, t, _ in row],
                    }
                )
            return {"content": content}
        return {
            "tokens": [dec(tid) for _, tid, _ in toks],
            "token_logprobs": [lp for lp, _, _ in toks],
            "top_logprobs": [{dec(t): top_lp for top_lp, t, _ in row} for row in tops] if top else None,
            "text_offset": None,
        }


def add_openai_routes(app: FastAPI, tm: TokenizerManager, served: str, model_path: str) -> None:
    routes = OpenAIRoutes(tm, served, model_path)
    app.get("/v1/models")(routes.models)
    app.post("/v1/completions")(routes.completions)
    app.post("/v1/chat/completions")(routes.chat)
