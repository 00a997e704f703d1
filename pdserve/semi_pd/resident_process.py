"""The Semi-PD resident process: what `pdserve serve --enable-semi-pd` starts in place of
the scheduler process (same ZMQ protocol with the front end, pdserve/messages.py).

It owns the KV pool (one shared-memory segment) and the scheduling; two worker processes
(semi_pd/worker.py), prefill and decode, map the pool and run the forwards:

    front end ──ZMQ──▶ resident: prefill Scheduler ─┐ one PageAllocator, one KV pool (shm)
                                 decode Scheduler  ─┘
                         │ thread per role: schedule → ForwardBatch ─▶ worker (forward) ─▶ logits
                         │                  sample here ◀──────────────────────────────────┘
                         └ a request's first token (prefill) → the decode Scheduler takes the
                           same Req with the same pages (`detach_held` + `add_prebuilt`): no KV moves

Both schedulers step at the same time, each in its own thread; the policy parts run under
one lock (they share the page allocator), the forwards do not. Each worker holds its compute
share (semi_pd/cpu_share.py); a new split takes effect between two of its steps, in place
(`InPlaceSplit`: re-pin) or by process rotation (`RotationSplit`: standby workers, --semi-pd-switch).
Modules: this one (the message loop, the two schedulers, handover), semi_pd/resident_workers.py
(starting a worker, recovery when one dies), semi_pd/resident_status.py (status, load and
info), semi_pd/worker_link.py (the resident's end of a worker), semi_pd/split_mechanisms.py (split
changes: re-pin or rotation).

The weights are one copy in shared memory too (semi_pd/shared_weights.py); each worker
packs its own oneDNN copy of them. v0 limits (docs/semi_pd.md): no prefix cache (a cached
page would have two owners).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import asdict

import torch

from pdserve.config import ServerArgs
from pdserve.cpus import my_cores
from pdserve.engine.shm_segment import allocate_kv_buffer, free_kv_buffer, new_shm_name
from pdserve.engine.kv_connector import NoKVConnector
from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.model_loading import num_kv_pages
from pdserve.engine.request import Req
from pdserve.engine.runner import ModelRunner, kv_pool_shape
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.scheduler_process import WEIGHTS_CALLS, SchedulerProcess, run_scheduler_process
from pdserve.engine.tp import encode_op
from pdserve.messages import (
    AbortReq,
    AdminResp,
    BatchOut,
    FinishReason,
    FinishReasonType,
    FlushCacheReq,
    FlushCacheResp,
    GenerateReq,
    GetLoadReq,
    ProfileReq,
    ProfileResp,
    ReqOut,
    SemiPDReallocateReq,
    SemiPDResp,
    SemiPDStatusReq,
    ShutdownReq,
    ShutdownResp,
    encode,
)
from pdserve.semi_pd.allocation import SMAllocation
from pdserve.semi_pd.cpu_share import CpuShareManager, core_policy, share_plan, step_share
from pdserve.semi_pd.resident_status import ResidentStatus
from pdserve.semi_pd.resident_workers import ResidentWorkers
from pdserve.semi_pd.step_gate import StepGate, initial_prefill_cap
from pdserve.semi_pd.metrics_collector import SemiPDMetricsCollector
from pdserve.semi_pd.slo_algorithm import ControllerSettings, SLOAwareResourceController, SLOConstraints
from pdserve.semi_pd.split_mechanisms import SPLIT_MECHANISMS, InPlaceSplit, RotationSplit  # noqa: F401 (re-exported)
from pdserve.semi_pd.worker_link import ROLES, RemoteModel, WorkerDied, WorkerLink

logger = logging.getLogger("pdserve.semi_pd")

NOT_UNDER_SEMI_PD = (
    "{what} is not supported under --enable-semi-pd: the forwards run in the Semi-PD worker "
    "processes, which do not take it yet (docs/semi_pd.md)"
)
WARMUP_RID = "__warmup__"


class ResidentProcess(ResidentStatus, ResidentWorkers, SchedulerProcess):
    def _build(self, args: ServerArgs) -> None:
        from pdserve.engine.grammar import GrammarBackend
        from pdserve.engine.model_loading import resolve_dtype
        from pdserve.model.llama import LlamaModel
        from pdserve.model.loader import load_model_files
        from pdserve.model.paths import resolve_model_path
        from pdserve.model.tokenizer import load_tokenizer
        from pdserve.semi_pd.shared_weights import export_weights

        torch.set_num_threads(1)  # sampling only; the forwards run in the workers
        self.lock = threading.Lock()  # the two schedulers share the page allocator
        self.send_lock = threading.Lock()  # zmq sockets are not thread-safe
        self.links: dict[str, WorkerLink] = {}
        self.threads: list[threading.Thread] = []
        self.kv_shm_name: str | None = None
        self.weights_shm: str | None = None
        self.quota = CpuShareManager(tag=str(id(self)))
        # the fused weights only: no kernel shapes built here (load_model would), no forward runs here
        cfg, state = load_model_files(resolve_model_path(args.model_path))
        model = LlamaModel(cfg, resolve_dtype(args.dtype))
        model.load_weights(state)
        del state
        dtype = model.dtype
        # one copy of the weights in shared memory for both workers (each packs its own oneDNN copy)
        self.weights_shm, weights_bytes, manifest = export_weights(model.named_weights())
        self.weight_bytes = model.num_bytes()
        del model
        self.cfg, self.dtype = cfg, dtype
        num_pages = num_kv_pages(args, cfg, dtype, self.weight_bytes * 3)  # shared copy + 2 packed copies
        self.kv_shm_name = new_shm_name()
        kv = allocate_kv_buffer(kv_pool_shape(cfg, num_pages, args.page_size), dtype, self.kv_shm_name)
        self.cores = my_cores()
        self.policy = core_policy()  # $PDSERVE_SEMI_PD_CORES, read once: it holds for the server's life
        if self.policy != "disjoint":
            # the workers share cores: one's OpenMP threads must not spin-wait after its forward
            # on the cores the other's forward needs (session 7: forwards up to 2x slower)
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # inherited by the workers
        split = SMAllocation(args.initial_prefill_sm, args.initial_decode_sm)
        plan = self.plan_for(split)
        init = encode_op(
            "init", weights_shm=self.weights_shm, weights_bytes=weights_bytes, manifest=manifest, config=asdict(cfg)
        )
        for role in ROLES:
            self.links[role] = WorkerLink(role, args, self.kv_shm_name, num_pages, plan[role]["threads"])
        for role in ROLES:  # both pack their weights at the same time
            self.links[role].send(init)
        self.worker_init, self.num_pages = init, num_pages  # for a worker restarted after a crash
        self.restarts = {role: 0 for role in ROLES}
        self.role_of: dict[str, str] = {}  # rid -> the role running it, until it finishes
        tok = load_tokenizer(args.model_path, args.tokenizer_path)
        self.context_length = min(args.context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
        eos = set(cfg.eos_token_ids)
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        alloc = PageAllocator(num_pages, args.page_size)
        self.kv_connector = self._store_connector(args, cfg, dtype, kv)
        self.scheds = {
            role: Scheduler(
                alloc,
                max_running_requests=args.max_running_requests,
                chunked_prefill_size=args.chunked_prefill_size,
                context_length=self.context_length,
                eos_ids=tuple(sorted(eos)),
                disable_radix_cache=True,
                detokenize=lambda ids: tok.decode(ids, skip_special_tokens=False),
                # --kv-store: prefill looks prompts up, loads pages into the unified pool and
                # writes them back; decode continues on those pages (a retraction's re-prefill
                # on the decode worker computes, as a PD decode server does)
                kv_connector=self.kv_connector if role == "prefill" else None,
            )
            for role in ROLES
        }
        self.scheds["prefill"].on_generation_end(self._handover)
        self.scheduler = self.scheds["decode"]  # what the base class reports capacity from
        self.runners = {
            role: ModelRunner(
                RemoteModel(cfg, dtype, self.links[role]),
                num_pages,
                args.page_size,
                kv,
                attention_backend=args.attention_backend,
            )
            for role in ROLES
        }
        self.runner = self.runners["prefill"]
        self.grammar = GrammarBackend(tok, cfg.vocab_size, sorted(eos))
        self.max_new_tokens: dict[str, int] = {}  # rid -> the client's, while prefill runs it with 1
        self.handoffs: list[Req] = []  # held by prefill, to move to decode (under self.lock)
        self.wake = {role: threading.Event() for role in ROLES}
        self.pending_pin: dict[str, dict | None] = {role: None for role in ROLES}
        self.pin_seconds: dict[str, list[float]] = {role: [] for role in ROLES}  # time each re-pin took
        # (worker forward s, whole step s as the resident sees it) of the last steps, per role
        self.step_times: dict[str, collections.deque] = {role: collections.deque(maxlen=512) for role in ROLES}
        # seconds each role has spent in steps, and when its current step began (None: idle):
        # what share a step really had depends on whether the other role was busy meanwhile
        self.busy_total: dict[str, float] = {role: 0.0 for role in ROLES}
        self.busy_since: dict[str, float | None] = {role: None for role in ROLES}
        # core policy `timeshare`: one forward at a time, time divided by the split
        self.gate = (
            StepGate(lambda: (self.split.current.prefill_percentage, self.split.current.decode_percentage))
            if self.policy == "timeshare"
            else None
        )
        self.kv_bytes_per_page = kv.numel() * kv.element_size() // num_pages
        self.dead: str | None = None
        for role in ROLES:
            head, _ = self.links[role].wait("ready")
            self.links[role].pid = int(head["pid"])
        self.metrics = SemiPDMetricsCollector(window_size_seconds=args.slo_window_size)
        self.pending_link: dict[str, WorkerLink | None] = {role: None for role in ROLES}  # rotation
        self.spawns: queue.Queue = queue.Queue()  # worker starts asked of the main thread
        self.split = SPLIT_MECHANISMS[args.semi_pd_switch](self, split)
        if self.gate is not None:  # a starting prefill cap; only a gate makes a forward stall decode
            self.split.set_prefill_cap(initial_prefill_cap())
        self.pin_workers(split, self.split.plan)
        self.split.history.append((time.time(), split, 0.0))
        self.controller: SLOAwareResourceController | None = None
        if args.enable_slo_aware or args.enable_semi_pd_coordinator:
            self.controller = SLOAwareResourceController(
                SLOConstraints(args.slo_ttft_target, args.slo_tpot_target),
                self.metrics,
                self.split,
                settings=ControllerSettings(monitoring_interval_s=args.slo_monitoring_interval),
            )
        logger.info(
            "Semi-PD: KV pool of %d pages in %s shared by the prefill and decode workers; split %s; %s",
            num_pages,
            self.kv_shm_name,
            split,
            self.quota.describe(),
        )

    def _store_connector(self, args: ServerArgs, cfg, dtype: torch.dtype, kv: torch.Tensor):
        """`--kv-store` on the unified pool: the connector copies pages between the store and
        the shared pool in this process; the workers see them through the shared memory."""
        if args.kv_store is None:
            return NoKVConnector()
        from pdserve.engine.kv_connectors import create_kv_connector, store_layout
        from pdserve.model.paths import resolve_model_path

        layout = store_layout(resolve_model_path(args.model_path), cfg, args.page_size, dtype)
        return create_kv_connector(args.kv_store, layout, kv, args.kv_store_timeout)

    def _weights_control(self) -> None:
        return None  # weights calls are refused in handle(): the resident holds no model

    # ---- the prefill -> decode handover -------------------------------------------------
    def _handover(self, req: Req) -> None:
        """Prefill's generation-end hook (inside its update): the request is held with its
        pages; it moves to decode once prefill's outputs of this step are sent."""
        self.handoffs.append(req)

    def _complete_handoffs(self) -> None:
        """Under self.lock, after prefill's outputs went out (so the first token reaches the
        client before anything decode sends for the request)."""
        prefill, decode = self.scheds["prefill"], self.scheds["decode"]
        for req in self.handoffs:
            req.sampling.max_new_tokens = self.max_new_tokens.pop(req.rid, req.sampling.max_new_tokens)
            if req.finish_reason is not None and req.finish_reason.type == FinishReasonType.ABORT:
                prefill.finish_held(req)  # e.g. a grammar rejected the first token
                continue
            prefill.detach_held(req)
            self.role_of[req.rid] = "decode"
            self.metrics.record_first_token(req.rid)
            decode.add_prebuilt(req)  # same Req, same pages: the decode worker reads prefill's KV in place
        if self.handoffs:
            self.handoffs.clear()
            self.wake["decode"].set()

    # ---- stepping threads ---------------------------------------------------------------
    def _stepper(self, role: str) -> None:
        while self.running:
            try:
                self._step(role)
            except WorkerDied as e:
                try:
                    self._recover(role, str(e))
                except Exception as e2:
                    logger.exception("Semi-PD: the %s worker could not be restarted", role)
                    self.dead = f"{e}; restarting it failed: {type(e2).__name__}: {e2}"
                    self.running = False
            except Exception as e:
                logger.exception("Semi-PD %s loop failed", role)
                self.dead = f"{type(e).__name__}: {e}"
                self.running = False

    def plan_for(self, allocation: SMAllocation) -> dict:
        """The share plan (cpu_share.share_plan) of `allocation` on this resident's cores
        under its core policy."""
        return share_plan(allocation.prefill_percentage, allocation.decode_percentage, self.cores, self.policy)

    def _step(self, role: str) -> None:
        new = self.pending_link[role]
        if new is not None:  # rotation: switch between two steps, retire the old worker
            old, self.links[role] = self.links[role], new
            self.runners[role].model.link = new
            self.pending_link[role] = None
            threading.Thread(target=old.close, name=f"semi-pd-retire-{role}", daemon=True).start()
        sched, runner, wake, link = self.scheds[role], self.runners[role], self.wake[role], self.links[role]
        body = self.pending_pin[role]
        if body is not None:  # between two steps: the new share applies from the next one
            self.pending_pin[role] = None
            t0 = time.perf_counter()
            link.pin(body)
            self.pin_seconds[role].append(time.perf_counter() - t0)
        with self.lock:
            plan = sched.schedule(self._token_budget(role))
            if plan is None:
                self._emit(sched.take_outputs())
                if role == "prefill":
                    self._complete_handoffs()
        if plan is None:
            wake.wait(0.05)
            wake.clear()
            return
        other = "decode" if role == "prefill" else "prefill"
        if self.gate is not None:
            self.gate.acquire(role)
        ts = time.perf_counter()  # the step proper, after any wait for the gate
        other_busy0 = self._busy_seconds(other, ts)
        self.busy_since[role] = ts
        try:
            out = runner.run(plan)
        finally:
            t1 = time.perf_counter()
            self.busy_total[role] += t1 - ts
            self.busy_since[role] = None
            if self.gate is not None:
                self.gate.release(role)
        other_busy = (self._busy_seconds(other, t1) - other_busy0) / max(t1 - ts, 1e-9)
        self.step_times[role].append((runner.model.last_seconds, t1 - ts))
        with self.lock:  # outputs are sent in order: prefill's first token before decode's next
            self._emit(sched.update(plan, out))
            if role == "prefill":
                self._complete_handoffs()
        # timed at the share the worker could use: on CPU whole cores and the quota, and under
        # the `weighted` policy its weight while the other role was busy, all cores while idle
        share = step_share(self.split.plan[role], other_busy)  # the plan applied with the split
        if role == "prefill":
            self.metrics.record_prefill_batch(plan.num_tokens, runner.model.last_seconds, share)
        else:
            self.metrics.record_decode_step(plan.num_decode or len(plan.items), runner.model.last_seconds, share)

    def _token_budget(self, role: str) -> int | None:
        """This step's prefill token budget (under self.lock): under the step gate, while decode
        has requests, the controller's prefill cap (a decode step then waits for at most one
        capped forward); otherwise None, whole chunks."""
        if role != "prefill" or self.gate is None or self.split.prefill_cap is None:
            return None
        return self.split.prefill_cap if self.scheds["decode"].has_work() else None

    def _busy_seconds(self, role: str, now: float) -> float:
        """Seconds `role` has spent in steps up to `now` (read without a lock: a float and a
        start time, each written by that role's thread alone)."""
        since = self.busy_since[role]
        return self.busy_total[role] + (max(0.0, now - since) if since is not None else 0.0)

    def _emit(self, outs: list[ReqOut]) -> None:
        """Send outputs to the front end (callers hold self.lock: one order for both roles)."""
        for o in outs:
            if o.finish is not None:
                self.role_of.pop(o.rid, None)
        outs = [o for o in outs if o.rid != WARMUP_RID]
        for o in outs:
            if o.finish is not None:
                if o.finish.type == FinishReasonType.ABORT:
                    self.metrics.record_request_abort(o.rid)
                else:
                    self.metrics.record_request_completion(o.rid, o.completion_tokens)
        if outs:
            with self.send_lock:
                self.send.send(encode(BatchOut(outs)))

    def warmup(self) -> None:
        from pdserve.sampling_params import SamplingParams

        for role in ROLES:
            t = threading.Thread(target=self._stepper, args=(role,), name=f"semi-pd-{role}", daemon=True)
            t.start()
            self.threads.append(t)
        req = Req(WARMUP_RID, [1, 2, 3, 4], SamplingParams(max_new_tokens=2, temperature=0))
        self._add(req)
        deadline = time.monotonic() + 120
        while not req.finished:
            if self.dead or time.monotonic() > deadline:
                raise RuntimeError(f"Semi-PD warm-up failed: {self.dead or 'timed out'}")
            time.sleep(0.01)
        with self.lock:
            for s in self.scheds.values():
                s.reset_stats()
        if self.controller is not None:
            self.controller.start_monitoring()

    def _add(self, req: Req) -> None:
        with self.lock:
            if req.sampling.max_new_tokens > 1:
                self.max_new_tokens[req.rid] = req.sampling.max_new_tokens
                req.sampling.max_new_tokens = 1  # prefill stops at the first token; decode continues
            self.role_of[req.rid] = "prefill"
            self.scheds["prefill"].add_request(req)
        self.wake["prefill"].set()

    # ---- messages from the front end ----------------------------------------------------
    def handle(self, msg) -> None:
        if isinstance(msg, GenerateReq):
            req = Req(msg.rid, msg.input_ids, msg.sampling, msg.return_logprob, msg.top_logprobs_num, msg.arrival_time)
            g = msg.sampling.grammar
            if g is not None:
                try:
                    req.grammar = self.grammar.new_state(*g)
                except ValueError as e:
                    with self.lock:
                        self.scheds["prefill"].fail(
                            req, FinishReason(FinishReasonType.ABORT, message=str(e), status_code=400)
                        )
                    self.wake["prefill"].set()
                    return
            self.metrics.record_request_arrival(msg.rid, len(msg.input_ids))
            self._add(req)
        elif isinstance(msg, AbortReq):
            with self.lock:
                for s in self.scheds.values():
                    s.abort(msg.rid, msg.message)
                self.max_new_tokens.pop(msg.rid, None)
            for e in self.wake.values():
                e.set()
        elif isinstance(msg, GetLoadReq):
            with self.send_lock:
                self.send.send(encode(self.load(msg.call_id)))
        elif isinstance(msg, FlushCacheReq):
            with self.send_lock:
                self.send.send(encode(FlushCacheResp(msg.call_id, True)))  # no prefix cache to flush
        elif isinstance(msg, SemiPDStatusReq):
            with self.send_lock:
                self.send.send(encode(SemiPDResp(msg.call_id, True, self.get_status())))
        elif isinstance(msg, SemiPDReallocateReq):
            try:
                alloc = SMAllocation(msg.prefill_percentage, msg.decode_percentage)
                ok, error = self.split.request_sm_reallocation(alloc), None
            except ValueError as e:
                ok, error = False, str(e)
            with self.send_lock:
                self.send.send(encode(SemiPDResp(msg.call_id, ok, self.get_status(), error)))
        elif isinstance(msg, WEIGHTS_CALLS):
            # RL weight sync / memory release: the weights live in the workers (one shared
            # copy plus each worker's packed copy), which take no updates yet (docs/semi_pd.md)
            with self.send_lock:
                self.send.send(
                    encode(AdminResp(msg.call_id, False, NOT_UNDER_SEMI_PD.format(what=type(msg).__name__), 501))
                )
        elif isinstance(msg, ProfileReq):
            with self.send_lock:
                self.send.send(encode(ProfileResp(msg.call_id, False, NOT_UNDER_SEMI_PD.format(what="profiling"))))
        elif isinstance(msg, ShutdownReq):
            self.running = False
            with self.send_lock:
                self.send.send(encode(ShutdownResp(msg.call_id)))

    def event_loop(self) -> None:
        while self.running:
            self.recv_all(block=True)  # at most 100 ms
            self._serve_spawns()
        if self.dead:
            logger.error("Semi-PD resident stopping: %s", self.dead)

    def close(self) -> None:
        self.running = False
        if getattr(self, "controller", None) is not None:
            self.controller.stop_monitoring()
        for t in getattr(self, "threads", []):
            t.join(timeout=10)
        for link in [*getattr(self, "links", {}).values(), *getattr(self, "pending_link", {}).values()]:
            if link is not None:
                link.close()
        if getattr(self, "quota", None) is not None:
            self.quota.close()
        self.kv_connector.close()  # its writer copies out of the pool: before the pool goes
        self.kv_connector = NoKVConnector()
        for name in (getattr(self, "kv_shm_name", None), getattr(self, "weights_shm", None)):
            if name:
                free_kv_buffer(name)
        super().close()


def main() -> None:
    """`python -m pdserve.semi_pd.resident_process ARGS_JSON RECV SEND` (from the front end)."""
    raw = json.loads(sys.argv[1])
    run_scheduler_process(ServerArgs(**raw), sys.argv[2], sys.argv[3], process_class=ResidentProcess)


if __name__ == "__main__":
    main()
