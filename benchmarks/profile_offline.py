"""In-process profile of the offline workload (N requests of 256 prompt / 128 output
tokens, ignore EOS): the scheduler and model runner without HTTP, timing mixed
(prefill + decode) steps apart from pure decode steps, optionally under torch.profiler.

    .venv/bin/python benchmarks/profile_offline.py                 # 64 requests
    .venv/bin/python benchmarks/profile_offline.py --prof          # + top ops by self CPU time
    .venv/bin/python benchmarks/profile_offline.py --num-prompts 1 # single stream
    # per-op self CPU ms per step of one kind only (--prof-steps N steps of it):
    .venv/bin/python benchmarks/profile_offline.py --num-prompts 8 --output-len 1 \
        --chunked-prefill-size 256 --prof-only mixed --prof-steps 8      # 256-token prefills
    .venv/bin/python benchmarks/profile_offline.py --output-len 24 --prof-only decode --prof-steps 16

Prints one line (and the op table with --prof); not a figure of record: bench_engine.py is.
"""

from __future__ import annotations

import argparse
import os
import sys
import random
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

from pdserve.config import ServerArgs
from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.model_loading import load_model, set_threads
from pdserve.engine.request import Req
from pdserve.engine.runner import ModelRunner
from pdserve.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--chunked-prefill-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--w4-decode-max-tokens", type=int, default=8)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--no-fused-ops", action="store_true", help="torch's element-wise ops (cpu_paged attention kept)")
    ap.add_argument("--prof", action="store_true")
    ap.add_argument("--prof-only", choices=["mixed", "decode"], help="profile only steps of this kind")
    ap.add_argument("--prof-steps", type=int, default=8, help="with --prof-only: how many of them")
    ap.add_argument("--json", help="with --prof-only: write the per-step op table here")
    a = ap.parse_args()
    args = ServerArgs(
        dtype="auto",
        num_threads=a.threads,
        chunked_prefill_size=a.chunked_prefill_size,
        w4_decode_max_tokens=a.w4_decode_max_tokens,
        attention_backend=a.attention_backend,
        quantization=a.quantization,
    )
    set_threads(args)
    model = load_model(args)
    ps, pages = 16, 65536 // 16
    runner = ModelRunner(model, pages, ps, attention_backend=args.attention_backend)
    if a.no_fused_ops:
        model.use_fused_ops(False)
    s = Scheduler(
        PageAllocator(pages, ps),
        max_running_requests=64,
        chunked_prefill_size=a.chunked_prefill_size,
        context_length=8192,
        eos_ids=(2,),
        disable_radix_cache=True,
        detokenize=lambda ids: "",
    )
    rng = random.Random(0)
    for i in range(a.num_prompts):
        sp = SamplingParams(max_new_tokens=a.output_len, ignore_eos=True, temperature=0.0)
        s.add_request(Req(f"r{i}", [rng.randrange(100, 40000) for _ in range(a.input_len)], sp))
    prof = torch.profiler.profile() if a.prof and not a.prof_only else None
    per_op: dict[str, list[float]] = {}  # --prof-only: op -> [self CPU us, calls]
    n_prof = 0
    t_prof = 0.0
    if prof:
        prof.__enter__()
    t0 = time.perf_counter()
    t_mixed = t_dec = 0.0
    n_steps = n_mixed = 0
    while s.has_work():
        plan = s.schedule()
        if plan is None:
            break
        kind = "decode" if plan.num_decode == len(plan.items) else "mixed"
        step_prof = None
        if a.prof_only == kind and n_prof < a.prof_steps:
            step_prof = torch.profiler.profile()
            step_prof.__enter__()
        t = time.perf_counter()
        s.update(plan, runner.run(plan))
        dt = time.perf_counter() - t
        if step_prof is not None:
            step_prof.__exit__(None, None, None)
            n_prof += 1
            t_prof += dt
            for ev in step_prof.key_averages():
                acc = per_op.setdefault(ev.key, [0.0, 0])
                acc[0] += ev.self_cpu_time_total
                acc[1] += ev.count
        if plan.num_decode == len(plan.items):
            t_dec += dt
        else:
            t_mixed += dt
            n_mixed += 1
        n_steps += 1
    el = time.perf_counter() - t0
    if prof:
        prof.__exit__(None, None, None)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if a.prof_only:
        rows = sorted(per_op.items(), key=lambda kv: -kv[1][0])
        total = sum(v[0] for v in per_op.values())
        print(
            f"{n_prof} {a.prof_only} steps profiled: {1e3 * t_prof / max(n_prof, 1):.1f} ms wall per step, "
            f"{total / 1e3 / max(n_prof, 1):.1f} ms self CPU per step (all threads' ops)"
        )
        print(f"{'op':<44} {'ms/step':>8} {'calls/step':>10}")
        for name, (us, calls) in rows[:25]:
            print(f"{name[:44]:<44} {us / 1e3 / n_prof:8.2f} {calls / n_prof:10.1f}")
        if a.json:
            write_json(
                a.json,
                {
                    "kind": a.prof_only,
                    "steps": n_prof,
                    "wall_ms_per_step": 1e3 * t_prof / max(n_prof, 1),
                    "self_cpu_ms_per_step": {k: v[0] / 1e3 / n_prof for k, v in rows},
                    "args": vars(a),
                },
            )
    print(
        f"{a.num_prompts} requests: {el:.2f} s, {a.num_prompts * a.output_len / el:.1f} output tok/s; "
        f"{n_steps} steps, {n_mixed} with prefill ({t_mixed:.2f} s), pure decode {t_dec:.2f} s"
    )


if __name__ == "__main__":
    main()
