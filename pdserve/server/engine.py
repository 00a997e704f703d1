"""`pdserve.Engine`: the same engine in-process (SGLang's runtime API).

    engine = pdserve.Engine(model_path=None, dtype="float32")
    engine.generate("The capital of France is", {"max_new_tokens": 8, "temperature": 0})
    engine.generate(["a", "b"], {"max_new_tokens": 8})            # batch -> list
    for chunk in engine.generate("hi", stream=True): ...          # sync stream
    async for chunk in engine.async_generate("hi", stream=True): ...
    engine.shutdown()

The scheduler runs in its own process, as in the server; the front end runs on
an asyncio loop in a background thread so sync and async callers both work.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import subprocess
import sys
import threading
import weakref
from typing import Any, AsyncIterator, Iterator

from pdserve.config import ServerArgs
from pdserve.server.protocol import sampling_from_dict


SHUTDOWN_TIMEOUT = 15.0  # seconds shutdown() waits for the scheduler before killing it


def _at_exit(ref: "weakref.ref[Engine]") -> None:
    """A script that never called shutdown(): stop the engine while the loop thread still
    runs (atexit handlers run before daemon threads are frozen)."""
    engine = ref()
    if engine is not None:
        engine.shutdown()


class Engine:
    def __init__(self, **kwargs: Any) -> None:
        from pdserve.server.tokenizer_manager import TokenizerManager

        self._closed = True  # until started: a failed __init__ leaves nothing to shut down
        self.args = ServerArgs(**kwargs)
        from pdserve.server.preflight import check_model

        check_model(self.args)  # model files and tp size, before any process starts
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pdserve-engine-loop", daemon=True)
        self._thread.start()
        self.tm = TokenizerManager(self.args)
        self._exit_hook = functools.partial(_at_exit, weakref.ref(self))
        atexit.register(self._exit_hook)
        self._closed = False
        try:
            self._call(self.tm.start())
        except BaseException:
            self.shutdown()
            raise
        self.tokenizer = self.tm.tokenizer

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this pdserve.Engine was shut down; create a new Engine to generate again")

    def _call(self, coro, timeout: float | None = None):
        if self._closed or not self._thread.is_alive():
            coro.close()
            self._check_open()
            raise RuntimeError("the pdserve.Engine event loop is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _jobs(self, prompt, sampling_params, input_ids):
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt or input_ids")
        if prompt is not None:
            batched = isinstance(prompt, list)
            prompts = [self.tm.tokenize(p) for p in (prompt if batched else [prompt])]
        else:
            batched = bool(input_ids) and isinstance(input_ids[0], list)
            prompts = input_ids if batched else [input_ids]
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(sps) != len(prompts):
            raise ValueError("one sampling_params per prompt, or a single one for all")
        return batched, [(ids, sampling_from_dict(sp)) for ids, sp in zip(prompts, sps)]

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | list[int] | None = None,
    ):
        """Dict per prompt ({"text", "output_ids", "meta_info"}), a list for a batch,
        or (stream=True, single prompt) an iterator of cumulative chunks. A prefill or decode
        engine (disaggregation_mode) needs the pair's bootstrap_host / bootstrap_port /
        bootstrap_room (one room per prompt), as the router sends them; `pdserve.PDEngine`
        pairs engines for you."""
        self._check_open()
        batched, jobs = self._jobs(prompt, sampling_params, input_ids)
        boots = self._bootstraps(len(jobs), bootstrap_host, bootstrap_port, bootstrap_room)
        if stream:
            if batched:
                raise ValueError("stream=True takes a single prompt")
            return self._sync_stream(jobs[0], return_logprob, top_logprobs_num, boots[0])

        async def run_all():
            return await asyncio.gather(
                *(
                    self._collect(ids, sp, return_logprob, top_logprobs_num, boot)
                    for (ids, sp), boot in zip(jobs, boots)
                )
            )

        results = self._call(run_all())
        return results if batched else results[0]

    def _bootstraps(self, n: int, host, port, room) -> list[tuple | None]:
        """One (host, port, room) per prompt, or None each in mode null."""
        from pdserve.enums import DisaggregationMode

        if self.args.disaggregation_mode == DisaggregationMode.NULL:
            if room is not None or host is not None or port is not None:
                raise ValueError("bootstrap_host / bootstrap_port / bootstrap_room are for prefill and decode engines")
            return [None] * n
        rooms = room if isinstance(room, list) else [room] * n
        if host is None or port is None or len(rooms) != n or not all(isinstance(r, int) for r in rooms):
            raise ValueError(
                f"a {self.args.disaggregation_mode} engine needs bootstrap_host, bootstrap_port and "
                f"one integer bootstrap_room per prompt (pdserve.PDEngine pairs engines for you)"
            )
        return [(host, int(port), r) for r in rooms]

    async def _collect(self, ids, sp, lp, top, boot=None):
        last = None
        async for last in self.tm.generate(ids, sp, return_logprob=lp, top_logprobs_num=top, bootstrap=boot):
            pass
        return last

    def _sync_stream(self, job, lp, top, boot=None) -> Iterator[dict]:
        ids, sp = job
        agen = self.tm.generate(ids, sp, return_logprob=lp, top_logprobs_num=top, bootstrap=boot)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                self._call(agen.aclose())

    async def async_generate(
        self,
        prompt: str | None = None,
        sampling_params: dict | None = None,
        input_ids: list[int] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | list[int] | None = None,
    ):
        """Awaitable result, or (stream=True) an async iterator of chunks."""
        self._check_open()
        batched, jobs = self._jobs(prompt, sampling_params, input_ids)
        boots = self._bootstraps(len(jobs), bootstrap_host, bootstrap_port, bootstrap_room)
        if stream:
            if batched:
                raise ValueError("stream=True takes a single prompt")
            return self._async_stream(jobs[0], return_logprob, top_logprobs_num, boots[0])
        futs = [
            asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(
                    self._collect(ids, sp, return_logprob, top_logprobs_num, boot), self.loop
                )
            )
            for (ids, sp), boot in zip(jobs, boots)
        ]
        results = await asyncio.gather(*futs)
        return results if batched else results[0]

    async def _async_stream(self, job, lp, top, boot=None) -> AsyncIterator[dict]:
        ids, sp = job
        agen = self.tm.generate(ids, sp, return_logprob=lp, top_logprobs_num=top, bootstrap=boot)
        try:
            while True:
                try:
                    yield await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(agen.__anext__(), self.loop))
                except StopAsyncIteration:
                    return
        finally:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(agen.aclose(), self.loop))

    def get_load(self) -> dict:
        self._check_open()
        return self._call(self.tm.get_load())

    def flush_cache(self) -> bool:
        self._check_open()
        return self._call(self.tm.flush_cache())

    def get_server_info(self) -> dict:
        return dict(self.tm.info)

    def shutdown(self) -> None:
        """Stop the scheduler process and the loop thread. Idempotent, bounded in time;
        also run at interpreter exit for an engine nobody shut down."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._exit_hook)
        try:
            if self._thread.is_alive() and not sys.is_finalizing():
                fut = asyncio.run_coroutine_threadsafe(self._stop_loop_work(), self.loop)
                try:
                    fut.result(SHUTDOWN_TIMEOUT)
                except (concurrent.futures.TimeoutError, Exception):
                    fut.cancel()
        finally:
            self._kill_scheduler()
            if self._thread.is_alive():
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(5)

    async def _stop_loop_work(self) -> None:
        await self.tm.shutdown()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=2) if tasks else None

    def _kill_scheduler(self) -> None:
        """The scheduler process, if the orderly stop did not end it (or could not run)."""
        proc = getattr(self.tm, "proc", None)
        if proc is None or proc.poll() is not None:
            return
        for stop in (proc.terminate, proc.kill):
            stop()
            try:
                proc.wait(5)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
