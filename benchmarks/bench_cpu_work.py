"""CPU seconds a server spends on a fixed workload, process by process.

Wall-clock figures on a shared 2-core box move 15-30 % between runs of the same code, too
much to show a small change in the engine's own work. The CPU time each process of the
server tree spends serving the same requests (same seed, same prompts, same arrivals) moves
far less: it counts the work done, not the time the work waited for a core. This script
starts `pdserve serve` from the tree on PYTHONPATH (or the tree given by --tree), runs one
`pdserve bench` mixed load against it (the client always comes from this checkout, so that
both sides of a comparison are driven alike), and reports user+system CPU seconds per
process (front end, scheduler) besides the client's TTFT/TPOT.

Compare two trees, alternating, under the benchmark lock:

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/bench_cpu_work.py \
        --tree /tmp/before --tree /tmp/after --rounds 2 --output bench_out/cpu_work.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import mixed_bench_cmd  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become healthy")


def cpu_by_role(root: psutil.Process) -> dict[str, float]:
    """user+system seconds of the server tree, by role (the scheduler is the child that
    runs the model; everything else of the tree counts as the front end)."""
    out: dict[str, float] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            cmd = " ".join(proc.cmdline())
        except psutil.NoSuchProcess:
            continue
        role = "scheduler" if "scheduler" in cmd or proc.pid != root.pid else "front_end"
        out[role] = out.get(role, 0.0) + times.user + times.system
    return out


def one_run(tree: str, args: argparse.Namespace, out_file: str) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(port), "--max-total-tokens", "65536"]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_health(url, proc)
        body = json.dumps({"text": "warm up", "sampling_params": {"max_new_tokens": 4}}).encode()
        req = urllib.request.Request(url + "/generate", body, {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=120).read()
        time.sleep(2)
        root = psutil.Process(proc.pid)
        before = cpu_by_role(root)
        t0 = time.time()
        client = mixed_bench_cmd(
            url,
            num_prompts=args.num_prompts,
            output_len=64,
            long_input_len=1024,
            rate=args.rate,
            out_file=out_file,
            warmup=0,
        )
        subprocess.run(
            client, check=True, timeout=900, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=HERE)
        )
        wall = time.time() - t0
        after = cpu_by_role(root)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    with open(out_file) as f:
        metrics = json.load(f)["runs"][0]["metrics"]
    cpu = {role: after[role] - before.get(role, 0.0) for role in after}
    return {
        "tree": tree,
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_total_s": sum(cpu.values()),
        "ttft_p50_ms": metrics["ttft_ms"]["median"],
        "tpot_p50_ms": metrics["tpot_ms"]["median"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=None, help="a checkout to serve from (repeatable)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds over the trees")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--output", default="bench_out/cpu_work.json")
    args = ap.parse_args()
    trees = [os.path.abspath(t) for t in (args.tree or [HERE])]
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    runs = []
    for rnd in range(args.rounds):
        for i, tree in enumerate(trees):
            res = one_run(tree, args, f"{args.output}.{i}.{rnd}.json")
            res["round"] = rnd
            runs.append(res)
            print(
                f"round {rnd} {tree}: scheduler {res['cpu_s'].get('scheduler', 0):.1f} s, front end "
                f"{res['cpu_s'].get('front_end', 0):.1f} s CPU; TTFT p50 {res['ttft_p50_ms']:.0f} ms, "
                f"TPOT p50 {res['tpot_p50_ms']:.1f} ms",
                flush=True,
            )
    print("\n| tree | scheduler CPU s (median) | front-end CPU s | TTFT p50 ms | TPOT p50 ms |\n|---|---|---|---|---|")
    for tree in trees:
        mine = [r for r in runs if r["tree"] == tree]

        def med(key, sub=None, rows=mine):
            return statistics.median(r[key][sub] if sub else r[key] for r in rows)

        print(
            f"| {tree} | {med('cpu_s', 'scheduler'):.1f} | {med('cpu_s', 'front_end'):.1f} | "
            f"{med('ttft_p50_ms'):.0f} | {med('tpot_p50_ms'):.1f} |"
        )
    with open(args.output, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
