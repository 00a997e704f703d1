"""Engine-core figures of issue #2, measured in one run on this machine:

  memory-bandwidth bound (model bytes / copy bandwidth), single-stream decode tok/s,
  TTFT of one 256-token prompt, offline throughput (64 x 256 in / 128 out, ignore EOS),
  time from `pdserve serve` to the first answer, peak RSS of the server process tree.

    .venv/bin/python benchmarks/bench_engine.py --output bench_out/engine.json

Prints a table and writes JSON. Servers listen on 127.0.0.1 and are stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time

import httpx
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    RssSampler,
    batch_output_tok_s,
    copy_bandwidth_gbs,
    free_port,  # noqa: E402
    single_stream_decode_tok_s,
    ttft_256_ms,
    write_json,
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default="bench_out/engine.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--extra", default="", help="extra `pdserve serve` flags")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    steps = tqdm(total=6, desc="bench_engine")
    res["copy_bandwidth_GBps"] = copy_bandwidth_gbs()
    steps.update()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
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
        "65536",
        *args.extra.split(),
    ]
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL)
    rss = RssSampler(proc.pid)
    rss.start()
    try:
        while True:
            try:
                r = httpx.post(
                    url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 1}}, timeout=2
                )
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.perf_counter() - t_start > 300:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        res["startup_to_first_answer_s"] = time.perf_counter() - t_start
        info = httpx.get(url + "/get_server_info").json()
        res["dtype"] = info["dtype"]
        res["weight_bytes_bf16"] = info["weight_bytes"]
        res["bandwidth_bound_tok_s"] = res["copy_bandwidth_GBps"] * 1e9 / info["weight_bytes"]
        steps.update()

        # single stream: 128 output tokens; decode rate excludes the first token
        res["single_stream_decode_tok_s"] = single_stream_decode_tok_s(url)
        steps.update()
        res["ttft_256_ms"] = ttft_256_ms(url)  # distinct prompts: no prefix-cache hits
        steps.update()
        # offline throughput: 64 requests of 256 prompt / 128 output tokens, all at once
        rate, dur = batch_output_tok_s(url, 64, 256, 128)
        res["offline_64x256x128_output_tok_s"] = rate
        res["offline_64x256x128_seconds"] = dur
        steps.update()
        res["peak_rss_MiB"] = rss.peak / 2**20
        steps.update()
    finally:
        rss.stop_flag = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        steps.close()

    targets = {
        "single_stream_decode_tok_s": (">=", 60),
        "ttft_256_ms": ("<=", 100),
        "offline_64x256x128_output_tok_s": (">=", 640),
        "startup_to_first_answer_s": ("<=", 10),
    }
    print(f"\n{'figure':<36}{'value':>12}  target")
    for k, v in res.items():
        if isinstance(v, float):
            tgt = targets.get(k)
            t = (
                f"{tgt[0]} {tgt[1]}  {'met' if (v >= tgt[1] if tgt[0] == '>=' else v <= tgt[1]) else 'MISSED'}"
                if tgt
                else ""
            )
            print(f"{k:<36}{v:>12.1f}  {t}")
    write_json(args.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
