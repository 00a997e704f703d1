"""Heap and RSS growth of one process running the default model's four linear shapes at every
row count 1..--max-rows (issue #10): oneDNN's prepacked linear (`torch.ops.mkldnn.
_linear_pointwise`, what pdserve ran before the fix), the same with row counts padded
(`packed_linear`, what it runs now), plain `F.linear`, and SDPA.

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/linear_shapes_rss.py packed-raw
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pdserve.engine.memdebug import mallinfo, rss_bytes  # noqa: E402
from pdserve.model.linears import pack_weight, packed_linear  # noqa: E402

SHAPES = [(1728, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2-135M: qkv, o, gate_up, down


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["packed-raw", "packed-padded", "flinear", "sdpa"])
    ap.add_argument("--max-rows", type=int, default=400)
    ap.add_argument("--every", type=int, default=50)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ws = [torch.randn(n, k) for n, k in SHAPES]
    packed = [pack_weight(w) for w in ws]
    in_use = lambda: mallinfo().get("in_use_bytes", 0) / 2**20  # noqa: E731
    base, r0 = in_use(), rss_bytes() / 2**20
    for m in range(1, a.max_rows + 1):
        if a.mode == "packed-raw":
            for w, p in zip(ws, packed):
                torch.ops.mkldnn._linear_pointwise(torch.randn(m, w.shape[1]), p, None, "none", [], "")
        elif a.mode == "packed-padded":
            for w, p in zip(ws, packed):
                packed_linear(torch.randn(m, w.shape[1]), p)
        elif a.mode == "flinear":
            for w in ws:
                F.linear(torch.randn(m, w.shape[1]), w)
        else:
            q, k = torch.randn(1, 9, m, 64), torch.randn(1, 3, m, 64)
            F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        if m % a.every == 0:
            print(
                f"{a.mode} rows 1..{m}: malloc in use {in_use() - base:+.1f} MiB, "
                f"RSS {rss_bytes() / 2**20 - r0:+.1f} MiB",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
