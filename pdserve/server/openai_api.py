"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pdserve.server.http_server import (SSE_DONE, ModelNotFound, abort_event, bootstrap_for, check_pd_fields,
                                        collect, guarded, merge, new_id, now_s, read_json,
                                        run_until_disconnect, sse)
from pdserve.server.protocol import FieldError, as_bool, as_int, chat_message, is_token_list, openai_sampling
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
            return JSONResponse({"error": {"message": msg, "type": "Error", "code": code},
                                 "object": "error", "message": msg}, status_code=code)
    return None


def _usage(results: list[dict], prompts: list[int], n: int = 1) -> dict:
    """`prompts`: each prompt's length, counted once however many (n) choices it has;
    results[k] is choice k % n of prompt k // n."""
    p = sum(prompts)
    c = sum(r["meta_info"]["completion_tokens"] for r in results)
    cached = sum(min(prompts[i], max(r["meta_info"].get("cached_tokens", 0) for r in results[i * n:(i + 1) * n]))
                 for i in range(len(prompts)))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ValueError(f"stream_options must be an object, got {type(opts).__name__}")
    return bool((opts or {}).get("include_usage"))


def add_openai_routes(app: FastAPI, tm: TokenizerManager, served: str, model_path: str) -> None:
    accepted = {served, model_path, "default"}

    def check_model(body: dict) -> None:
        m = body.get("model")
        if m is not None and not isinstance(m, str):
            raise ValueError(f"model must be a string, got {type(m).__name__}")
        if m is not None and m not in accepted:
            raise ModelNotFound(f"The model {m[:200]!r} does not exist; this server serves {served!r}")

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

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served, "object": "model", "created": now_s(),
                                            "owned_by": "pdserve", "root": model_path,
                                            "max_model_len": tm.info.get("context_length")}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        check_model(body)
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
        return await _serve(request, body, prompts, sp, names, logprobs, stream, include_usage, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request)
        check_model(body)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        tools = plan_tools(body, template_text(), tool_parser_name(), served)
        norm = [chat_message(m, i) for i, m in enumerate(msgs)]
        ids = tm.apply_chat_template(norm, add_generation_prompt=True,
                                     tools=[t.as_openai() for t in tools.tools] if tools else None)
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
        return await _serve(request, body, [ids], sp, names, logprobs, stream, include_usage, chat=True,
                            tools=tools)

    def template_text() -> str:
        return str(tm.chat_template or getattr(tm.tokenizer, "chat_template", None) or "")

    def tool_parser_name() -> str | None:
        """--tool-call-parser, else the one the model's architecture is known to use."""
        return tm.args.tool_call_parser or ARCH_PARSERS.get(tm.info.get("arch", ""))

    async def _serve(request: Request, body: dict, prompts: list[list[int]], sp, names: dict[str, str],
                     logprobs: int | None, stream: bool, include_usage: bool, chat: bool,
                     tools: ToolPlan | None = None):
        n = sp.n
        for ids in prompts:
            tm.validate(ids, sp, logprobs or 0, names)
        await tm.check_grammar(sp, names)
        rid = new_id("chatcmpl" if chat else "cmpl")
        created = now_s()
        obj = "chat.completion" if chat else "text_completion"
        jobs = [(ids, boot(body, p, i)) for p, ids in enumerate(prompts) for i in range(n)]
        check_pd_fields(tm, [b for _, b in jobs])
        lens = [len(ids) for ids in prompts]  # usage counts each prompt once, whatever n

        def start(ids: list[int], k: int):
            return tm.generate(ids, sp, rid=f"{rid}-{k}", return_logprob=logprobs is not None,
                               top_logprobs_num=logprobs or 0, bootstrap=jobs[k][1])

        if not stream:
            results = await run_until_disconnect(
                request, asyncio.gather(*(collect(start(ids, k)) for k, (ids, _) in enumerate(jobs))))
            err = _check_abort(results)
            if err is not None:
                return err
            choices = []
            for k, r in enumerate(results):
                lp = _logprobs(r["meta_info"], chat, logprobs) if logprobs is not None else None
                if chat:
                    message: dict[str, Any] = {"role": "assistant", "content": r["text"]}
                    finish = _finish_reason(r["meta_info"])
                    if tools is not None:
                        parsed = tools.parser.parse(r["text"])
                        if parsed.calls:
                            message = {"role": "assistant", "content": parsed.content,
                                       "tool_calls": [c.as_openai() for c in parsed.calls]}
                            finish = "tool_calls" if finish == "stop" else finish
                    choices.append({"index": k, "message": message, "logprobs": lp, "finish_reason": finish})
                else:
                    choices.append({"index": k, "text": r["text"], "logprobs": lp,
                                    "finish_reason": _finish_reason(r["meta_info"])})
            return {"id": rid, "object": obj, "created": created, "model": served,
                    "choices": choices, "usage": _usage(results, lens, n)}

        gens = [start(ids, k) for k, (ids, _) in enumerate(jobs)]
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        async def events() -> AsyncIterator[bytes]:
            sent = [0] * len(gens)
            lp_sent = [0] * len(gens)
            finals: list[dict | None] = [None] * len(gens)
            tool_streams: list[ToolCallStream | None] = [
                tools.parser.stream() if tools is not None else None for _ in gens]
            if chat:
                for k in range(len(gens)):
                    yield sse({"id": rid, "object": chunk_obj, "created": created, "model": served,
                               "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
            merged = merge(gens)
            try:
                async for k, out in merged:
                    meta = out["meta_info"]
                    fr = meta.get("finish_reason")
                    err = abort_event(out)
                    if err is not None:  # failed: an error event ends the stream, no [DONE]
                        yield err
                        return
                    delta = out["text"][sent[k]:]
                    sent[k] = len(out["text"])
                    lp = None
                    if logprobs is not None:
                        lp = _logprobs(meta, chat, logprobs, start=lp_sent[k])
                        lp_sent[k] = meta["completion_tokens"]
                    finish = _finish_reason(meta)
                    calls: list[dict] = []
                    ts = tool_streams[k]
                    if ts is not None:  # content passes through; calls are sent whole at the end
                        delta = ts.feed(delta)
                        if fr is not None:
                            parsed = ts.finish()
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
                    yield sse({"id": rid, "object": chunk_obj, "created": created, "model": served,
                               "choices": [choice]})
                    if fr is not None:
                        finals[k] = out
            finally:  # in order: the merge's pumps stop before their generators close
                await merged.aclose()
                for gen in gens:
                    await gen.aclose()
            if include_usage and all(f is not None for f in finals):
                yield sse({"id": rid, "object": chunk_obj, "created": created, "model": served,
                           "choices": [], "usage": _usage(finals, lens, n)})
            yield SSE_DONE

        return StreamingResponse(guarded(events()), media_type="text/event-stream")

    def _logprobs(meta: dict, chat: bool, top: int, start: int = 0) -> dict:
        toks = meta.get("output_token_logprobs", [])[start:]
        tops = meta.get("output_top_logprobs", [])[start:] if top else [[] for _ in toks]
        dec = tm.tokenizer.convert_ids_to_tokens
        if chat:
            content = []
            for (lp, tid, _), row in zip(toks, tops):
                content.append({"token": dec(tid), "logprob": lp, "bytes": None,
                                "top_logprobs": [{"token": dec(t), "logprob": top_lp, "bytes": None}
                                                 for top_lp, t, _ in row]})
            return {"content": content}
        return {"tokens": [dec(tid) for _, tid, _ in toks],
                "token_logprobs": [lp for lp, _, _ in toks],
                "top_logprobs": [{dec(t): top_lp for top_lp, t, _ in row} for row in tops] if top else None,
                "text_offset": None}
