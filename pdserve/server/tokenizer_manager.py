"""Front end of one server: tokenizes, talks to the scheduler process over ZMQ,
detokenizes incrementally and yields SGLang-shaped outputs.

Used by the HTTP server and by the in-process `pdserve.Engine`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import msgspec
import zmq
import zmq.asyncio

from pdserve.config import ServerArgs
from pdserve.engine.admission import kv_pool_fit_error
from pdserve.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from pdserve.net import ipc_addr
from pdserve.messages import (
    AbortReq,
    AdminResp,
    BatchOut,
    ControlReq,
    ControlResp,
    FinishReasonType,
    FlushCacheReq,
    FlushCacheResp,
    GenerateReq,
    GetLoadReq,
    LoadResp,
    ProfileReq,
    ProfileResp,
    ReqOut,
    SemiPDReallocateReq,
    SemiPDResp,
    SemiPDStatusReq,
    ServerInfo,
    ShutdownReq,
    ShutdownResp,
    StartupError,
    decode_from_scheduler,
    encode,
)
from pdserve.server.detokenizer import IncrementalDetokenizer

logger = logging.getLogger("pdserve.tokenizer_manager")


class SchedulerDied(RuntimeError):
    pass


@dataclass
class ReqState:
    rid: str
    prompt_tokens: int
    detok: IncrementalDetokenizer
    stop_strings: list[str]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished: bool = False
    input_ids: list[int] = field(default_factory=list)
    input_logprobs: list | None = None


class TokenizerManager:
    def __init__(self, args: ServerArgs, metrics=None) -> None:
        self.args = args
        self.metrics = metrics
        self.tokenizer = None  # loaded by start(), while the scheduler process loads the model
        self.states: dict[str, ReqState] = {}
        self.calls: dict[int, asyncio.Future] = {}
        self._next_call = 1
        self.info: dict[str, Any] = {}
        self.proc: subprocess.Popen | None = None
        self._recv_task: asyncio.Task | None = None
        self.dead: str | None = None
        self._shutting_down = False
        self.chat_template: str | None = None  # --chat-template; None: the tokenizer's own

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        to_sched, from_sched = ipc_addr("in"), ipc_addr("out")
        self.ctx = zmq.asyncio.Context()
        self.recv_sock = self.ctx.socket(zmq.PULL)
        self.recv_sock.bind(from_sched)
        # Semi-PD: the resident process (prefill + decode workers) speaks the same protocol
        module = (
            "pdserve.semi_pd.resident_process" if self.args.semi_pd_enabled else "pdserve.disagg.scheduler_process_main"
        )
        cmd = [
            sys.executable,
            "-m",
            module,
            json.dumps(dataclasses.asdict(dataclasses.replace(self.args, api_key=None, admin_api_key=None))),
            to_sched,
            from_sched,
        ]
        self.proc = subprocess.Popen(cmd)
        from pdserve.model.tokenizer import load_tokenizer

        try:
            self.tokenizer = await asyncio.to_thread(load_tokenizer, self.args.model_path, self.args.tokenizer_path)
        except BaseException:
            self.proc.kill()
            raise
        self.chat_template = self._chat_template()
        info = await self._wait_ready()
        if "error" in info:
            raise RuntimeError(f"scheduler failed to start: {info['error']}")
        self.info = info
        self.send_sock = self.ctx.socket(zmq.PUSH)
        self.send_sock.connect(to_sched)
        self._recv_task = asyncio.create_task(self._recv_loop())
        self._watch_task = asyncio.create_task(self._watch_child())

    def _chat_template(self) -> str | None:
        """--chat-template: a file's content or the template text; None: the tokenizer's."""
        t = self.args.chat_template
        if t is not None and os.path.isfile(t):
            with open(t) as f:
                return f.read()
        return t

    async def _wait_ready(self) -> dict:
        while True:
            if await self.recv_sock.poll(200):
                msg = decode_from_scheduler(await self.recv_sock.recv())
                if isinstance(msg, ServerInfo):
                    return msgspec.structs.asdict(msg)
                if isinstance(msg, StartupError):
                    return {"error": msg.message}
            elif self.proc.poll() is not None:
                return {"error": f"scheduler process exited with code {self.proc.returncode}"}

    async def shutdown(self) -> None:
        self._shutting_down = True
        if self.proc is not None and self.proc.poll() is None:
            try:
                await asyncio.wait_for(self._call(ShutdownReq), 5)
            except Exception:
                pass
            for stop in (None, self.proc.terminate, self.proc.kill):
                if stop is not None:
                    stop()
                # polled, not run_in_executor: at interpreter exit (an Engine nobody shut
                # down) the default executor no longer takes work
                deadline = time.monotonic() + 5
                while self.proc.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if self.proc.poll() is not None:
                    break
        for t in (self._recv_task, getattr(self, "_watch_task", None)):
            if t is not None:
                t.cancel()
        if hasattr(self, "ctx"):
            self.ctx.destroy(linger=0)

    async def _watch_child(self) -> None:
        while self.proc.poll() is None:
            await asyncio.sleep(0.5)
        if self.dead is None and self._shutting_down:
            return
        self.dead = f"scheduler process died (exit code {self.proc.returncode})"
        logger.error(self.dead)
        for st in list(self.states.values()):
            st.queue.put_nowait(SchedulerDied(self.dead))
        for fut in self.calls.values():
            if not fut.done():
                fut.set_exception(SchedulerDied(self.dead))

    async def _recv_loop(self) -> None:
        while True:
            data = await self.recv_sock.recv()
            try:
                msg = decode_from_scheduler(data)
            except Exception:  # a bug, not a peer: log it loudly, keep serving the rest
                logger.exception("undecodable message from the scheduler")
                continue
            if isinstance(msg, (FlushCacheResp, LoadResp, ShutdownResp, ProfileResp, AdminResp, SemiPDResp)):
                fut = self.calls.pop(msg.call_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                continue
            assert isinstance(msg, BatchOut)
            now = time.time()
            for out in msg.outs:
                st = self.states.get(out.rid)
                if st is not None:
                    st.queue.put_nowait((out, now))

    async def _call(self, request: Callable[[int], ControlReq]) -> ControlResp:
        """Send a control call (`request(call_id)`) and wait for its typed reply."""
        if self.dead:
            raise SchedulerDied(self.dead)
        call_id = self._next_call
        self._next_call += 1
        fut = asyncio.get_running_loop().create_future()
        self.calls[call_id] = fut
        await self.send_sock.send(encode(request(call_id)))
        return await fut

    async def get_load(self) -> dict[str, Any]:
        """The scheduler's load and counters (the JSON of /get_load)."""
        resp: LoadResp = await self._call(GetLoadReq)
        return resp.to_dict()

    async def flush_cache(self) -> bool:
        """Empty the prefix cache; False while requests run."""
        resp: FlushCacheResp = await self._call(FlushCacheReq)
        return resp.success

    async def profile(self, start: bool, **options: Any) -> ProfileResp:
        """Start (options: output_dir, num_steps, record_shapes, with_stack) or stop the
        scheduler's torch profiler (pdserve/engine/profiler.py)."""
        resp: ProfileResp = await self._call(lambda call_id: ProfileReq(call_id, start, **options))
        return resp

    async def admin_call(self, request: Callable[[int], ControlReq]) -> AdminResp:
        """A weights / memory / pause call (pdserve/engine/weights_control.py)."""
        return await self._call(request)

    async def abort_all(self, message: str) -> int:
        """Abort every request in flight with `message`; returns how many."""
        rids = list(self.states)
        for rid in rids:
            await self.send_sock.send(encode(AbortReq(rid, message)))
        return len(rids)

    async def semi_pd_status(self) -> dict[str, Any]:
        """The Semi-PD resident's status (ValueError when Semi-PD is off)."""
        self._need_semi_pd()
        resp: SemiPDResp = await self._call(SemiPDStatusReq)
        return resp.status

    async def semi_pd_reallocate(self, prefill_percentage: int, decode_percentage: int) -> SemiPDResp:
        self._need_semi_pd()
        return await self._call(lambda cid: SemiPDReallocateReq(cid, prefill_percentage, decode_percentage))

    def _need_semi_pd(self) -> None:
        if not self.args.semi_pd_enabled:
            raise ValueError("Semi-PD is not enabled on this server (start it with --enable-semi-pd)")

    # ---- requests -----------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in the JSON): tokenizers reject it
            raise ValueError(f"the text is not valid Unicode: {e.reason} at position {e.start}") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        try:
            out = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                chat_template=self.chat_template,
                tools=tools,
            )
        except Exception as e:
            raise ValueError(f"messages could not be rendered with the chat template: {e}") from e
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def validate(
        self, input_ids: list[int], sp: SamplingParams, top_logprobs_num: int, names: dict[str, str] | None = None
    ) -> None:
        """`names`: sampling field -> the request key it came from (OpenAI routes), so that
        errors name what the client sent."""
        vocab = self.info.get("vocab_size", len(self.tokenizer))
        sp.verify(vocab, "" if names is not None else "sampling_params.", names)
        if not input_ids:
            raise ValueError("the prompt is empty")
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in input_ids):
            raise ValueError(f"input_ids must be token ids in [0, {vocab})")
        ctx = self.info["context_length"]
        if len(input_ids) >= ctx:
            raise ValueError(f"the prompt has {len(input_ids)} tokens; the context length is {ctx}")
        if len(input_ids) + sp.max_new_tokens > ctx:
            raise ValueError(
                f"Requested token count exceeds the model's maximum context length of {ctx} "
                f"tokens: {len(input_ids)} prompt + {sp.max_new_tokens} "
                f"{(names or {}).get('max_new_tokens', 'max_new_tokens')}"
            )
        too_big = kv_pool_fit_error(len(input_ids), self.info["max_total_num_tokens"])
        if too_big is not None:
            raise ValueError(too_big)
        if not (0 <= top_logprobs_num <= MAX_TOP_LOGPROBS):
            raise ValueError(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}]")

    async def check_grammar(self, sp: SamplingParams, names: dict[str, str] | None = None) -> None:
        """Structured output: parse the grammar (json_schema / regex / ebnf) off the event
        loop, so that a bad one is a 400 before anything starts. Cached per spec."""
        g = sp.grammar
        if g is None:
            return
        from pdserve.engine.grammar import validate_spec
        from pdserve.server.protocol import FieldError

        try:
            await asyncio.to_thread(validate_spec, *g)
        except ValueError as e:
            field = (names or {}).get(g[0]) or (g[0] if names is not None else f"sampling_params.{g[0]}")
            raise FieldError(f"{field}: {e}", field) from None

    async def generate(
        self,
        input_ids: list[int],
        sp: SamplingParams,
        *,
        rid: str | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        bootstrap: tuple | None = None,
    ) -> AsyncIterator[dict]:
        """Yields SGLang-shaped dicts (cumulative text/output_ids, meta_info); the
        last one has meta_info.finish_reason set. Raises ValueError for bad input.
        If the consumer stops early (client gone), the request is aborted."""
        if self.dead:
            raise SchedulerDied(self.dead)
        self.validate(input_ids, sp, top_logprobs_num)
        await self.check_grammar(sp)
        rid = rid or uuid.uuid4().hex
        if rid in self.states:
            raise ValueError(f"request id {rid!r} is already in use")
        st = ReqState(
            rid,
            len(input_ids),
            IncrementalDetokenizer(self.tokenizer, sp.skip_special_tokens),
            list(sp.stop),
            input_ids=list(input_ids),
        )
        self.states[rid] = st
        host, port, room = bootstrap or (None, None, None)
        msg = GenerateReq(rid, input_ids, sp, return_logprob, top_logprobs_num, time.time(), host, port, room)
        try:
            await self.send_sock.send(encode(msg))
            while True:
                item = await st.queue.get()
                if isinstance(item, Exception):
                    raise item
                out, now = item
                yield self._absorb(st, out, now)
                if out.finish is not None:
                    st.finished = True
                    return
        finally:
            self.states.pop(rid, None)
            if not st.finished and not self.dead:
                await self.send_sock.send(encode(AbortReq(rid)))

    def _absorb(self, st: ReqState, out: ReqOut, now: float) -> dict:
        if out.new_ids:
            if st.first_token_time is None:
                st.first_token_time = now
                if self.metrics:
                    self.metrics.observe_ttft(now - st.created)
            elif self.metrics and st.last_token_time is not None:
                self.metrics.observe_itl((now - st.last_token_time) / len(out.new_ids))
            st.last_token_time = now
        st.output_ids.extend(out.new_ids)
        if out.new_logprobs:
            st.logprobs.extend(out.new_logprobs)
        if out.new_top_logprobs:
            st.top_logprobs.extend(out.new_top_logprobs)
        st.detok.add(out.new_ids)
        text = st.detok.text
        finish = None
        if out.finish is not None:
            st.detok.flush()
            text = st.detok.text
            finish = msgspec.structs.asdict(out.finish)
            finish = {k: v for k, v in finish.items() if v is not None}
            finish["type"] = out.finish.type.value  # a plain str for Engine callers and JSON
            if out.finish.type == FinishReasonType.STOP and isinstance(out.finish.matched, str):
                cut = text.find(out.finish.matched)
                if cut >= 0:
                    text = text[:cut]
            if self.metrics:
                self.metrics.observe_e2e(now - st.created, out.finish.type.value)
        elif st.stop_strings:
            # never show a partial stop string that might complete later
            hold = max(len(s) for s in st.stop_strings) - 1
            text = text[: max(0, len(text) - hold)]
        meta = {
            "id": st.rid,
            "prompt_tokens": st.prompt_tokens,
            "completion_tokens": len(st.output_ids),
            "cached_tokens": out.cached_tokens,
            "finish_reason": finish,
            "e2e_latency": now - st.created,
        }
        if out.finish is not None:
            for k in ("queue_time", "prefill_time", "transfer_time", "decode_time"):
                meta[k] = getattr(out, k)
        if out.input_logprobs is not None:
            st.input_logprobs = out.input_logprobs
        if st.input_logprobs is not None:
            meta["input_token_logprobs"] = [[lp, tid, None] for lp, tid in zip(st.input_logprobs, st.input_ids)]
        if st.logprobs or out.new_logprobs is not None:
            meta["output_token_logprobs"] = [[lp, tid, None] for lp, tid in zip(st.logprobs, st.output_ids)]
            if st.top_logprobs:
                meta["output_top_logprobs"] = [[[lp, tid, None] for tid, lp in row] for row in st.top_logprobs]
        return {"text": text, "output_ids": list(st.output_ids), "meta_info": meta}
