"""Forward-pass time per dtype and RMSNorm form, measured side by side in one process
(rounds interleaved, so the machine's drift hits every variant alike):

    .venv/bin/python benchmarks/bench_dtype.py --output bench_out/dtype.json

Variants: float32; bfloat16 with transformers' RMSNorm rounding (what pdserve runs); bfloat16
with torch's fused `F.rms_norm` (what pdserve ran before the bf16 agreement fix); each bf16 one
with and without the 4-bit decode path. Shapes: a 256-token prefill, and decode steps of
1 and 32 requests with 256 tokens of context. Prints median milliseconds per forward and
writes JSON. Tells whether this CPU has native bf16 (AMX / AVX512-BF16).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

import pdserve.model.llama as llama  # noqa: E402
from pdserve.engine.model_loading import auto_dtype, cpu_has_native_bf16  # noqa: E402
from pdserve.engine.runner import ModelRunner  # noqa: E402
from pdserve.model.attention import ExtendSeq, ForwardBatch  # noqa: E402
from pdserve.model.loader import load_model_files  # noqa: E402
from pdserve.model.paths import default_model_path  # noqa: E402

PAGE = 16
CTX = 256


def fused_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def prefill_batch(n: int) -> ForwardBatch:
    pos = torch.arange(n)
    return ForwardBatch(
        input_ids=torch.randint(100, 20000, (n,)),
        positions=pos,
        write_pages=pos // PAGE,
        write_offs=pos % PAGE,
        extends=[ExtendSeq(0, n, 0, None, None)],
        logits_indices=torch.tensor([n - 1]),
    )


def decode_batch(b: int) -> ForwardBatch:
    npg = CTX // PAGE + 1
    table = torch.arange(b * npg).view(b, npg)
    pos = torch.full((b,), CTX)
    mask = torch.zeros(b, 1, npg * PAGE)
    mask[:, :, CTX + 1 :] = float("-inf")
    return ForwardBatch(
        input_ids=torch.randint(100, 20000, (b,)),
        positions=pos,
        write_pages=table[:, CTX // PAGE],
        write_offs=pos % PAGE,
        num_decode=b,
        dec_table=table,
        dec_mask=mask,
        logits_indices=torch.arange(b),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="bench_out/dtype.json")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, state = load_model_files(default_model_path())
    variants = {  # name -> (dtype, 4-bit decode max tokens, norm)
        "float32": (torch.float32, 0, llama.rms_norm),
        "bf16, transformers norm": (torch.bfloat16, 0, llama.rms_norm),
        "bf16, fused norm (before)": (torch.bfloat16, 0, fused_rms_norm),
        "bf16 + 4-bit decode, transformers norm": (torch.bfloat16, 8, llama.rms_norm),
        "bf16 + 4-bit decode, fused norm (before)": (torch.bfloat16, 8, fused_rms_norm),
    }
    shapes = {
        "prefill 256": lambda: prefill_batch(256),
        "decode x1": lambda: decode_batch(1),
        "decode x32": lambda: decode_batch(32),
    }
    runners = {}
    for name, (dt, q4, _) in tqdm(variants.items(), desc="loading"):
        m = llama.LlamaModel(cfg, dt, q4)
        m.load_weights(state)
        runners[name] = ModelRunner(m, 32 * (CTX // PAGE + 1) + 1, PAGE)
    times: dict[str, dict[str, list[float]]] = {v: {s: [] for s in shapes} for v in variants}
    real_norm = llama.rms_norm
    try:
        for _ in tqdm(range(args.rounds), desc="rounds (variants interleaved)"):
            for sname, make in shapes.items():
                for vname, (_, _, norm) in variants.items():
                    llama.rms_norm = norm
                    r = runners[vname]
                    batch = make()
                    r.model.forward(batch, r.attn)  # warm this shape
                    batch = make()
                    t = time.perf_counter()
                    r.model.forward(batch, r.attn)
                    times[vname][sname].append((time.perf_counter() - t) * 1e3)
    finally:
        llama.rms_norm = real_norm
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "native_bf16": cpu_has_native_bf16(),
        "auto_dtype": str(auto_dtype()).removeprefix("torch."),
        "threads": args.threads,
        "rounds": args.rounds,
        "median_ms": {v: {s: round(statistics.median(x), 2) for s, x in d.items()} for v, d in times.items()},
    }
    print(f"\nnative bf16: {res['native_bf16']}; --dtype auto = {res['auto_dtype']}; median ms per forward")
    print(f"{'variant':44}" + "".join(f"{s:>14}" for s in shapes))
    for v, d in res["median_ms"].items():
        print(f"{v:44}" + "".join(f"{d[s]:>14.2f}" for s in shapes))
    write_json(args.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
