"""Prefill scheduler RSS under a steady load of ONE prompt length (issue #10).

A real 1P1D deployment (tcp backend) behind the router; clients send `/generate` with
`input_ids` of exactly --prompt-len random tokens (same shapes every step: no per-shape
cache can grow; --prompt-len-max makes the lengths vary, the control run), --max-new-tokens
output tokens, --concurrency at a time. Mixed in:

- client aborts (--abort-prob): the client drops the connection at a random moment;
- failed transfers (--fail-prob): a request sent to prefill alone with a bootstrap room no
  decode ever registers, so its sender fails at the bootstrap timeout (5 s here).

Every --every requests the prefill scheduler's RSS is sampled and it is sent SIGUSR2, which
(PDSERVE_MEMDUMP_DIR, pdserve/engine/memdebug.py) dumps glibc heap figures, live Python
objects by type and the per-request tables (scheduler, PD queues, transfer rooms).

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/rss_probe.py --requests 600 \
        --output bench_out/rss_probe.json
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import aiohttp
import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402
from soaklib.procs import deployment  # noqa: E402


def dump(sched_pid: int, dump_dir: str, timeout: float = 20) -> dict:
    before = set(glob.glob(os.path.join(dump_dir, f"memdump-{sched_pid}-*.json")))
    os.kill(sched_pid, signal.SIGUSR2)
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = set(glob.glob(os.path.join(dump_dir, f"memdump-{sched_pid}-*.json"))) - before
        if new:
            time.sleep(0.2)
            with open(sorted(new)[-1]) as f:
                return json.load(f)
        time.sleep(0.1)
    return {}


async def run(a, router_url: str, prefill_url: str, boot: int, sched_pid: int, dump_dir: str) -> list[dict]:
    rng = random.Random(a.seed)
    rows: list[dict] = []
    counts = {"ok": 0, "aborted": 0, "failed_transfer": 0, "error": 0}
    t0 = time.time()
    n = 0
    lock = asyncio.Lock()
    side: set[asyncio.Task] = set()

    def body() -> dict:
        n = rng.randint(a.prompt_len, a.prompt_len_max) if a.prompt_len_max else a.prompt_len
        return {
            "input_ids": [rng.randrange(100, 49000) for _ in range(n)],
            "sampling_params": {"max_new_tokens": a.max_new_tokens, "temperature": 0.7, "ignore_eos": True},
        }

    async def doomed(session) -> None:  # prefill alone: no decode registers this room
        b = {**body(), "bootstrap_host": "127.0.0.1", "bootstrap_port": boot, "bootstrap_room": rng.randrange(1 << 62)}
        try:
            async with session.post(prefill_url + "/generate", json=b, timeout=aiohttp.ClientTimeout(total=60)) as r:
                await r.read()
                counts["failed_transfer" if r.status >= 400 else "error"] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError):
            counts["error"] += 1

    async def one(session) -> None:
        abort_after = rng.uniform(0.02, 1.0) if rng.random() < a.abort_prob else None
        stream = rng.random() < 0.5

        async def go():
            async with session.post(
                router_url + "/generate", json={**body(), "stream": stream}, timeout=aiohttp.ClientTimeout(total=120)
            ) as r:
                await r.read()
                return r.status

        task = asyncio.ensure_future(go())
        try:
            if abort_after is not None:
                done, _ = await asyncio.wait({task}, timeout=abort_after)
                if not done:
                    task.cancel()
                    counts["aborted"] += 1
                    return
            counts["ok" if await task == 200 else "error"] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError, asyncio.CancelledError):
            counts["error"] += 1

    async def sample() -> None:
        loop = asyncio.get_running_loop()
        d = await loop.run_in_executor(None, dump, sched_pid, dump_dir)
        row = {
            "requests": n,
            "t_s": round(time.time() - t0, 1),
            **counts,
            "rss_mib": round(d.get("rss_bytes", 0) / 2**20, 1),
            **{f"malloc_{k}_mib": round(v / 2**20, 1) for k, v in d.get("malloc", {}).items()},
            "threads": d.get("threads"),
            "objects": d.get("objects_total"),
            "tables": d.get("tables"),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await sample()

        async def worker() -> None:
            nonlocal n
            while True:
                async with lock:
                    if n >= a.requests:
                        return
                    n += 1
                    k = n
                if rng.random() < a.fail_prob:
                    t = asyncio.ensure_future(doomed(session))
                    side.add(t)
                    t.add_done_callback(side.discard)
                await one(session)
                if k % a.every == 0:
                    await sample()

        await asyncio.gather(*(worker() for _ in range(a.concurrency)))
        if side:
            await asyncio.wait(side, timeout=60)
        await asyncio.sleep(2)
        await sample()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="bench_out/rss_probe.json")
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument(
        "--prompt-len-max",
        type=int,
        default=0,
        help="if set: prompt lengths uniform in [--prompt-len, this] (the control run: new shapes)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--abort-prob", type=float, default=0.1)
    ap.add_argument("--fail-prob", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tracemalloc", action="store_true", help="PYTHONTRACEMALLOC=1 in the prefill server")
    a = ap.parse_args()
    out_dir = os.path.dirname(a.output) or "."
    dump_dir = os.path.join(out_dir, "memdumps")
    os.makedirs(dump_dir, exist_ok=True)
    env = {"PDSERVE_MEMDUMP_DIR": os.path.abspath(dump_dir), "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "5"}
    if a.tracemalloc:
        env["PYTHONTRACEMALLOC"] = "1"
    prefill, decode, router = deployment(out_dir, prefill_env=env)
    procs = [prefill, decode, router]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(a),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
    }
    try:
        for p in procs:
            p.start()
        httpx.post(
            router.url + "/generate", json={"text": "warm up", "sampling_params": {"max_new_tokens": 4}}, timeout=120
        ).raise_for_status()
        sched = prefill.children()["prefill.scheduler"]
        res["rows"] = asyncio.run(run(a, router.url, prefill.url, prefill.bootstrap_port, sched.pid, dump_dir))
        res["prefill_load_end"] = httpx.get(prefill.url + "/get_load", timeout=10).json()
    finally:
        for p in reversed(procs):
            p.stop()
    write_json(a.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
