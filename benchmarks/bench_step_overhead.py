"""The scheduler's own work per step, without the model: plans and CPU time.

Replays one fixed workload (short and long prompts arriving at fixed step numbers, greedy,
fixed output lengths) through a real `SchedulerProcess` whose model forward is replaced by
seeded random logits, so a step costs only what the engine adds around the model: admission
and planning (`schedule`), building the batch and sampling (`runner.run` minus the fake
forward), bookkeeping (`update`) and encoding the outputs for the front end. It prints the
per-step CPU time of each part (this thread's CPU clock, so other work on the box barely
moves it) and a digest of every plan (which request, which positions), which must be equal
between two trees whose scheduling is meant to be the same.

It uses only calls that every version of the engine has (`SchedulerProcess`,
`Scheduler.add_request/schedule/update`, `ModelRunner.run`), so it runs against an older
checkout too:

    cd /tmp/before && PYTHONPATH=/tmp/before /work/main/.venv/bin/python \
        /work/main/benchmarks/bench_step_overhead.py --output /tmp/before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import tempfile
import time

import torch

from pdserve.config import ServerArgs
from pdserve.engine.request import Req
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler_process import SchedulerProcess
from pdserve.messages import BatchOut, encode


def workload(rep: int, num_requests: int, vocab: int) -> list[tuple[int, Req]]:
    """(arrival step, request): 128-token prompts, every eighth 1024 tokens, one every 3 steps."""
    rng = random.Random(rep)
    out = []
    for i in range(num_requests):
        n = 1024 if i % 8 == 4 else 128
        ids = [rng.randrange(100, vocab) for _ in range(n)]
        params = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
        out.append((3 * i, Req(f"r{rep}-{i}", ids, params)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="pdserve-overhead-")
    proc = SchedulerProcess(ServerArgs(max_total_tokens=65536), f"ipc://{tmp}/in", f"ipc://{tmp}/out")
    scheduler, runner = proc.scheduler, proc.runner
    vocab = runner.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    fake_ns = [0]

    def fake_forward(batch, attn):
        t0 = time.thread_time_ns()
        logits = torch.randn(len(batch.logits_indices), vocab, generator=gen)
        fake_ns[0] += time.thread_time_ns() - t0
        return logits

    runner.model.forward = fake_forward
    parts: dict[str, list[float]] = {"schedule": [], "run_minus_forward": [], "update": [], "encode": []}
    digest = hashlib.sha256()
    steps = 0

    def has_work() -> bool:  # a method now, a property in older trees
        value = scheduler.has_work
        return value() if callable(value) else value

    for rep in range(args.reps):
        arrivals = workload(rep, args.num_requests, vocab)
        step = 0
        while arrivals or has_work():
            while arrivals and arrivals[0][0] <= step:
                scheduler.add_request(arrivals.pop(0)[1])
            step += 1
            t0 = time.thread_time_ns()
            plan = scheduler.schedule()
            t1 = time.thread_time_ns()
            if plan is None:
                continue
            fake_ns[0] = 0
            out = runner.run(plan)
            t2 = time.thread_time_ns()
            outs = scheduler.update(plan, out)
            t3 = time.thread_time_ns()
            encode(BatchOut(outs))
            t4 = time.thread_time_ns()
            parts["schedule"].append((t1 - t0) / 1e3)
            parts["run_minus_forward"].append((t2 - t1 - fake_ns[0]) / 1e3)
            parts["update"].append((t3 - t2) / 1e3)
            parts["encode"].append((t4 - t3) / 1e3)
            digest.update(repr([(it.req.rid, it.start, it.n) for it in plan.items]).encode())
            digest.update(repr(list(out.next_ids)).encode())
            steps += 1
    proc.close()
    result = {
        "tree": os.environ.get("PYTHONPATH", ""),
        "steps": steps,
        "plan_digest": digest.hexdigest()[:16],
        "median_us": {k: statistics.median(v) for k, v in parts.items()},
        "mean_us": {k: statistics.fmean(v) for k, v in parts.items()},
    }
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
