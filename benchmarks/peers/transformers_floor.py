"""The offline floor: Hugging Face `transformers` batched `generate` on the same
prompts, written as a `pdserve bench` JSON result so it sits in the same tables.

    .venv/bin/python benchmarks/peers/transformers_floor.py --model-dir DIR \\
        --random-input-len 256 --random-output-len 128 --num-prompts 64 --output-file floor.json

No server and no arrivals: prompts go in static batches of --batch-size (all of
them by default; 1 for the single-stream workload). Per request, TTFT is the
batch's prefill (a `generate` of one token on the same batch, timed separately)
and the end-to-end latency the whole batch's `generate`; every output is forced
to its full length (`min_new_tokens`), like `ignore_eos` on the servers.
"""

from __future__ import annotations

import argparse
import math
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="HF directory (see export_bf16_safetensors.py)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--random-input-len", type=int, required=True)
    p.add_argument("--random-output-len", type=int, required=True)
    p.add_argument("--num-prompts", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=None, help="default: all prompts in one batch")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--output-file", required=True)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pdserve.bench.backends import RequestOutput
    from pdserve.bench.datasets import RandomSpec, random_requests
    from pdserve.bench.metrics import compute_metrics
    from pdserve.bench.report import result_dict, write_json
    from pdserve.bench.runner import RunResult

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).eval()
    # the same prompts `pdserve bench` builds for these flags (same tokenizer and seed)
    spec = RandomSpec(args.random_input_len, args.random_output_len, 1.0)
    reqs = random_requests(tok, args.num_prompts, spec, args.seed)
    n_out = args.random_output_len
    bs = args.batch_size or len(reqs)

    def generate(prompts: list[str], new_tokens: int) -> float:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                **enc,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return time.perf_counter() - t0

    generate([reqs[0].prompt], 2)  # warm-up
    outputs: list[RequestOutput] = []
    clock = 0.0
    for i in range(0, len(reqs), bs):
        batch = reqs[i : i + bs]
        prompts = [r.prompt for r in batch]
        ttft = generate(prompts, 1)
        total = generate(prompts, n_out)
        for r in batch:
            gap = (total - ttft) / max(1, n_out - 1)
            outputs.append(
                RequestOutput(
                    success=True,
                    prompt_len=r.prompt_len,
                    output_len=n_out,
                    start=clock,
                    ttft=ttft,
                    latency=total,
                    itl=[gap] * (n_out - 1),
                    kind=r.kind,
                )
            )
        clock += total
    run = RunResult(math.inf, compute_metrics(outputs, clock), outputs)
    config = {
        "engine": "transformers",
        "model_dir": args.model_dir,
        "dtype": args.dtype,
        "batch_size": bs,
        "num_prompts": args.num_prompts,
        "random_input_len": args.random_input_len,
        "random_output_len": n_out,
        "threads": torch.get_num_threads(),
        "command": " ".join(["transformers_floor.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    write_json(result_dict([run], config, {"model_info": {"model_path": args.model_dir}}), args.output_file)
    m = run.metrics
    print(
        f"transformers floor: {m.completed} requests in {m.duration_s:.2f} s, "
        f"{m.output_throughput:.1f} output tok/s, TTFT {m.ttft_ms.median:.0f} ms, TPOT {m.tpot_ms.median:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
