"""Helpers shared by the benchmark scripts (servers on 127.0.0.1, streamed timings)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import torch
from pdserve.net import free_port  # noqa: F401 (benchmarks import it from here)


def copy_bandwidth_gbs(mb: int = 256, reps: int = 10) -> float:
    """STREAM-style copy: (read + write) bytes per second."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    return 2 * src.numel() * 4 * reps / (time.perf_counter() - t) / 1e9


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop_flag = pid, 0, False

    def run(self) -> None:
        while not self.stop_flag:
            try:
                p = psutil.Process(self.pid)
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.2)


_CLIENT: httpx.Client | None = None


def stream_times(url: str, body: dict) -> tuple[float, list[float]]:
    """(ttft, token arrival times) of one streamed /generate request, on one kept-alive
    client as real clients do: a new httpx client per request costs ~35 ms of setup here
    (its SSL context), which an earlier version of these scripts counted into TTFT."""
    global _CLIENT
    if _CLIENT is None:
        _CLIENT = httpx.Client(timeout=300)
    t0 = time.perf_counter()
    times: list[float] = []
    n_prev = 0
    with _CLIENT.stream("POST", url + "/generate", json={**body, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            n = json.loads(line[6:])["meta_info"]["completion_tokens"]
            now = time.perf_counter()
            times.extend([now] * (n - n_prev))
            n_prev = n
    return times[0] - t0, times


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group; SIGKILL it if it has not exited in 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:
        pass  # already gone (e.g. it failed to start)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def write_json(path: str, res: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\nwrote {path}")


def prompt_ids(k: int, n: int = 256) -> list[int]:
    """Prompt number k: n token ids, different for every k (no prefix-cache hits)."""
    return [(k * 7919 + j * 31) % 40000 + 100 for j in range(n)]


def single_stream_decode_tok_s(url: str) -> float:
    """Median of 3 streamed 128-token generations, excluding the first token (after a warm one)."""
    body = {
        "input_ids": list(range(1000, 1016)),
        "sampling_params": {"max_new_tokens": 128, "ignore_eos": True, "temperature": 0},
    }
    stream_times(url, body)
    rates = []
    for _ in range(3):
        _, times = stream_times(url, body)
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    return sorted(rates)[1]


def ttft_256_ms(url: str, n: int = 5) -> float:
    """Median TTFT of n distinct 256-token prompts, one at a time."""
    ttfts = sorted(
        stream_times(url, {"input_ids": prompt_ids(i), "sampling_params": {"max_new_tokens": 1}})[0] for i in range(n)
    )
    return ttfts[n // 2] * 1000


def batch_output_tok_s(url: str, n: int, in_len: int, out_len: int) -> tuple[float, float]:
    """(output tok/s, seconds) of n requests sent at once as one batched /generate."""
    prompts = [[(i * 104729 + j * 17) % 40000 + 100 for j in range(in_len)] for i in range(n)]
    t = time.perf_counter()
    outs = httpx.post(
        url + "/generate",
        json={
            "input_ids": prompts,
            "sampling_params": {"max_new_tokens": out_len, "ignore_eos": True, "temperature": 0},
        },
        timeout=900,
    ).json()
    dur = time.perf_counter() - t
    return sum(o["meta_info"]["completion_tokens"] for o in outs) / dur, dur


def mixed_bench_cmd(
    url: str,
    *,
    num_prompts: int,
    output_len: int,
    long_input_len: int,
    rate: float,
    out_file: str,
    warmup: int,
    slo_ms: tuple[float, float] | None = None,
    input_len: int = 128,
    long_fraction: float = 0.125,
    seed: int = 1,
) -> list[str]:
    """`pdserve bench` with the mixed dataset (short prompts, a fraction of long ones, Poisson
    arrivals, seed 1 unless given): the command line the PD, Semi-PD and CPU-work benchmarks run."""
    cmd = [
        sys.executable, "-m", "pdserve.cli", "bench", "--base-url", url, "--backend", "pdserve",
        "--dataset-name", "mixed", "--num-prompts", str(num_prompts),
        "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--random-range-ratio", "1.0",
        "--mixed-long-input-len", str(long_input_len), "--mixed-long-fraction", str(long_fraction),
        "--request-rate", str(rate), "--seed", str(seed), "--warmup-requests", str(warmup),
        "--output-file", out_file, "--no-plots", "--disable-tqdm",
    ]  # fmt: skip
    if slo_ms is not None:
        cmd += ["--slo-ttft-ms", f"{slo_ms[0]:.1f}", "--slo-tpot-ms", f"{slo_ms[1]:.1f}"]
    return cmd
