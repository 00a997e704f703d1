"""The default model's linear shapes: the prepacked float linear (oneDNN, what pdserve runs by
default) against `--quantization w8a8_int8`'s int8_linear (per-row activation scales,
torch._int_mm) and, for reference, fbgemm's `quantized::linear_dynamic` (one activation scale
per batch, which pdserve does not use: results would depend on the batch; see
docs/architecture.md, "int8 linears"). Microseconds per call, on the thread's CPU clock, and
the relative error against the float32 product.

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/bench_int8_linear.py --output bench_out/int8_linear.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

from pdserve.model.linears import int8_linear, pack_weight, packed_linear, quantize_int8  # noqa: E402

# SmolLM2-135M: hidden 576, intermediate 1536; qkv 576 -> 960, o 576 -> 576, gate_up 576 -> 3072, down 1536 -> 576
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}


def cpu_us(fn, reps: int) -> float:
    fn()
    fn()
    t = time.thread_time()
    for _ in range(reps):
        fn()
    return (time.thread_time() - t) / reps * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,16,64,256")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--output", default="bench_out/int8_linear.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread: the CPU clock of this thread is the whole cost
    warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(
        "| linear | rows | float packed (µs) | int8_linear (µs) | speed-up | fbgemm per-batch (µs) | int8 rel. error |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, generator=gen) / k**0.5
        packed = pack_weight(w)
        q8 = quantize_int8(w)
        wq = torch.quantize_per_channel(w, q8[1].double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        fbgemm = torch.ops.quantized.linear_prepack(wq, None)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, generator=gen)
            t_float = cpu_us(lambda: packed_linear(x, packed), args.reps)
            t_int8 = cpu_us(lambda: int8_linear(x, q8), args.reps)
            t_fbgemm = cpu_us(lambda: torch.ops.quantized.linear_dynamic(x, fbgemm, False), args.reps)
            ref = x @ w.T
            err = ((int8_linear(x, q8) - ref).abs().max() / ref.abs().max()).item()
            rows.append(
                {"linear": name, "rows": m, "float_us": t_float, "int8_us": t_int8, "fbgemm_us": t_fbgemm, "error": err}
            )
            print(
                f"| {name} | {m} | {t_float:.0f} | {t_int8:.0f} | {t_float / t_int8:.2f}x | {t_fbgemm:.0f} | {err:.3f} |",
                flush=True,
            )
    write_json(args.output, {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": 1, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
