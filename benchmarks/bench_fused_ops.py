"""Each fused element-wise op (pdserve/model/fused_ops.py) against the torch form it replaces, on
SmolLM2-135M's shapes (hidden 576, intermediate 1536, 9 + 3 heads of 64), per call.

    .venv/bin/python benchmarks/bench_fused_ops.py --output bench_out/fused_ops.json

For rows in --rows (1: single-stream decode, 64: a 64-request decode step, 256: a 256-token
prefill chunk) it times, median of --reps calls: residual add + RMSNorm, SiLU(gate) * up and
RoPE on q and k, each as llama.py's torch form and as the fused op, and whether they agree bitwise. A
fused op slower than its torch form on some machine is a reason not to use it there by default.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

from pdserve.model.fused_ops import CpuFusedOps  # noqa: E402
from pdserve.model.llama import apply_rope, rms_norm  # noqa: E402

HIDDEN, INTER, HQ, HKV, D = 576, 1536, 9, 3, 64


def rope_tables(max_pos: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def median_us(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e6 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,64,256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--output", default="bench_out/fused_ops.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    fo = CpuFusedOps()
    g = torch.Generator().manual_seed(0)
    cos, sin = (t.to(dtype) for t in rope_tables(2048))
    w = (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(dtype)
    results = []
    print(f"{'op':<14} {'rows':>5} {'torch us':>9} {'fused us':>9} {'torch/fused':>8}")
    for rows in (int(r) for r in a.rows.split(",")):
        h0 = torch.randn(rows, HIDDEN, generator=g).to(dtype)
        res = torch.randn(rows, HIDDEN, generator=g).to(dtype)
        gu = (4 * torch.randn(rows, 2 * INTER, generator=g)).to(dtype)
        qkv0 = torch.randn(rows, (HQ + 2 * HKV) * D, generator=g).to(dtype)
        pos = torch.randint(0, 2048, (rows,), generator=g)
        h = h0.clone()
        qkv = qkv0.clone()

        def norm_torch():
            h.add_(res)
            return rms_norm(h, w, 1e-5)

        def silu_torch():
            act = F.silu(gu[:, :INTER])
            act *= gu[:, INTER:]
            return act

        def rope_torch():
            c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
            return apply_rope(qkv[:, : (HQ + HKV) * D].view(rows, HQ + HKV, D), c, s)

        cases = {
            "add_rms_norm": (norm_torch, lambda: fo.add_rms_norm(h, res, w, 1e-5)),
            "silu_mul": (silu_torch, lambda: fo.silu_mul(gu)),
            "rope_qk": (rope_torch, lambda: fo.rope_qk_(qkv, pos, cos, sin, HQ + HKV)),
        }
        # agreement (bitwise or not): one call of each form from the same inputs
        h.copy_(h0)
        ref = norm_torch()
        h.copy_(h0)
        same = {"add_rms_norm": torch.equal(fo.add_rms_norm(h, res, w, 1e-5), ref)}
        same["silu_mul"] = torch.equal(fo.silu_mul(gu), silu_torch())
        ref = rope_torch().reshape(rows, -1)
        fo.rope_qk_(qkv, pos, cos, sin, HQ + HKV)
        same["rope_qk"] = torch.equal(qkv[:, : (HQ + HKV) * D], ref)
        for name, (tf, ff) in cases.items():
            h.copy_(h0)
            qkv.copy_(qkv0)
            t_torch = median_us(tf, a.reps)
            h.copy_(h0)
            qkv.copy_(qkv0)
            t_fused = median_us(ff, a.reps)
            results.append({"op": name, "rows": rows, "torch_us": t_torch, "fused_us": t_fused, "bitwise": same[name]})
            print(
                f"{name:<14} {rows:5d} {t_torch:9.1f} {t_fused:9.1f} {t_torch / t_fused:7.2f}x"
                + ("" if same[name] else "  (not bitwise the torch form)")
            )
    write_json(
        a.output,
        {
            "machine": platform.processor() or platform.machine(),
            "threads": a.threads,
            "dtype": a.dtype,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
