"""Tensor parallelism on this machine (--tp-size), one run:

  1. all-reduce latency between 2 ranks: the shared-memory all-reduce pdserve uses vs gloo's
     (torch.distributed), for a decode step's [1, 576], a batch's [64, 576] and a prefill
     chunk's [256, 576];
  2. per configuration (tp 1; tp 2 with the shm all-reduce; tp 2 with gloo's), a `pdserve
     serve` on the same cores: single-stream decode tok/s, TTFT of a 256-token prompt, and
     throughput of 32 concurrent requests (256 in / 64 out);
  3. bf16 greedy agreement of tp 2 with tp 1: tokens until the first difference, 8 prompts.

    .venv/bin/python benchmarks/bench_tp.py --output bench_out/tp.json

Prints a table and writes JSON. Servers listen on 127.0.0.1 and are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import httpx
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    batch_output_tok_s,
    free_port,
    single_stream_decode_tok_s,
    stop_server,  # noqa: E402
    ttft_256_ms,
    write_json,
)

from pdserve.launch.cli import wait_healthy  # noqa: E402

SHAPES = ((1, 576), (64, 576), (256, 576))
PROMPTS = [
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity to a child.",
    "What is the capital of France?",
    "Give me a recipe for pancakes.",
    "Who wrote Hamlet?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
]


def _allreduce_child(rank: int, kind: str, port: int, shm: str, reps: int) -> None:
    """Runs in a child process: time `reps` all-reduces per shape, rank 0 prints JSON."""
    from pdserve.engine.shm_segment import SegmentMaps
    from pdserve.engine.tp import GlooAllReduce, ShmAllReduce, init_gloo

    torch.set_num_threads(1)
    init_gloo(rank, 2, port)
    buf = SegmentMaps().get(shm, (ShmAllReduce.nbytes(2),), torch.uint8)
    ar = GlooAllReduce() if kind == "gloo" else ShmAllReduce(buf, rank, 2, lambda: None)
    out = {}
    for shape in SHAPES:
        x = torch.ones(shape, dtype=torch.bfloat16)
        for _ in range(10):
            ar(x)
            x.fill_(1)
        torch.distributed.barrier()
        t = time.perf_counter()
        for _ in range(reps):
            ar(x)
            x.fill_(1)
        out[f"{shape[0]}x{shape[1]}"] = (time.perf_counter() - t) / reps * 1e6
    if rank == 0:
        print(json.dumps(out), flush=True)
    torch.distributed.destroy_process_group()


def allreduce_latency(kind: str, reps: int) -> dict:
    from pdserve.engine.shm_segment import allocate_kv_buffer, free_kv_buffer, new_shm_name
    from pdserve.engine.tp import ShmAllReduce

    name = new_shm_name()
    allocate_kv_buffer((ShmAllReduce.nbytes(2),), torch.uint8, name)
    port = free_port()
    code = "import sys; sys.path.insert(0, %r); from bench_tp import _allreduce_child as f; f(%%d, %r, %d, %r, %d)" % (
        os.path.dirname(os.path.abspath(__file__)),
        kind,
        port,
        name,
        reps,
    )
    try:
        procs = [
            subprocess.Popen([sys.executable, "-c", code % r], stdout=subprocess.PIPE, text=True) for r in range(2)
        ]
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        free_kv_buffer(name)
    return json.loads(outs[0].strip().splitlines()[-1])


def serve(args, tp: int, kind: str):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PDSERVE_TP_ALLREDUCE": kind}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdserve.cli",
            "serve",
            "--port",
            str(port),
            "--dtype",
            args.dtype,
            "--num-threads",
            str(args.threads),
            "--max-total-tokens",
            "32768",
            "--tp-size",
            str(tp),
            "--log-level",
            "warning",
        ],
        start_new_session=True,
        env=env,
    )
    wait_healthy(url, proc, time.time() + 300)
    return url, proc


def measure(url: str) -> dict:
    return {
        "single_stream_decode_tok_s": single_stream_decode_tok_s(url),
        "ttft_256_ms": ttft_256_ms(url),
        "batch_32x256x64_output_tok_s": batch_output_tok_s(url, 32, 256, 64)[0],
    }


def greedy(url: str) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        text = f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
        r = httpx.post(
            url + "/generate",
            json={"text": text, "sampling_params": {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True}},
            timeout=300,
        ).json()
        out.append(r["output_ids"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default="bench_out/tp.json")
    ap.add_argument("--threads", type=int, default=2, help="cores of the server (split over its ranks)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "allreduce_us": {},
        "serve": {},
    }
    configs = [(1, "shm"), (2, "shm"), (2, "gloo")]
    bar = tqdm(total=2 + len(configs), desc="bench_tp")
    for kind in ("shm", "gloo"):
        res["allreduce_us"][kind] = allreduce_latency(kind, args.reps if kind == "shm" else args.reps // 10)
        bar.update()
    ids = {}
    for tp, kind in configs:
        url, proc = serve(args, tp, kind)
        try:
            res["serve"][f"tp{tp}-{kind}" if tp > 1 else "tp1"] = measure(url)
            if kind == "shm":
                ids[tp] = greedy(url)
        finally:
            stop_server(proc)
        bar.update()
    bar.close()
    agree = []
    for a, b in zip(ids[1], ids[2]):
        agree.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    res["bf16_tp2_vs_tp1_tokens_until_first_difference"] = agree

    print(f"\nall-reduce between 2 ranks, bf16, microseconds per call ({res['date']})")
    print(f"{'shape':<12}{'shm':>10}{'gloo':>10}")
    for shape in res["allreduce_us"]["shm"]:
        print(f"{shape:<12}{res['allreduce_us']['shm'][shape]:>10.1f}{res['allreduce_us']['gloo'][shape]:>10.1f}")
    print(f"\n{'config':<12}{'decode tok/s':>14}{'TTFT256 ms':>12}{'32x256x64 tok/s':>17}")
    for name, r in res["serve"].items():
        print(
            f"{name:<12}{r['single_stream_decode_tok_s']:>14.1f}{r['ttft_256_ms']:>12.1f}"
            f"{r['batch_32x256x64_output_tok_s']:>17.1f}"
        )
    print(f"\nbf16 greedy, tp2 vs tp1, tokens until the first difference (of 64): {agree}")
    write_json(args.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
