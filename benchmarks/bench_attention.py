"""Decode attention per layer, each attention backend on the same random paged pool (issue #12).

    .venv/bin/python benchmarks/bench_attention.py --output bench_out/attention.json

SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head_dim 64, 30 layers in the
pool), page size 16, pages of each request scattered over the pool. For every (batch,
context) it times one layer's decode attention call (K/V write + attention) per backend,
median of --reps, and checks the outputs agree. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

from pdserve.model.attention import ForwardBatch  # noqa: E402
from pdserve.model.attention_backends import create_attention_backend  # noqa: E402

HQ, HKV, D, LAYERS, PS = 9, 3, 64, 30, 16


def decode_batch(b: int, ctx: int, num_pages: int, g: torch.Generator) -> ForwardBatch:
    npg = -(-ctx // PS)
    perm = torch.randperm(num_pages - 1, generator=g)[: b * npg] + 1
    table = perm.view(b, npg)
    pos = torch.full((b,), ctx - 1, dtype=torch.long)
    return ForwardBatch(
        input_ids=torch.zeros(b, dtype=torch.long),
        positions=pos,
        write_pages=table[:, (ctx - 1) // PS].contiguous(),
        write_offs=pos % PS,
        num_decode=b,
        dec_table=table,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default="bench_out/attention.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--backends", default="torch_native,cpu_paged")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = [(1, 128), (1, 1024), (8, 320), (32, 320), (64, 320)]
    num_pages = 64 * 21 + 8
    g = torch.Generator().manual_seed(0)
    kv = (torch.randn(num_pages, LAYERS, 2, PS, HKV, D, generator=g) * 0.5).to(dtype)
    backends = {name: create_attention_backend(name, kv) for name in args.backends.split(",")}
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "rows": [],
    }
    print(f"{'batch':>5} {'context':>7} " + " ".join(f"{n + ' ms':>16}" for n in backends) + "   max |diff|")
    for b, ctx in shapes:
        fb0 = decode_batch(b, ctx, num_pages, g)
        q = torch.randn(b, HQ, D, generator=g).to(dtype)
        k = torch.randn(b, HKV, D, generator=g).to(dtype)
        v = torch.randn(b, HKV, D, generator=g).to(dtype)
        row: dict = {"batch": b, "context": ctx, "ms": {}}
        outs = {}
        for name, be in backends.items():
            times = []
            for _ in range(args.reps):
                fb = ForwardBatch(
                    **{
                        f: getattr(fb0, f)
                        for f in ("input_ids", "positions", "write_pages", "write_offs", "num_decode", "dec_table")
                    }
                )
                t = time.perf_counter()
                outs[name] = be(LAYERS // 2, q, k, v, fb)
                times.append(time.perf_counter() - t)
            row["ms"][name] = statistics.median(times) * 1000
        ref = next(iter(outs.values())).float()
        row["max_abs_diff"] = max((o.float() - ref).abs().max().item() for o in outs.values())
        res["rows"].append(row)
        print(f"{b:5} {ctx:7} " + " ".join(f"{row['ms'][n]:16.3f}" for n in backends) + f"   {row['max_abs_diff']:.2e}")
    write_json(args.output, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
