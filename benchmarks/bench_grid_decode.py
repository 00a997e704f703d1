"""Single-stream decode through a real server, grid linears on against off: two `pdserve serve`
processes (float32, default model), one with `--w4-decode-max-tokens 8` (the default: steps of up
to 8 tokens multiply from the GGUF codes) and one with `--w4-decode-max-tokens 0` (oneDNN's
packed float32 weights at every size). Both run at once, idle but for the one being measured;
rounds alternate which server goes first. Per request: a streamed /generate of 128 tokens,
temperature 0, ignore_eos, a 16-token prompt; the decode rate excludes the first token. Best of
`--rounds` per server (the figure least disturbed by other processes on a shared machine).
`--batches 4,8`: also B distinct 16-token prompts in one batched /generate (decode steps of B
rows), output tokens per second, best of `--rounds`, alternating the same way: where the grid
stops paying off as rows grow (GRID_LAYER_MAX_ROWS).

    /work/notes/benchlock.sh x .venv/bin/python benchmarks/bench_grid_decode.py --output bench_out/grid_decode.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import httpx
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import batch_output_tok_s, free_port, stop_server, stream_times, write_json  # noqa: E402

BODY = {
    "input_ids": list(range(1000, 1016)),
    "sampling_params": {"max_new_tokens": 128, "ignore_eos": True, "temperature": 0},
}


def start(w4: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--w4-decode-max-tokens", str(w4), *extra]  # fmt: skip
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL), f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, limit_s: float = 300) -> None:
    t = time.monotonic()
    while time.monotonic() - t < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server {url} exited with {proc.returncode}")
        try:
            if httpx.post(url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 1}}, timeout=2).status_code == 200:  # fmt: skip
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server {url} not ready after {limit_s:.0f} s")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process and its children (the scheduler is a child)."""
    p = psutil.Process(pid)
    procs = [p, *p.children(recursive=True)]
    return sum(sum(q.cpu_times()[:2]) for q in procs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="", help="comma-separated batch sizes to measure too")
    ap.add_argument("--extra", default="", help="more `pdserve serve` flags for both servers")
    ap.add_argument("--output", default="bench_out/grid_decode.json")
    args = ap.parse_args()
    servers = {name: start(w4, args.extra.split()) for name, w4 in (("grid", 8), ("dense", 0))}
    rates: dict[str, list[float]] = {name: [] for name in servers}
    idle_cpu: dict[str, list[float]] = {name: [] for name in servers}
    texts: dict[str, list[int]] = {}
    batch_rates: dict[str, list[float]] = {}
    try:
        for proc, url in servers.values():
            wait_ready(proc, url)
        for name, (_, url) in servers.items():  # a warm request each (oneDNN primitives, caches)
            stream_times(url, BODY)
            texts[name] = httpx.post(url + "/generate", json=BODY, timeout=300).json()["output_ids"]
        for k in range(args.rounds):
            order = list(servers) if k % 2 == 0 else list(reversed(servers))
            for name in order:
                proc, url = servers[name]
                other = next(p for n, (p, _) in servers.items() if n != name)
                c0 = tree_cpu_s(other.pid)
                _, times = stream_times(url, BODY)
                rate = (len(times) - 1) / (times[-1] - times[0])
                # CPU the idle server used meanwhile, as a fraction of the run: it should be ~0
                idle_cpu[name].append((tree_cpu_s(other.pid) - c0) / (times[-1] - times[0]))
                rates[name].append(rate)
                print(
                    f"round {k + 1} {name:5s} {rate:6.1f} tok/s (other server's CPU {idle_cpu[name][-1]:.2f})",
                    flush=True,
                )
        for b in (int(v) for v in args.batches.split(",") if v):
            for k in range(args.rounds):
                for name in list(servers) if k % 2 == 0 else list(reversed(servers)):
                    rate, _ = batch_output_tok_s(servers[name][1], b, 16, 128)
                    batch_rates.setdefault(f"{name} x{b}", []).append(rate)
                    print(f"round {k + 1} {name:5s} batch {b}: {rate:6.1f} output tok/s", flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    best = {name: max(r) for name, r in rates.items()}
    same = texts["grid"] == texts["dense"]
    print(f"best of {args.rounds}: grid {best['grid']:.1f} tok/s, dense {best['dense']:.1f} tok/s, "
          f"{best['grid'] / best['dense']:.2f}x; same 128 tokens: {same}")  # fmt: skip
    batch_best = {key: max(r) for key, r in batch_rates.items()}
    for b in (int(v) for v in args.batches.split(",") if v):
        g, d = batch_best[f"grid x{b}"], batch_best[f"dense x{b}"]
        print(f"batch {b}, best of {args.rounds}: grid {g:.1f}, dense {d:.1f} output tok/s, {g / d:.2f}x")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f}")
    write_json(
        args.output,
        {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "rates": rates, "best": best,
         "idle_other_server_cpu": idle_cpu, "same_output_ids": same,
         "batch_output_tok_s": batch_rates, "batch_best": batch_best, "loadavg": load, "extra": args.extra},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
