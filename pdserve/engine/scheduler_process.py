"""The scheduler process: owns the model, the KV pool and the prefix cache.

It receives typed messages (pdserve.messages) from the front end over ZMQ and
answers with BatchOut / ControlResp. The event loop is schedule -> run -> update.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time

import zmq

from pdserve.config import ServerArgs
from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.model_loading import load_model, num_kv_pages, set_threads
from pdserve.engine.request import Req
from pdserve.engine.runner import ModelRunner
from pdserve.engine.scheduler import Scheduler
from pdserve.messages import (AbortReq, BatchOut, ControlReq, ControlResp, GenerateReq,
                              decode_to_scheduler, encode)

logger = logging.getLogger("pdserve.scheduler")


class SchedulerProcess:
    def __init__(self, args: ServerArgs, recv_addr: str, send_addr: str) -> None:
        self.args = args
        set_threads(args)
        t0 = time.time()
        self.model = load_model(args)
        cfg = self.model.config
        num_pages = num_kv_pages(args, cfg, self.model.dtype, self.model.num_bytes())
        self.runner = ModelRunner(self.model, num_pages, args.page_size)
        from pdserve.model.tokenizer import load_tokenizer

        tok = load_tokenizer(args.model_path, args.tokenizer_path)
        self.context_length = min(args.context_length or cfg.max_position_embeddings,
                                  cfg.max_position_embeddings)
        eos = set(cfg.eos_token_ids)
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        self.scheduler = Scheduler(
            PageAllocator(num_pages, args.page_size),
            max_running_requests=args.max_running_requests,
            chunked_prefill_size=args.chunked_prefill_size,
            context_length=self.context_length,
            eos_ids=tuple(sorted(eos)),
            disable_radix_cache=args.disable_radix_cache,
            detokenize=lambda ids: tok.decode(ids, skip_special_tokens=False),
        )
        self.load_seconds = time.time() - t0
        ctx = zmq.Context.instance()
        self.recv = ctx.socket(zmq.PULL)
        self.recv.bind(recv_addr)
        self.send = ctx.socket(zmq.PUSH)
        self.send.connect(send_addr)
        self.running = True
        self.warmup()

    def warmup(self) -> None:
        """One tiny prefill + decode so the first user request does not pay for lazy init."""
        from pdserve.engine.sampling_params import SamplingParams

        self.scheduler.add_request(Req("__warmup__", [1, 2, 3, 4], SamplingParams(max_new_tokens=2, temperature=0)))
        while self.scheduler.has_work:
            plan = self.scheduler.schedule()
            if plan is not None:
                self.scheduler.update(plan, self.runner.run(plan))
        self.scheduler.flush_cache()
        self.scheduler.stats.__init__()

    def info(self) -> dict:
        cfg = self.model.config
        return {
            "max_total_num_tokens": self.scheduler.alloc.capacity_tokens,
            "page_size": self.args.page_size,
            "context_length": self.context_length,
            "vocab_size": cfg.vocab_size,
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "num_layers": cfg.num_layers,
            "arch": cfg.arch,
            "weight_bytes": self.model.num_bytes(),
            "load_seconds": self.load_seconds,
            "max_running_requests": self.args.max_running_requests,
            "chunked_prefill_size": self.args.chunked_prefill_size,
            "disable_radix_cache": self.args.disable_radix_cache,
        }

    # ---- message handling ---------------------------------------------------------------
    def handle(self, msg) -> None:
        s = self.scheduler
        if isinstance(msg, GenerateReq):
            req = Req(msg.rid, msg.input_ids, msg.sampling, msg.return_logprob,
                      msg.top_logprobs_num, msg.arrival_time)
            s.add_request(req)
        elif isinstance(msg, AbortReq):
            s.abort(msg.rid)
        elif isinstance(msg, ControlReq):
            self.send.send(encode(ControlResp(msg.call_id, self.control(msg))))

    def control(self, msg: ControlReq) -> dict:
        s = self.scheduler
        if msg.kind == "flush_cache":
            return {"success": s.flush_cache()}
        if msg.kind == "get_load":
            load = s.load()
            st = s.stats
            cache = s.cache
            load.update(prompt_tokens=st.prompt_tokens, generation_tokens=st.generation_tokens,
                        num_retractions=st.num_retractions, cache_hit_tokens=cache.hit_tokens,
                        cache_query_tokens=cache.query_tokens)
            return load
        if msg.kind == "server_info":
            return self.info()
        if msg.kind == "shutdown":
            self.running = False
            return {"success": True}
        return {"error": f"unknown control call {msg.kind!r}"}

    def recv_all(self, block: bool) -> None:
        timeout = 100 if block else 0
        while self.recv.poll(timeout):
            timeout = 0
            try:
                msg = decode_to_scheduler(self.recv.recv())
            except Exception as e:  # malformed message: log, keep serving
                logger.error("dropping malformed message: %s", e)
                continue
            self.handle(msg)

    # ---- event loop ---------------------------------------------------------------------
    def event_loop(self) -> None:
        s = self.scheduler
        last_log = time.time()
        while self.running:
            self.recv_all(block=not s.has_work)
            plan = s.schedule() if s.has_work else None
            outs = s.update(plan, self.runner.run(plan)) if plan is not None else []
            if not outs and s.pending_outs:
                outs, s.pending_outs = s.pending_outs, []
            if outs:
                self.send.send(encode(BatchOut(outs)))
            if plan is not None and time.time() - last_log > 10:
                last_log = time.time()
                ld = s.load()
                logger.info("running=%d waiting=%d used_pages=%d/%d cached_pages=%d",
                            ld["num_running_reqs"], ld["num_waiting_reqs"], ld["num_used_pages"],
                            ld["num_total_pages"], ld["num_cached_pages"])


def die_with_parent() -> None:
    """Linux: get SIGTERM when the parent dies, so a killed server leaves no orphan."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_scheduler_process(args: ServerArgs, recv_addr: str, send_addr: str) -> None:
    """Child process body: build everything, announce readiness (call_id 0), serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    die_with_parent()
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s [scheduler] %(levelname)s %(message)s")
    try:
        proc = SchedulerProcess(args, recv_addr, send_addr)
    except Exception as e:
        logger.exception("scheduler failed to start")
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.connect(send_addr)
        sock.send(encode(ControlResp(0, {"error": f"{type(e).__name__}: {e}"})))
        sock.close(linger=2000)
        return
    proc.send.send(encode(ControlResp(0, proc.info())))
    proc.event_loop()


def main() -> None:
    """`python -m pdserve.engine.scheduler_process ARGS_JSON RECV SEND` (started by the
    front end with subprocess: no pickled state crosses the process boundary)."""
    raw = json.loads(sys.argv[1])
    run_scheduler_process(ServerArgs(**raw), sys.argv[2], sys.argv[3])


if __name__ == "__main__":
    main()
