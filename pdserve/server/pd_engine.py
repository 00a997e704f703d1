"""`pdserve.PDEngine`: N prefill and M decode runtimes in one Python program, paired per
request as the router pairs servers (issue #15; seed 003's runtime example, and how RL
frameworks build engines in-process).

    engine = pdserve.PDEngine(num_prefill=1, num_decode=2, dtype="float32")
    engine.generate("The capital of France is", {"max_new_tokens": 8, "temperature": 0})
    engine.generate(["a", "b"], {"max_new_tokens": 8})        # batch -> list, pairs spread
    for chunk in engine.generate("hi", stream=True): ...      # streamed from the decode side
    engine.shutdown()

Each runtime is a `pdserve.Engine` with disaggregation_mode "prefill" or "decode" (its own
scheduler process; a prefill runtime's bootstrap server on a free port). A request goes to
one prefill and one decode runtime at once with a fresh bootstrap room; the prefill computes
the prompt's KV and sends it over the transfer backend (tcp by default), the decode runtime
continues and answers. The two runtimes can be used by hand the same way: pass the prefill's
bootstrap_host / bootstrap_port and one room to both `generate` calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from concurrent.futures import Future
import itertools
import secrets
from typing import Any, Iterator

from pdserve.net import free_port
from pdserve.server.engine import Engine


class PDEngine:
    def __init__(
        self,
        num_prefill: int = 1,
        num_decode: int = 1,
        prefill_tp_size: int = 1,
        decode_tp_size: int = 1,
        **kwargs: Any,
    ) -> None:
        for name, v in (("num_prefill", num_prefill), ("num_decode", num_decode)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for key in ("disaggregation_mode", "disaggregation_bootstrap_port", "tp_size"):
            if key in kwargs:
                raise ValueError(f"{key} is set by PDEngine for each runtime")
        self.prefill: list[Engine] = []
        self.decode: list[Engine] = []
        try:
            for _ in range(num_prefill):
                self.prefill.append(
                    Engine(
                        disaggregation_mode="prefill",
                        tp_size=prefill_tp_size,
                        disaggregation_bootstrap_port=free_port(),
                        **kwargs,
                    )
                )
            for _ in range(num_decode):
                self.decode.append(Engine(disaggregation_mode="decode", tp_size=decode_tp_size, **kwargs))
        except BaseException:
            self.shutdown()
            raise
        self._pairs = itertools.count()
        self.tokenizer = self.decode[0].tokenizer

    def _start_pair(self, ids: list[int], sp: dict | None, lp: bool, top: int) -> tuple[Engine, tuple, Future]:
        """Pick the next prefill/decode pair and a fresh room; start the prefill side.
        Returns the decode engine, the (host, port, room) both sides use, and the prefill's
        future."""
        i = next(self._pairs)
        p, d = self.prefill[i % len(self.prefill)], self.decode[i % len(self.decode)]
        boot = (p.args.host, p.args.disaggregation_bootstrap_port, secrets.randbits(63))
        return d, boot, asyncio.run_coroutine_threadsafe(p._collect(ids, _sp(sp), lp, top, boot), p.loop)

    @staticmethod
    def _end_prefill(fp: Future) -> None:
        """The decode side's answer (or error) is the request's; the prefill side only ends."""
        try:
            fp.result(60)
        except (concurrent.futures.TimeoutError, ValueError, RuntimeError):
            fp.cancel()

    def _run_pair(self, ids: list[int], sp: dict | None, lp: bool, top: int) -> dict:
        d, boot, fp = self._start_pair(ids, sp, lp, top)
        try:
            return asyncio.run_coroutine_threadsafe(d._collect(ids, _sp(sp), lp, top, boot), d.loop).result()
        finally:
            self._end_prefill(fp)

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
    ):
        """As `pdserve.Engine.generate`; each prompt runs on one prefill/decode pair."""
        engine = self.decode[0]
        engine._check_open()
        batched, jobs = engine._jobs(prompt, sampling_params, input_ids)
        raw = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(jobs)
        if stream:
            if batched:
                raise ValueError("stream=True takes a single prompt")
            return self._stream(jobs[0][0], raw[0], return_logprob, top_logprobs_num)
        with concurrent.futures.ThreadPoolExecutor(max(1, min(len(jobs), 32))) as pool:
            outs = list(
                pool.map(lambda j: self._run_pair(j[0][0], j[1], return_logprob, top_logprobs_num), zip(jobs, raw))
            )
        return outs if batched else outs[0]

    def _stream(self, ids: list[int], sp: dict | None, lp: bool, top: int) -> Iterator[dict]:
        d, boot, fp = self._start_pair(ids, sp, lp, top)
        try:
            yield from d._sync_stream((ids, _sp(sp)), lp, top, boot)
        finally:
            self._end_prefill(fp)

    def shutdown(self) -> None:
        for e in [*self.decode, *self.prefill]:
            e.shutdown()

    def __enter__(self) -> PDEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _sp(sp: dict | None):
    from pdserve.server.protocol import sampling_from_dict

    return sampling_from_dict(sp)
