"""RL rollouts on Ray (issue #15): the sglang_pd_dis strategy against the co-located sglang
strategy on the same cores, then weight sync and memory release on the PD deployment.

- rollout throughput: a batch of --batch prompts (distinct, --prompt-len tokens) with
  --max-new-tokens output tokens each, all at once, output tokens/s (best of --reps);
- weight sync of the whole model from a trainer in this process (gloo rank 0): one broadcast
  per parameter against one flattened bucket, seconds and GB/s (bytes the trainer sent /
  wall time), beside a plain memory copy of the same bytes measured in the same run;
- offload / load: seconds and the RSS the engines gave back.

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/bench_rl.py --output bench_out/rl.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import free_port, prompt_ids, write_json  # noqa: E402


def rollout(strategy, batch: int, prompt_len: int, max_new: int, reps: int) -> dict:
    prompts = [prompt_ids(k, prompt_len) for k in range(batch)]
    sp = {"max_new_tokens": max_new, "ignore_eos": True, "temperature": 1.0}
    strategy.generate(prompts[:2], {"max_new_tokens": 4})  # warm
    best = None
    for _ in range(reps):
        t = time.perf_counter()
        outs = strategy.generate(prompts, sp)
        dt = time.perf_counter() - t
        tokens = sum(len(o["output_ids"]) for o in outs)
        if best is None or tokens / dt > best["output_tok_s"]:
            best = {"seconds": dt, "output_tokens": tokens, "output_tok_s": tokens / dt}
    return best


def model_weights() -> dict[str, torch.Tensor]:
    from pdserve.model.loader import load_model_files
    from pdserve.model.paths import default_model_path

    _, state = load_model_files(default_model_path())
    return {k: v.float().contiguous() for k, v in state.items() if k != "lm_head.weight"}


def weight_sync(strategy, weights: dict[str, torch.Tensor]) -> dict:
    from pdserve.rl import TrainerGroup

    port = free_port()
    trainer = TrainerGroup("127.0.0.1", port, strategy.weight_sync_world_size(), group_name="bench")
    pending = strategy.setup_collective_group("bench", "127.0.0.1", port)
    trainer.connect()
    pending.wait(300)
    names = list(weights)
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    res = {"bytes": nbytes, "tensors": len(names)}

    t = time.perf_counter()
    pending = strategy.broadcast_parameter(
        "bench", names, ["float32"] * len(names), [list(weights[n].shape) for n in names]
    )
    trainer.broadcast([weights[n] for n in names])
    pending.wait(600)
    dt = time.perf_counter() - t
    res["per_parameter"] = {"seconds": dt, "gb_s": nbytes / dt / 1e9}

    t = time.perf_counter()
    pending = strategy.broadcast_bucket(
        "bench", [{"name": n, "dtype": "float32", "shape": list(weights[n].shape)} for n in names]
    )
    trainer.broadcast_bucket([weights[n] for n in names])
    pending.wait(600)
    dt = time.perf_counter() - t
    res["bucket"] = {"seconds": dt, "gb_s": nbytes / dt / 1e9}

    src = torch.cat([t.view(-1) for t in weights.values()])
    dst = torch.empty_like(src)
    t = time.perf_counter()
    dst.copy_(src)
    dt = time.perf_counter() - t
    res["memcpy"] = {"seconds": dt, "gb_s": nbytes / dt / 1e9}
    return res


def memory(strategy) -> dict:
    rss0 = sum(strategy.engine_rss_bytes())
    t = time.perf_counter()
    strategy.offload_states()
    t_off = time.perf_counter() - t
    rss1 = sum(strategy.engine_rss_bytes())
    t = time.perf_counter()
    strategy.load_states()
    t_on = time.perf_counter() - t
    strategy.generate([prompt_ids(0, 16)], {"max_new_tokens": 4})
    return {
        "offload_s": t_off,
        "load_s": t_on,
        "rss_before_mib": rss0 / 2**20,
        "rss_offloaded_mib": rss1 / 2**20,
        "released_mib": (rss0 - rss1) / 2**20,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-total-tokens", type=int, default=32768)
    ap.add_argument("--output", default="bench_out/rl.json")
    a = ap.parse_args()
    import ray

    from pdserve.rl import create_strategy

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    res: dict = {"batch": a.batch, "prompt_len": a.prompt_len, "max_new_tokens": a.max_new_tokens}
    for base, name in ((41000, "sglang"), (43000, "sglang_pd_dis")):
        cfg = {
            "strategy_name": name,
            "strategy_config": {"max_total_tokens": a.max_total_tokens, "log_level": "warning", "base_port": base},
        }
        with create_strategy(cfg, world_size=2, cpus_per_rank=1) as strategy:
            res[name] = {"rollout": rollout(strategy, a.batch, a.prompt_len, a.max_new_tokens, a.reps)}
            print(name, res[name]["rollout"], flush=True)
            if name == "sglang_pd_dis":
                res[name]["weight_sync"] = weight_sync(strategy, model_weights())
                print("weight sync", res[name]["weight_sync"], flush=True)
                res[name]["memory"] = memory(strategy)
                print("memory", res[name]["memory"], flush=True)
    ray.shutdown()
    pd, co = res["sglang_pd_dis"]["rollout"], res["sglang"]["rollout"]
    ws, mem = res["sglang_pd_dis"]["weight_sync"], res["sglang_pd_dis"]["memory"]
    print(f"\n| strategy | output tok/s | seconds for {a.batch} x {a.max_new_tokens} |\n|---|---:|---:|")
    for name, r in (("sglang (co-located, 2 engines)", co), ("sglang_pd_dis (1P1D + router)", pd)):
        print(f"| {name} | {r['output_tok_s']:.1f} | {r['seconds']:.1f} |")
    print(f"\nPD / co-located: {pd['output_tok_s'] / co['output_tok_s']:.2f}x")
    print(
        f"\n| weight sync ({ws['bytes'] / 1e9:.2f} GB, {ws['tensors']} tensors, into 2 engines) | s | GB/s |\n"
        f"|---|---:|---:|"
    )
    for k in ("per_parameter", "bucket", "memcpy"):
        print(f"| {k} | {ws[k]['seconds']:.2f} | {ws[k]['gb_s']:.2f} |")
    print(
        f"\noffload {mem['offload_s']:.2f} s (released {mem['released_mib']:.0f} MiB of "
        f"{mem['rss_before_mib']:.0f}), load {mem['load_s']:.2f} s"
    )
    write_json(a.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
