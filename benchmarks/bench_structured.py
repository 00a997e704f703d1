"""Per-token cost of structured output (grammar masking with xgrammar).

1. Micro (no model): per decode step, what a request with a grammar adds in the runner
   and the scheduler: advancing its matcher by one token, filling the next-token bitmask
   and applying it to a [batch, 49152] logits tensor (pdserve.engine.grammar), for each
   grammar kind and for a forced tool call (tool_choice "required"), at batch 1 and 8
   (all rows constrained). Also xgrammar's own CPU
   `apply_token_bitmask_inplace` for comparison.
2. End to end (pdserve.Engine, default model, float32): decode ms/token of the same
   64-token generation without a grammar and under a JSON schema that keeps it writing
   (name, age, bio), median of 3; per token over the tokens each run produced.

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/bench_structured.py [--skip-e2e]

Prints a table; writes bench_out/structured.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "bio"],
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "bio": {"type": "string"}},
}
GRAMMARS = [
    ("json_schema", json.dumps(SCHEMA)),
    ("json_object", '{"type": "object"}'),
    ("regex", r"([a-z]+ )+[a-z]+\."),
    # counted repetition: xgrammar expands it, and the mask fill gets slow
    ("regex_counted", r"([a-z]+ ){10,200}[a-z]+\."),
    ("ebnf", 'root ::= item+ "."\nitem ::= ("yes" | "no" | "maybe") ", "'),
]
VOCAB = 49152
WEATHER_TOOL = {
    "type": "object",
    "required": ["city"],
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
}


def tool_call_grammar() -> str:
    """What tool_choice="required" constrains to (Hermes format, one call)."""
    from pdserve.server.tools.base import Tool, get_parser

    return get_parser("hermes").forced_grammar([Tool("get_weather", None, WEATHER_TOOL)], parallel=False)


def micro(batch: int, steps: int = 64) -> dict:
    from types import SimpleNamespace

    import xgrammar as xgr

    from pdserve.engine.grammar import GrammarBackend, apply_grammar_masks
    from pdserve.model.tokenizer import load_tokenizer

    tok = load_tokenizer(None, None)
    be = GrammarBackend(tok, VOCAB, [tok.eos_token_id])
    out = {}
    for name, spec in GRAMMARS + [("tool_call", tool_call_grammar())]:
        kind = {"json_object": "json_schema", "regex_counted": "regex", "tool_call": "ebnf"}.get(name, name)
        t = time.perf_counter()
        be.compile(kind, spec)
        first_compile = time.perf_counter() - t
        t = time.perf_counter()
        be.compile(kind, spec)
        cached_compile = time.perf_counter() - t
        reqs = [SimpleNamespace(grammar=be.new_state(kind, spec), output_ids=[]) for _ in range(batch)]
        g = torch.Generator().manual_seed(0)
        mask_s, accept_s, n = [], [], 0
        for _ in range(steps):
            logits = torch.randn(batch, VOCAB, generator=g)
            logits[:, tok.eos_token_id] = -1e9  # keep walking (EOS only when nothing else is allowed)
            t = time.perf_counter()
            apply_grammar_masks(logits, reqs)
            mask_s.append(time.perf_counter() - t)
            ids = logits.argmax(-1).tolist()
            t = time.perf_counter()
            for r, i in zip(reqs, ids):
                r.output_ids.append(i)
                r.grammar.sync(r.output_ids)
            accept_s.append(time.perf_counter() - t)
            n += 1
            if any(r.grammar.terminated for r in reqs):
                break
        # xgrammar's own CPU kernel for the apply step, same bitmask
        bm = xgr.allocate_token_bitmask(batch, VOCAB)
        logits = torch.randn(batch, VOCAB)
        t = time.perf_counter()
        for _ in range(20):
            xgr.apply_token_bitmask_inplace(logits, bm)
        xgr_apply = (time.perf_counter() - t) / 20
        mask, accept = statistics.median(mask_s), statistics.median(accept_s)  # medians: a busy box
        out[name] = {
            "batch": batch,
            "steps": n,
            "mask_us_per_step": mask * 1e6,
            "accept_us_per_step": accept * 1e6,
            "total_us_per_token": (mask + accept) / batch * 1e6,
            "xgrammar_apply_us_per_step": xgr_apply * 1e6,
            "compile_ms_first": first_compile * 1e3,
            "compile_ms_cached": cached_compile * 1e3,
        }
    return out


def e2e(reps: int = 3) -> dict:
    import pdserve

    e = pdserve.Engine(dtype="float32", max_total_tokens=4096)
    try:
        prompt = e.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Describe a person as JSON with name, age and a long bio."}],
            add_generation_prompt=True,
            tokenize=False,
        )
        cases = {
            "none": {"ignore_eos": True},
            "json_schema": {"json_schema": json.dumps(SCHEMA)},
            "regex": {"regex": GRAMMARS[2][1]},
        }
        res = {}
        for name, extra in cases.items():
            per_tok = []
            for _ in range(reps + 1):  # the first one warms up (and compiles the grammar)
                r = e.generate(prompt, {"max_new_tokens": 64, "temperature": 0, **extra})
                m = r["meta_info"]
                per_tok.append(m["decode_time"] / max(1, m["completion_tokens"] - 1) * 1e3)
            res[name] = {
                "decode_ms_per_token": statistics.median(per_tok[1:]),
                "completion_tokens": m["completion_tokens"],
                "finish": m["finish_reason"]["type"],
            }
        for k in ("json_schema", "regex"):
            res[k]["overhead_ms_per_token"] = res[k]["decode_ms_per_token"] - res["none"]["decode_ms_per_token"]
        return res
    finally:
        e.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"micro": {f"batch{b}": micro(b) for b in (1, 8)}}
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"{'grammar':<14} {'batch':>5} {'steps':>5} {'mask us/step':>13} {'accept us/step':>15} "
        f"{'us/token':>9} {'xgr apply us':>13} {'compile ms (1st/cached)':>24}"
    )
    for b, rows in result["micro"].items():
        for name, r in rows.items():
            print(
                f"{name:<14} {r['batch']:>5} {r['steps']:>5} {r['mask_us_per_step']:>13.0f} "
                f"{r['accept_us_per_step']:>15.0f} {r['total_us_per_token']:>9.0f} "
                f"{r['xgrammar_apply_us_per_step']:>13.0f} "
                f"{r['compile_ms_first']:>15.2f} / {r['compile_ms_cached']:.3f}"
            )
    if not args.skip_e2e:
        result["e2e"] = e2e()
        x = result["e2e"]
        print(
            f"\nend to end, decode ms/token (median of 3, <= 64 tokens, float32): "
            f"no grammar {x['none']['decode_ms_per_token']:.1f}"
        )
        for k in ("json_schema", "regex"):
            print(
                f"  {k}: {x[k]['decode_ms_per_token']:.1f} ({x[k]['completion_tokens']} tokens, "
                f"{x[k]['finish']}); overhead {x[k]['overhead_ms_per_token']:+.2f} ms/token"
            )
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["load_avg"] = os.getloadavg()
    os.makedirs("bench_out", exist_ok=True)
    with open("bench_out/structured.json", "w") as f:
        json.dump(result, f, indent=1)
    print("wrote bench_out/structured.json")


if __name__ == "__main__":
    main()
