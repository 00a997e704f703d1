"""The scheduler process: owns the model, the KV pool and the prefix cache.

It receives typed messages (pdserve.messages) from the front end over ZMQ and
answers with BatchOut and one typed reply per control call. The event loop is
schedule -> run -> update (`Scheduler.step`), with the PD queues (engine/pd_queues.py:
PDQueues) advanced before each step. The process is started as
`python -m pdserve.disagg.scheduler_process_main`, which plugs the PD queues in.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import typing

import msgspec
import torch
import zmq

from pdserve.config import ServerArgs
from pdserve.engine.kv_connector import BaseKVConnector, NoKVConnector
from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.profiler import Profiler
from pdserve.engine.model_loading import load_model, num_kv_pages, prebuild_shapes, set_threads
from pdserve.engine.pd_queues import PDContext, PDQueues, PDSetup
from pdserve.engine.request import Req
from pdserve.engine.runner import ModelRunner, kv_pool_shape, prefault
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.shm_segment import allocate_kv_buffer, free_kv_buffer, new_shm_name
from pdserve.engine.weights_control import WeightsControl
from pdserve.enums import DisaggregationMode, TransferBackend
from pdserve.model.tp import TPShard
from pdserve.net import free_port
from pdserve.messages import (
    AbortReq,
    BatchOut,
    FinishReason,
    FinishReasonType,
    FlushCacheReq,
    FlushCacheResp,
    GenerateReq,
    GetLoadReq,
    LoadResp,
    PrefillQueueStats,
    ProfileReq,
    ProfileResp,
    ServerInfo,
    ShutdownReq,
    ShutdownResp,
    StartupError,
    ToScheduler,
    WeightsReq,
    decode_to_scheduler,
    encode,
)

logger = logging.getLogger("pdserve.scheduler")

WEIGHTS_CALLS = typing.get_args(WeightsReq)


class SchedulerProcess:
    def __init__(self, args: ServerArgs, recv_addr: str, send_addr: str, pd_setup: PDSetup | None = None) -> None:
        """`pd_setup` builds the PD queues of a prefill or decode server (the disagg layer's
        build_pd_queues, passed in by disagg/scheduler_process_main.py)."""
        self.args = args
        self.tp = None
        mode = args.disaggregation_mode
        self.profiler = Profiler("colocated" if mode == DisaggregationMode.NULL else mode.value)
        if args.tp_size > 1:  # start the other ranks first: they load their shards meanwhile
            from pdserve.engine.tp import TPDriver

            self.tp = TPDriver(args)
            os.sched_setaffinity(0, self.tp.rank0_cores)
            torch.set_num_threads(self.tp.rank0_threads)
        else:
            set_threads(args)
        t0 = time.time()
        self.pd_queues: PDQueues | None = None
        self.kv_connector: BaseKVConnector = NoKVConnector()
        self.kv_shm, self.ar_shm = [], None
        try:
            self._build(args)
        except BaseException:
            self.close()
            raise
        self.load_seconds = time.time() - t0
        ctx = zmq.Context.instance()
        self.recv = ctx.socket(zmq.PULL)
        self.recv.bind(recv_addr)
        self.send = ctx.socket(zmq.PUSH)
        self.send.connect(send_addr)
        self.running = True
        self._last_log = time.time()
        self._pd_poller: zmq.Poller | None = None
        self.warmup()
        if args.disaggregation_mode != DisaggregationMode.NULL:
            self._setup_pd_queues(pd_setup)
        self.weights = self._weights_control()
        self.held: list[GenerateReq] = []  # new requests while a weight update waits
        if self.runner.lazy_pool:  # after startup: it must not slow the start itself
            prefault(self.runner.kv_data)

    def _build(self, args: ServerArgs) -> None:
        """Model (this rank's shard), KV pools, the other tp ranks, tokenizer, scheduler."""
        self.model = load_model(args)
        cfg, full = self.model.config, self.model.full_config
        tp = args.tp_size
        # the pool budget covers the whole instance: all ranks' heads and weights
        num_pages = num_kv_pages(args, full, self.model.dtype, self.model.num_bytes() * tp)
        prebuild_shapes(self.model, args)
        pd = args.disaggregation_mode != DisaggregationMode.NULL
        decode_shm = (
            args.disaggregation_mode == DisaggregationMode.DECODE
            and args.disaggregation_transfer_backend == TransferBackend.SHM
        )
        # Pools in shared memory: decode + shm (prefill writes straight into them), and every
        # rank's under tp in PD mode (rank 0's transfer managers move all ranks' heads) or
        # with a KV store (rank 0's connector saves and loads all ranks' heads)
        self.kv_shm: list[str | None] = [None] * tp
        self.kv_pools: list[torch.Tensor | None] = [None] * tp
        if decode_shm or ((pd or args.kv_store is not None) and tp > 1):
            for r in range(tp):
                self.kv_shm[r] = new_shm_name()
                shape = kv_pool_shape(TPShard.of(full, r, tp).local_config(full), num_pages, args.page_size)
                self.kv_pools[r] = allocate_kv_buffer(shape, self.model.dtype, self.kv_shm[r])
        self.runner = ModelRunner(
            self.model,
            num_pages,
            args.page_size,
            self.kv_pools[0],
            tp=self.tp,
            attention_backend=args.attention_backend,
        )
        self.kv_pools[0] = self.runner.kv_data
        logger.info("attention backend: %s", type(self.runner.attn).__name__)
        if self.tp is not None:
            from pdserve.engine.tp import ShmAllReduce

            self.ar_shm = new_shm_name()
            ar_buf = allocate_kv_buffer((ShmAllReduce.nbytes(tp),), torch.uint8, self.ar_shm)
            self.tp.start(num_pages, self.kv_shm, free_port(), self.ar_shm, ar_buf)
            self.model.all_reduce = self.tp.allreduce
        from pdserve.model.tokenizer import load_tokenizer

        tok = load_tokenizer(args.model_path, args.tokenizer_path)
        self.context_length = min(args.context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
        eos = set(cfg.eos_token_ids)
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        self.kv_connector = self._kv_connector(args)
        self.scheduler = Scheduler(
            PageAllocator(num_pages, args.page_size),
            max_running_requests=args.max_running_requests,
            chunked_prefill_size=args.chunked_prefill_size,
            context_length=self.context_length,
            eos_ids=tuple(sorted(eos)),
            disable_radix_cache=args.disable_radix_cache,
            detokenize=lambda ids: tok.decode(ids, skip_special_tokens=False),
            kv_connector=self.kv_connector,
        )
        from pdserve.engine.grammar import GrammarBackend  # xgrammar loads on first use

        self.grammar = GrammarBackend(tok, cfg.vocab_size, sorted(eos))

    def _kv_connector(self, args: ServerArgs) -> BaseKVConnector:
        """`--kv-store`: mode null and prefill servers look prompts up and write them; decode
        servers get their KV from prefill and never use it."""
        if args.kv_store is None or args.disaggregation_mode == DisaggregationMode.DECODE:
            if args.kv_store is not None:
                logger.info("--kv-store is not used by a decode server (its KV comes from prefill)")
            return NoKVConnector()
        from pdserve.engine.kv_connectors import create_kv_connector, store_layout
        from pdserve.model.paths import resolve_model_path

        layout = store_layout(
            resolve_model_path(args.model_path), self.model.full_config, args.page_size, self.model.dtype
        )
        pools = [p for p in self.kv_pools if p is not None]
        assert len(pools) == args.tp_size  # under tp, _build put every rank's pool in shared memory
        return create_kv_connector(args.kv_store, layout, pools, args.kv_store_timeout)

    def _weights_control(self) -> WeightsControl | None:
        """RL weight sync and memory release on this process's model (None: the process has
        no model to update, e.g. Semi-PD's resident, which answers those calls itself)."""
        return WeightsControl(
            self.model,
            self.kv_pools,
            self.tp,
            busy=self._busy,
            flush_cache=self.scheduler.flush_cache,
            reply=lambda resp: self.send.send(encode(resp)),
            weights_changed=lambda: self.kv_connector.disable("the weights were updated"),
        )

    def _setup_pd_queues(self, pd_setup: PDSetup | None) -> None:
        if pd_setup is None:
            raise ValueError(
                f"--disaggregation-mode {self.args.disaggregation_mode}: this scheduler process has "
                "no PD queues (start it as pdserve.disagg.scheduler_process_main)"
            )
        self.pd_queues = pd_setup(
            PDContext(self.args, self.scheduler, self.kv_pools, self.kv_shm, self.model.full_config.num_kv_heads)
        )

    def close(self) -> None:
        if getattr(self, "weights", None) is not None:
            self.weights.close()
        if self.pd_queues is not None:
            self.pd_queues.close()
        self.kv_connector.close()
        if self.tp is not None:
            self.tp.close()
        for name in [*self.kv_shm, self.ar_shm]:
            if name is not None:
                free_kv_buffer(name)

    def warmup(self) -> None:
        """One tiny prefill + decode so the first user request does not pay for lazy init."""
        from pdserve.sampling_params import SamplingParams

        self.scheduler.add_request(Req("__warmup__", [1, 2, 3, 4], SamplingParams(max_new_tokens=2, temperature=0)))
        while self.scheduler.has_work():
            self.scheduler.step(self.runner.run)
        self.scheduler.flush_cache()
        self.scheduler.reset_stats()

    def info(self) -> ServerInfo:
        cfg = self.model.config
        return ServerInfo(
            max_total_num_tokens=self.scheduler.capacity_tokens,
            page_size=self.args.page_size,
            context_length=self.context_length,
            vocab_size=cfg.vocab_size,
            dtype=str(self.model.dtype).replace("torch.", ""),
            num_layers=cfg.num_layers,
            arch=cfg.arch,
            weight_bytes=self.model.num_bytes(),
            load_seconds=self.load_seconds,
            max_running_requests=self.args.max_running_requests,
            chunked_prefill_size=self.args.chunked_prefill_size,
            disable_radix_cache=self.args.disable_radix_cache,
            tp_size=self.args.tp_size,
        )

    # ---- message handling ---------------------------------------------------------------
    def _busy(self) -> bool:
        """Requests in flight: in the scheduler or in the PD queues."""
        return self.scheduler.has_work() or (self.pd_queues is not None and self.pd_queues.has_work())

    def _after_step(self) -> None:
        """A weight update that waited for the requests in flight applies now; the requests
        held meanwhile go in (they run on the new weights)."""
        if self.weights.poll():
            held, self.held = self.held, []
            for msg in held:
                self.handle(msg)

    def handle(self, msg: ToScheduler) -> None:
        scheduler = self.scheduler
        if isinstance(msg, WEIGHTS_CALLS):
            self.weights.handle(msg)
        elif isinstance(msg, GenerateReq):
            if self.weights.holds_new_requests():
                self.held.append(msg)
                return
            req = Req(msg.rid, msg.input_ids, msg.sampling, msg.return_logprob, msg.top_logprobs_num, msg.arrival_time)
            released = self.weights.released_message()
            if released is not None:
                scheduler.fail(req, FinishReason(FinishReasonType.ABORT, message=released, status_code=503))
                return
            g = msg.sampling.grammar
            if g is not None:  # compiled grammars are cached: a repeated one costs ~nothing
                try:
                    req.grammar = self.grammar.new_state(*g)
                except ValueError as e:
                    scheduler.fail(req, FinishReason(FinishReasonType.ABORT, message=str(e), status_code=400))
                    return
            if self.pd_queues is not None:
                req.bootstrap_host, req.bootstrap_port = msg.bootstrap_host, msg.bootstrap_port
                req.bootstrap_room = msg.bootstrap_room
                self.pd_queues.add(req)
            else:
                scheduler.add_request(req)
        elif isinstance(msg, AbortReq):
            held = next((m for m in self.held if m.rid == msg.rid), None)
            if held is not None:  # never reached the scheduler: end it there, as an abort
                self.held.remove(held)
                scheduler.fail(
                    Req(held.rid, held.input_ids, held.sampling, arrival_time=held.arrival_time),
                    FinishReason(FinishReasonType.ABORT, message=msg.message),
                )
            elif self.pd_queues is None or not self.pd_queues.abort(msg.rid):
                scheduler.abort(msg.rid, msg.message)
        elif isinstance(msg, GetLoadReq):
            self.send.send(encode(self.load(msg.call_id)))
        elif isinstance(msg, FlushCacheReq):
            self.send.send(encode(FlushCacheResp(msg.call_id, scheduler.flush_cache())))
        elif isinstance(msg, ShutdownReq):
            self.running = False
            self.send.send(encode(ShutdownResp(msg.call_id)))
        elif isinstance(msg, ProfileReq):
            self.send.send(encode(self.profile(msg)))

    def profile(self, msg: ProfileReq) -> ProfileResp:
        try:
            if msg.start:
                path = self.profiler.start(msg.output_dir, msg.num_steps, msg.record_shapes, msg.with_stack)
                return ProfileResp(msg.call_id, True, "Start profiling.", path)
            return ProfileResp(msg.call_id, True, "Stop profiling.", self.profiler.stop())
        except ValueError as e:
            return ProfileResp(msg.call_id, False, str(e))

    def load(self, call_id: int) -> LoadResp:
        resp = LoadResp(
            call_id, self.scheduler.load(), self.args.disaggregation_mode, kv_store=self.kv_connector.stats()
        )
        if self.pd_queues is not None:
            stats = self.pd_queues.stats()
            if isinstance(stats, PrefillQueueStats):
                resp.prefill = stats
            else:
                resp.decode = stats
        return resp

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

    # ---- event loops --------------------------------------------------------------------
    def event_loop(self) -> None:
        if self.args.disable_overlap_schedule:
            self.event_loop_normal()
        else:
            self.event_loop_overlap()

    def _receive(self, idle: bool) -> None:
        """Take in new messages and advance the PD queues. `idle`: nothing to schedule
        and nothing to send; then wait (for a message, or a transfer state change while
        PD queues hold requests) instead of spinning."""
        pd_busy = self.pd_queues is not None and self.pd_queues.has_work()
        if pd_busy and idle:
            self._wait_pd()
        self.recv_all(block=idle and not pd_busy)
        if self.pd_queues is not None:
            self.pd_queues.step()

    def _wait_pd(self, timeout_s: float = 0.02) -> None:
        """Only transfers in flight: sleep until a message arrives, a transfer endpoint changes
        state (PDQueues.wake_fileno) or `timeout_s` passes (time-based checks: timeouts)."""
        assert self.pd_queues is not None
        if self._pd_poller is None:
            self._pd_poller = zmq.Poller()
            self._pd_poller.register(self.recv, zmq.POLLIN)
            self._pd_poller.register(self.pd_queues.wake_fileno(), zmq.POLLIN)
        self._pd_poller.poll(timeout_s * 1000)
        self.pd_queues.drain_wakeups()

    def event_loop_normal(self) -> None:
        """schedule -> run -> update, one after the other (Scheduler.step)."""
        scheduler = self.scheduler
        while self.running:
            paused = self.weights.paused
            self._receive(idle=(paused or not scheduler.has_work()) and not scheduler.has_outputs())
            outs = scheduler.take_outputs() if self.weights.paused else scheduler.step(self.runner.run)
            if outs:
                self.send.send(encode(BatchOut(outs)))
                self.profiler.step()
            self._after_step()
            self._maybe_log()

    def event_loop_overlap(self) -> None:
        """The CPU work that does not feed the next forward (encoding and sending step
        N's outputs, receiving new requests) runs while step N+1's forward runs in a
        worker thread (torch releases the GIL inside ops)."""
        from concurrent.futures import ThreadPoolExecutor

        scheduler = self.scheduler
        pool = ThreadPoolExecutor(1, thread_name_prefix="pdserve-forward")
        unsent: list = []
        try:
            while self.running:
                paused = self.weights.paused
                self._receive(idle=(paused or not scheduler.has_work()) and not scheduler.has_outputs() and not unsent)
                plan = None if self.weights.paused else scheduler.schedule()
                future = pool.submit(self.runner.run, plan) if plan is not None else None
                if unsent:
                    self.send.send(encode(BatchOut(unsent)))
                    unsent = []
                if future is not None:
                    unsent = scheduler.update(plan, future.result())
                    self.profiler.step()
                else:
                    unsent = scheduler.take_outputs()
                self._after_step()
                self._maybe_log()
        finally:
            pool.shutdown(wait=True)

    def _maybe_log(self) -> None:
        if not self.scheduler.has_work() or time.time() - self._last_log < 10:
            return
        self._last_log = time.time()
        load = self.scheduler.load()
        extra = ""
        if self.pd_queues is not None:
            extra = " " + " ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in msgspec.structs.asdict(self.pd_queues.stats()).items()
            )
        logger.info(
            "running=%d waiting=%d used_pages=%d/%d cached_pages=%d%s",
            load.num_running_reqs,
            load.num_waiting_reqs,
            load.num_used_pages,
            load.num_total_pages,
            load.num_cached_pages,
            extra,
        )


def die_with_parent() -> None:
    """Linux: get SIGTERM when the parent dies, so a killed server leaves no orphan."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_scheduler_process(
    args: ServerArgs,
    recv_addr: str,
    send_addr: str,
    pd_setup: PDSetup | None = None,
    process_class: type[SchedulerProcess] = SchedulerProcess,
) -> None:
    """Child process body: build everything, announce readiness (ServerInfo), serve.
    `process_class`: a SchedulerProcess subclass (Semi-PD's resident process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    holder: dict = {}

    def on_term(*_):  # leave the loop at the next iteration; close() frees shm, sockets
        if "proc" in holder:
            holder["proc"].running = False
        else:
            sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    die_with_parent()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s [scheduler] %(levelname)s %(message)s")
    try:
        proc = process_class(args, recv_addr, send_addr, pd_setup)
    except Exception as e:
        # the front end reports the error in one line; the traceback shows at --log-level debug
        logger.debug("scheduler failed to start", exc_info=True)
        # from here on a SIGTERM (the parent stopping after our error) just ends us: on_term's
        # sys.exit could land in an interpreter-exit finalizer and print a traceback
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.connect(send_addr)
        sock.send(encode(StartupError(f"{type(e).__name__}: {e}")))
        sock.close(linger=2000)
        return
    holder["proc"] = proc
    from pdserve.engine import memdebug

    memdebug.install(proc)  # only with PDSERVE_MEMDUMP_DIR set
    proc.send.send(encode(proc.info()))
    try:
        proc.event_loop()
    finally:
        proc.close()
