"""What sending the KV per prefill chunk (#12) saves, without the noise of whole servers:
the prefill and decode schedulers with their PD queues in one process, on a real transfer
pair (tcp or shm), the default model's KV layout, and a runner that computes for a set time
per token on the torch threads (matmuls: it competes for the cores as a forward does) and
writes each chunk's KV slots into the prefill pool. Per request it times

- tail: from the end of the prompt's last forward (first token) to decode's receiver
  reaching Success: the transfer the client waits for after the prefill;
- total: from submitting to decode's Success (the PD part of TTFT, bootstrap included).

Each prompt length runs with the KV sent per chunk (`PrefillDisagg(send_per_chunk=True)`,
the default) and after the last chunk (`False`, the code before #12), alternating.

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/bench_pd_overlap.py \\
        --backend tcp --output bench_out/pd_overlap_tcp.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

from pdserve.disagg.decode import DecodeDisagg  # noqa: E402
from pdserve.disagg.mode import DisaggregationMode  # noqa: E402
from pdserve.disagg.poll import KVPoll  # noqa: E402
from pdserve.disagg.prefill import PrefillDisagg  # noqa: E402
from pdserve.disagg.transfer.base import KVArgs  # noqa: E402
from pdserve.disagg.transfer.bootstrap import KVBootstrapServer  # noqa: E402
from pdserve.disagg.transfer.registry import KVClassType, TransferBackend, get_kv_class  # noqa: E402
from pdserve.engine.kv_pool import PageAllocator  # noqa: E402
from pdserve.engine.request import Req  # noqa: E402
from pdserve.engine.plan import RunOutput  # noqa: E402
from pdserve.engine.scheduler import Scheduler  # noqa: E402
from pdserve.engine.shm_segment import allocate_kv_buffer, free_kv_buffer, new_shm_name  # noqa: E402
from pdserve.sampling_params import SamplingParams  # noqa: E402

# SmolLM2-135M: 30 layers, 3 KV heads of 64; pages of 16 tokens
LAYERS, HEADS, HEAD_DIM, PAGE = 30, 3, 64, 16


class ComputeRunner:
    """Busy for `ms_per_token` per computed token (matmuls on the torch threads), then writes
    the computed tokens' KV slots, as a forward does; records when a sampling forward ended."""

    def __init__(self, kv: torch.Tensor | None, ms_per_token: float) -> None:
        self.kv = kv
        self.ms_per_token = ms_per_token
        self.a, self.b = torch.randn(256, 576), torch.randn(576, 576)
        self.sampled_at: float | None = None

    def run(self, plan) -> RunOutput:
        deadline = time.perf_counter() + self.ms_per_token * plan.num_tokens / 1000
        while time.perf_counter() < deadline:
            torch.mm(self.a, self.b)
        if self.kv is not None:
            for it in plan.items:
                lo, hi = it.start, it.start + it.n
                for p in range(lo // PAGE, -(-hi // PAGE)):
                    s0, s1 = max(lo, p * PAGE) - p * PAGE, min(hi, (p + 1) * PAGE) - p * PAGE
                    self.kv[it.req.pages[p], :, :, s0:s1] = float(p % 97)
        if any(it.sample for it in plan.items):
            self.sampled_at = time.perf_counter()
        return RunOutput([11 for it in plan.items if it.sample])


def manager(backend: str, mode: DisaggregationMode, num_pages: int, bootstrap_port: int, dtype: torch.dtype):
    shape = (num_pages, LAYERS, 2, PAGE, HEADS, HEAD_DIM)
    shm_name = None
    if backend == "shm" and mode == DisaggregationMode.DECODE:
        shm_name = new_shm_name()
        kv = allocate_kv_buffer(shape, dtype, shm_name)
    else:
        kv = torch.empty(shape, dtype=dtype)
    kv.fill_(0)  # prefault: first writes to fresh memory cost ~2.8 s/GB here (docs/architecture.md)
    args = KVArgs(engine_rank=0, kv_data=kv, bootstrap_port=bootstrap_port, shm_name=shm_name)
    return get_kv_class(backend, KVClassType.MANAGER)(args, mode)


def one_request(pq, ps, dq, ds, prunner, drunner, n_tok: int, room: int, bs_port: int) -> dict:
    reqs = []
    t0 = time.perf_counter()
    for q in (pq, dq):
        r = Req(
            f"r{room}", [(room * 7919 + j * 31) % 40000 + 100 for j in range(n_tok)], SamplingParams(max_new_tokens=1)
        )
        r.bootstrap_host, r.bootstrap_port, r.bootstrap_room = "127.0.0.1", bs_port, room
        q.add(r)
        reqs.append(r)
    prunner.sampled_at = None
    ready = None
    while ready is None:
        pq.step()
        ps.step(prunner.run)
        dq.step()
        ds.step(drunner.run)
        rx = reqs[1].kv_receiver
        if rx is not None and rx.poll() == KVPoll.Success:
            ready = time.perf_counter()
        elif reqs[1].finished or reqs[0].finished and reqs[0].finish_reason.type == "abort":
            raise RuntimeError(f"request failed: {reqs[0].finish_reason} / {reqs[1].finish_reason}")
        else:
            time.sleep(0.0002)
    while ps.has_work() or pq.has_work() or ds.has_work() or dq.has_work():  # drain, free the pages
        pq.step()
        ps.step(prunner.run)
        dq.step()
        ds.step(drunner.run)
        time.sleep(0.0002)
    assert prunner.sampled_at is not None
    return {"total_ms": (ready - t0) * 1000, "tail_ms": (ready - prunner.sampled_at) * 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="tcp", choices=("tcp", "shm"))
    ap.add_argument("--prompt-lens", type=lambda v: [int(x) for x in v.split(",")], default=[256, 2048, 4096])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=512, help="--chunked-prefill-size")
    ap.add_argument(
        "--ms-per-token", type=float, default=2.0, help="prefill compute (co-located 4096 tokens: ~2.1 ms/token here)"
    )
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--output", default="bench_out/pd_overlap.json")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    num_pages = max(a.prompt_lens) // PAGE + 8
    bs = KVBootstrapServer("127.0.0.1", 0)
    pm = manager(a.backend, DisaggregationMode.PREFILL, num_pages, bs.port, dtype)
    dm = manager(a.backend, DisaggregationMode.DECODE, num_pages, bs.port, dtype)
    assert pm.wait_registered(10)
    b = TransferBackend(a.backend)
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "loadavg_start": os.getloadavg(),
        "args": vars(a),
        "page_nbytes": pm.args.page_nbytes,
        "runs": {},
    }
    room = 1
    try:
        for rep in range(a.reps + 1):  # rep 0 warms up
            for n_tok in a.prompt_lens:
                modes = ("per_chunk", "after_prompt") if rep % 2 == 0 else ("after_prompt", "per_chunk")
                for mode in modes:

                    def sched(chunk: int) -> Scheduler:
                        return Scheduler(
                            PageAllocator(num_pages, PAGE),
                            max_running_requests=4,
                            chunked_prefill_size=chunk,
                            context_length=max(a.prompt_lens) + 16,
                            eos_ids=(2,),
                            disable_radix_cache=True,
                        )

                    ps, ds = sched(a.chunk), sched(a.chunk)
                    pq = PrefillDisagg(ps, pm, b, bs.port, send_per_chunk=mode == "per_chunk")
                    dq = DecodeDisagg(ds, dm, b, bs.port)
                    prunner, drunner = ComputeRunner(pm.args.kv_data, a.ms_per_token), ComputeRunner(None, 0.0)
                    r = one_request(pq, ps, dq, ds, prunner, drunner, n_tok, room, bs.port)
                    room += 1
                    if rep:
                        res["runs"].setdefault(str(n_tok), {}).setdefault(mode, []).append(r)
            print(f"round {rep} done", flush=True)
    finally:
        pm.shutdown()
        dm.shutdown()
        bs.close()
        if dm.args.shm_name:
            free_kv_buffer(dm.args.shm_name)
    res["loadavg_end"] = os.getloadavg()
    print(
        f"\n{a.backend}, {a.dtype} KV ({pm.args.page_nbytes / 2**20:.2f} MiB per 16-token page), chunks of "
        f"{a.chunk}, {a.ms_per_token} ms/token of compute, median of {a.reps}"
    )
    print(f"{'prompt':>7} {'KV MB':>7} {'mode':<13} {'tail ms':>8} {'total ms':>9}")
    res["summary"] = {}
    for n_tok, modes in res["runs"].items():
        mb = -(-int(n_tok) // PAGE) * pm.args.page_nbytes / 1e6
        for mode, rs in modes.items():
            tail = statistics.median(x["tail_ms"] for x in rs)
            total = statistics.median(x["total_ms"] for x in rs)
            res["summary"].setdefault(n_tok, {})[mode] = {"tail_ms": tail, "total_ms": total, "kv_mb": mb}
            print(f"{n_tok:>7} {mb:>7.1f} {mode:<13} {tail:>8.1f} {total:>9.1f}")
    print(f"load average: start {res['loadavg_start']}, end {res['loadavg_end']}")
    write_json(a.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
