"""Greedy agreement with `transformers` for every dtype / weight-precision mode pdserve
serves, so a user can choose knowing the cost:

    .venv/bin/python benchmarks/bench_agreement.py --output bench_out/agreement.json

For each mode, the 20 chat questions of `pdserve.bench.agreement` go through the chat
template one at a time (greedy, `--max-new-tokens` tokens), and the outputs are compared
with `transformers` on the same weights in float32 and in bfloat16: how many first tokens
are equal, how many answers are equal in full, and the mean number of leading equal tokens.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

from pdserve.bench.agreement import agreement, chat_prompts, transformers_greedy  # noqa: E402

# (name, pdserve.Engine keyword arguments)
MODES: list[tuple[str, dict]] = [
    ("float32", {"dtype": "float32"}),
    ("bfloat16", {"dtype": "bfloat16", "w4_decode_max_tokens": 0}),
    ("bfloat16 + 4-bit decode (bf16 default)", {"dtype": "bfloat16"}),
    ("float32 + --quantization w8a8_int8", {"dtype": "float32", "quantization": "w8a8_int8"}),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="bench_out/agreement.json")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import pdserve
    from pdserve.engine.model_loading import auto_dtype
    from pdserve.model.tokenizer import load_tokenizer

    prompts = chat_prompts(load_tokenizer(None))
    n = args.max_new_tokens
    refs = {}
    for dt in tqdm(("float32", "bfloat16"), desc="transformers references"):
        refs[dt] = transformers_greedy(prompts, dt, n)
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "auto_dtype": str(auto_dtype()).removeprefix("torch."),
        "max_new_tokens": n,
        "modes": {},
    }
    for name, kw in tqdm(MODES, desc="pdserve modes"):
        with pdserve.Engine(max_total_tokens=8192, num_threads=args.threads, **kw) as e:
            t = time.perf_counter()
            outs = [
                e.generate(input_ids=p, sampling_params={"max_new_tokens": n, "temperature": 0})["output_ids"]
                for p in prompts
            ]
            secs = time.perf_counter() - t
        res["modes"][name] = {
            "engine_args": kw,
            "seconds": round(secs, 1),
            **{f"vs_transformers_{dt}": agreement(outs, refs[dt]).as_dict() for dt in refs},
        }
    print(f"\n{len(prompts)} chat questions, greedy, {n} tokens; auto dtype here = {res['auto_dtype']}")
    print(f"{'mode':40} {'vs transformers':>15} {'first token':>12} {'all tokens':>11} {'mean equal':>11}")
    for name, m in res["modes"].items():
        for dt in refs:
            a = m[f"vs_transformers_{dt}"]
            print(
                f"{name:40} {dt:>15} {a['first_token_equal']:>9}/{a['prompts']} "
                f"{a['all_tokens_equal']:>8}/{a['prompts']} {a['mean_leading_equal']:>11}"
            )
    write_json(args.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
