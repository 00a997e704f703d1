"""Soak with injected faults (issue #10): a 1P1D deployment behind `pdserve router`, driven
at a fraction (default 80 %) of its measured capacity for --duration-s (default 10 min)
while faults are injected on a schedule (--faults; default: decode SIGKILLed and restarted
on the same port, then prefill the same (HTTP and bootstrap ports), then decode paused with
SIGSTOP for --pause-s, then prefill paused).

Clients mix the three generation routes, streamed or not, and a share of them abort at a
random moment (--abort-prob). Every request is classified:

- succeeded: 200 with a whole answer (a stream that ends with `data: [DONE]`);
- failed: an error the client can read (a 4xx/5xx status with a JSON message, or a stream
  that ends with an error event and no [DONE]);
- aborted: the client itself went away (by design);
- lost: anything else (no answer within the client timeout, a connection error, a stream
  that just stops, garbage). Must be 0.

A probe (/generate, one token, every second through the router) measures when the router
serves again after each fault; the router's view of its workers (/workers) is sampled every
second. RSS of every process (router, each server's HTTP and scheduler process) is sampled
every 2 s. At the end both KV pools must be free. The parts live in benchmarks/soaklib/.

Not a CI test. Run it under the shared benchmark lock:

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/soak.py --output bench_out/soak.json

Writes the JSON, a Markdown table (.md) and an RSS plot (.png) next to --output.
"""

from __future__ import annotations

import argparse
import asyncio
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
from soaklib.clients import Stats, client_task, closed_loop, probe_loop, router_state_loop  # noqa: E402
from soaklib.faults import DEFAULT_PLAN, fault_schedule, parse_plan, recovery  # noqa: E402
from soaklib.procs import Proc, deployment  # noqa: E402
from soaklib.report import kv_clean, plot_rss, rss_summary, table  # noqa: E402


async def rss_loop(procs: list[Proc], stop: asyncio.Event, samples: list[dict], t0: float) -> None:
    while not stop.is_set():
        row = {"t": round(time.time() - t0, 1)}
        for p in procs:
            for k, v in p.rss().items():
                row[f"{k}#{p.incarnation}"] = v
        samples.append(row)
        await asyncio.sleep(2.0)


async def run_load(router: Proc, prefill: Proc, decode: Proc, rate: float, a, res: dict) -> Stats:
    """Poisson arrivals at `rate` for --duration-s with the faults, then wait for every client."""
    stats = Stats()
    rng = random.Random(a.seed)
    stop = asyncio.Event()
    probes, samples, faults, states = [], [], [], []
    t0 = time.time()
    bg = [
        asyncio.ensure_future(probe_loop(router.url, stop, probes)),
        asyncio.ensure_future(rss_loop([router, prefill, decode], stop, samples, t0)),
        asyncio.ensure_future(router_state_loop(router.url, stop, states, t0)),
    ]
    sched = asyncio.ensure_future(
        fault_schedule({"prefill": prefill, "decode": decode}, parse_plan(a.faults), a, t0, faults)
    )
    tasks: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        i = 0
        next_at = t0
        while time.time() < t0 + a.duration_s:
            next_at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, next_at - time.time()))
            t = asyncio.ensure_future(client_task(session, router.url, rng, i, a, stats))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            i += 1
            if i % 100 == 0:
                print(
                    f"[{time.time() - t0:6.1f}s] sent {i}, in flight {len(tasks)}, "
                    f"ok {stats.count('succeeded')}, failed {stats.count('failed')}, "
                    f"lost {stats.count('lost')}",
                    flush=True,
                )
        await sched  # every fault injected and its process back
        if tasks:
            await asyncio.wait(tasks, timeout=a.client_timeout_s + 30)
        still = len(tasks)
    stop.set()
    await asyncio.gather(*bg)
    recovery(faults, probes)
    res["sent"] = i
    res["unfinished_client_tasks"] = still
    res["faults"] = [{k: v for k, v in f.items() if not k.startswith("t_")} for f in faults]
    res["rss_samples"] = samples
    res["router_states"] = states
    res["probes"] = {
        "sent": len(probes),
        "ok": sum(p.ok for p in probes),
        "series": [(round(p.t - t0, 1), p.ok, p.latency_s, p.detail) for p in probes],
    }
    return stats


def summarize(res: dict, stats: Stats) -> None:
    res["counts"] = {k: stats.count(k) for k in ("succeeded", "failed", "aborted", "lost")}
    res["lost_details"] = [o.detail for o in stats.outcomes if o.kind == "lost"][:50]
    failed: dict[str, int] = {}
    for o in stats.outcomes:
        if o.kind == "failed":
            key = o.detail.split(":", 1)[0] + ": " + o.detail.split(":", 1)[-1][:70]
            failed[key] = failed.get(key, 0) + 1
    res["failed_kinds"] = dict(sorted(failed.items(), key=lambda kv: -kv[1])[:20])
    res["rss"] = rss_summary(res["rss_samples"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="bench_out/soak.json")
    ap.add_argument("--duration-s", type=float, default=600.0, help="length of the loaded run with faults")
    ap.add_argument("--load-fraction", type=float, default=0.8, help="share of the measured capacity")
    ap.add_argument("--capacity-s", type=float, default=60.0, help="length of the capacity measurement")
    ap.add_argument("--capacity-concurrency", type=int, default=8)
    ap.add_argument("--rate", type=float, default=None, help="requests/s (skips the capacity measurement)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--abort-prob", type=float, default=0.1, help="share of clients that abort at random")
    ap.add_argument(
        "--faults",
        default=",".join(f"{k}-{t}" for k, t in DEFAULT_PLAN),
        help="comma-separated kill-decode, kill-prefill, pause-decode, pause-prefill, in order",
    )
    ap.add_argument("--down-s", type=float, default=3.0, help="seconds a killed server stays down")
    ap.add_argument("--pause-s", type=float, default=10.0, help="seconds a paused server stays stopped")
    ap.add_argument("--client-timeout-s", type=float, default=200.0, help="a request with no answer by then is lost")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    parse_plan(a.faults)
    out_dir = os.path.dirname(a.output) or "."
    os.makedirs(out_dir, exist_ok=True)
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(a),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
    }
    prefill, decode, router = deployment(out_dir)
    procs = [prefill, decode, router]
    # SIGTERM (timeout, Ctrl-C of a wrapper) still stops the servers: they run in their own sessions
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for p in procs:
            p.start()
        httpx.post(
            router.url + "/generate", json={"text": "warm up", "sampling_params": {"max_new_tokens": 4}}, timeout=120
        ).raise_for_status()
        if a.rate is None:
            cap = asyncio.run(closed_loop(router.url, a.capacity_concurrency, a.capacity_s, a))
            res["capacity_req_s"] = round(cap, 3)
            rate = cap * a.load_fraction
        else:
            rate = a.rate
        res["rate_req_s"] = round(rate, 3)
        print(
            f"capacity {res.get('capacity_req_s')} req/s -> Poisson {rate:.2f} req/s for {a.duration_s:.0f} s",
            flush=True,
        )
        stats = asyncio.run(run_load(router, prefill, decode, rate, a, res))
        summarize(res, stats)
        res["kv_end"] = {"prefill": kv_clean(prefill), "decode": kv_clean(decode)}
        res["router_restarts"] = router.incarnation - 1
    finally:
        for p in reversed(procs):
            p.stop()
    base = os.path.splitext(a.output)[0]
    plot_rss(res["rss_samples"], res["faults"], base + "_rss.png")
    md = table(res)
    with open(base + ".md", "w") as f:
        f.write(md + "\n")
    write_json(a.output, res)
    print(md)
    ok = res["counts"]["lost"] == 0 and res["kv_end"]["prefill"]["clean"] and res["kv_end"]["decode"]["clean"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
