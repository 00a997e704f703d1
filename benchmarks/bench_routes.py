"""Single-stream decode rate through each streaming route of one `pdserve serve` (issue #12):

  /generate, /v1/completions and /v1/chat/completions, all streamed, greedy, 128 tokens,
  ignore EOS, one request at a time, the routes interleaved round by round so that a
  change in machine load hits all of them alike.

    .venv/bin/python benchmarks/bench_routes.py --output bench_out/routes.json

The fourth row sends the body of vLLM's own benchmark client (default temperature, so
sampled rather than greedy). Per route: decode tok/s (output tokens after the first / time from the first to the last
token's event, median over rounds), TTFT, events per request, and the front-end process's
CPU time per output token (psutil, the HTTP server process only: the scheduler process,
which runs the model, is not counted), which is where per-token front-end work shows.
Prints a table and writes JSON. The server listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import httpx
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import free_port, stop_server, write_json  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a map in a bottle."


def bodies(max_tokens: int) -> dict[str, tuple[str, dict]]:
    """Route name -> (path, streamed request body)."""
    common = {"temperature": 0, "ignore_eos": True, "stream": True}
    return {
        "/generate": (
            "/generate",
            {
                "text": PROMPT,
                "stream": True,
                "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
            },
        ),
        "/v1/completions": (
            "/v1/completions",
            {"prompt": PROMPT, "max_tokens": max_tokens, **common, "stream_options": {"include_usage": True}},
        ),
        "/v1/chat/completions": (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": max_tokens,
                **common,
                "stream_options": {"include_usage": True},
            },
        ),
        # the body `vllm bench serve` sends (vllm/benchmarks/lib/endpoint_request_func.py): no
        # temperature (the server's default, 1.0, so random sampling), repetition_penalty 1.0
        "/v1/completions (vLLM client body)": (
            "/v1/completions",
            {
                "prompt": PROMPT,
                "repetition_penalty": 1.0,
                "max_tokens": max_tokens,
                "logprobs": None,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,
            },
        ),
    }


def one_request(client: httpx.Client, url: str, path: str, body: dict) -> dict:
    """Stream one request; returns TTFT, first/last token event times, tokens, events."""
    t0 = time.perf_counter()
    first = last = None
    tokens = events = 0
    with client.stream("POST", url + path, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            obj = json.loads(line[6:])
            events += 1
            if path == "/generate":
                tokens = obj["meta_info"]["completion_tokens"]
                carries_token = True
            elif obj.get("usage") and not obj.get("choices"):
                tokens = obj["usage"]["completion_tokens"]
                continue
            else:
                ch = obj["choices"][0]
                text = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content")
                carries_token = bool(text) or ch.get("finish_reason") is not None
            if carries_token:
                first = now if first is None else first
                last = now
    return {"ttft_s": first - t0, "decode_s": last - first, "tokens": tokens, "events": events}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default="bench_out/routes.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--extra", default="", help="extra `pdserve serve` flags")
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "pdserve.cli",
        "serve",
        "--port",
        str(port),
        "--num-threads",
        str(args.threads),
        *args.extra.split(),
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL)
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": platform.processor() or platform.machine(),
        "command": " ".join(cmd),
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
    }
    try:
        t_start = time.perf_counter()
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.perf_counter() - t_start > 300:
                raise RuntimeError("server did not start")
            time.sleep(0.1)
        res["dtype"] = httpx.get(url + "/get_server_info").json().get("dtype")
        front = psutil.Process(proc.pid)  # the HTTP front end; the scheduler is its child
        routes = bodies(args.max_tokens)
        runs: dict[str, list[dict]] = {name: [] for name in routes}
        with httpx.Client(timeout=300) as client:
            for path, body in routes.values():  # warm every route once
                one_request(client, url, path, body)
            for _ in range(args.rounds):
                for name, (path, body) in routes.items():
                    cpu0 = sum(front.cpu_times()[:2])
                    r = one_request(client, url, path, body)
                    r["front_cpu_s"] = sum(front.cpu_times()[:2]) - cpu0
                    runs[name].append(r)
    finally:
        stop_server(proc)

    res["routes"] = {}
    print(f"\n{'route':36} {'decode tok/s':>12} {'TTFT ms':>8} {'events':>7} {'front CPU us/token':>19}")
    for name, rs in runs.items():
        rate = statistics.median((r["tokens"] - 1) / r["decode_s"] for r in rs)
        row = {
            "decode_tok_s": rate,
            "decode_tok_s_runs": [(r["tokens"] - 1) / r["decode_s"] for r in rs],
            "ttft_ms": statistics.median(r["ttft_s"] for r in rs) * 1000,
            "events": statistics.median(r["events"] for r in rs),
            "tokens": statistics.median(r["tokens"] for r in rs),
            "front_cpu_us_per_token": statistics.median(r["front_cpu_s"] / r["tokens"] for r in rs) * 1e6,
        }
        res["routes"][name] = row
        print(
            f"{name:36} {rate:12.1f} {row['ttft_ms']:8.1f} {row['events']:7.0f} {row['front_cpu_us_per_token']:19.0f}"
        )
    write_json(args.output, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
