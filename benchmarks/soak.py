"""Soak with injected faults (issue #10): a 1P1D deployment behind `pdserve router`, driven
at a fraction (default 80 %) of its measured capacity for --duration-s (default 10 min)
while faults are injected on a schedule:

- decode SIGKILLed (its whole process group), restarted on the same port;
- prefill SIGKILLed, restarted on the same ports (HTTP and bootstrap);
- decode paused with SIGSTOP for --pause-s, then SIGCONT;
- prefill paused the same way.

Clients mix the three generation routes, streamed or not, and a share of them abort at a
random moment (--abort-prob). Every request is classified:

- succeeded: 200 with a whole answer (a stream that ends with `data: [DONE]`);
- failed: an error the client can read (a 4xx/5xx status with a JSON message, or a stream
  that ends with an error event and no [DONE]);
- aborted: the client itself went away (by design);
- lost: anything else (no answer within the client timeout, a connection error, a stream
  that just stops, garbage). Must be 0.

A probe (/generate, one token, every second through the router) measures when the router
serves again after each fault. RSS of every process (router, each server's HTTP and
scheduler process) is sampled every 2 s. At the end both KV pools must be free.

Not a CI test. Run it under the shared benchmark lock:

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/soak.py --output bench_out/soak.json

Writes the JSON, a Markdown table (.md) and an RSS plot (.png) next to --output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import httpx
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import free_port, write_json  # noqa: E402

from pdserve.launch.cli import wait_healthy  # noqa: E402

PY = [sys.executable, "-m", "pdserve.cli"]
# short disaggregation timeouts: a dead peer is noticed in seconds, not SGLang's 300 s
DISAGG_ENV = {
    "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "20",
    "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "20",
    "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "1",
    "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "3",
}
WORDS = ("river stone cloud garden engine lamp forest paper window silver morning harbor signal "
         "yellow market thunder pencil orbit candle meadow bridge winter copper island music").split()


# ---- processes ------------------------------------------------------------------------------
class Proc:
    """One server or the router, in its own process group, restartable on the same ports."""

    def __init__(self, name: str, cmd: list[str], url: str, ready: str, log_dir: str,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.cmd, self.url, self.ready = name, cmd, url, ready
        self.env = {**os.environ, **(env or {})}
        self.log_path = os.path.join(log_dir, f"soak-{name}.log")
        self.proc: subprocess.Popen | None = None
        self.incarnation = 0

    def start(self, timeout: float = 300) -> float:
        t0 = time.time()
        self.incarnation += 1
        log = open(self.log_path, "a")
        log.write(f"\n==== start {self.incarnation} at {time.strftime('%H:%M:%S')} ====\n")
        log.flush()
        self.proc = subprocess.Popen(self.cmd, start_new_session=True, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        wait_healthy(self.url, self.proc, time.time() + timeout, self.ready)
        return time.time() - t0

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def rss(self) -> dict[str, int]:
        """RSS of this process and each child, named `<name>` and `<name>.<child kind>`."""
        out: dict[str, int] = {}
        if self.proc is None or self.proc.poll() is not None:
            return out
        try:
            root = psutil.Process(self.proc.pid)
            out[self.name] = root.memory_info().rss
            for c in root.children(recursive=True):
                cmd = " ".join(c.cmdline())
                kind = "scheduler" if "scheduler_process" in cmd else "tp_worker" if "tp_worker" in cmd else str(c.pid)
                out[f"{self.name}.{kind}"] = out.get(f"{self.name}.{kind}", 0) + c.memory_info().rss
        except psutil.Error:
            pass
        return out


def deployment(log_dir: str) -> tuple[Proc, Proc, Proc]:
    p_port, d_port, r_port, boot = free_port(), free_port(), free_port(), free_port()
    common = ["--dtype", "float32", "--max-total-tokens", "16384", "--disaggregation-transfer-backend", "tcp",
              "--log-level", "warning"]
    prefill = Proc("prefill", PY + ["serve", "--port", str(p_port), "--disaggregation-mode", "prefill",
                                    "--disaggregation-bootstrap-port", str(boot), *common],
                   f"http://127.0.0.1:{p_port}", "/health", log_dir, DISAGG_ENV)
    decode = Proc("decode", PY + ["serve", "--port", str(d_port), "--disaggregation-mode", "decode", *common],
                  f"http://127.0.0.1:{d_port}", "/health", log_dir, {**DISAGG_ENV, "OMP_WAIT_POLICY": "PASSIVE"})
    router = Proc("router", PY + ["router", "--pd-disaggregation", "--prefill", prefill.url, str(boot),
                                  "--decode", decode.url, "--port", str(r_port), "--policy", "round_robin",
                                  "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
                                  "--health-check-timeout-secs", "2", "--cb-timeout-duration-secs", "2",
                                  "--request-timeout-secs", "120", "--retry-max-retries", "3",
                                  "--retry-max-backoff-ms", "2000", "--log-level", "warn"],
                  f"http://127.0.0.1:{r_port}", "/health", log_dir)
    return prefill, decode, router


# ---- clients --------------------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str  # succeeded | failed | aborted | lost
    route: str
    stream: bool
    t_start: float
    t_end: float
    detail: str = ""


@dataclass
class Stats:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, kind: str, since: float = 0.0) -> int:
        return sum(1 for o in self.outcomes if o.kind == kind and o.t_start >= since)


def make_request(rng: random.Random, i: int, max_new_tokens: int) -> tuple[str, dict, bool]:
    text = f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
    route = rng.choice(["/generate", "/v1/completions", "/v1/chat/completions"])
    stream = rng.random() < 0.6
    n = max_new_tokens
    if route == "/generate":
        body = {"text": text, "sampling_params": {"max_new_tokens": n, "temperature": 0.7, "ignore_eos": True}}
    elif route == "/v1/completions":
        body = {"prompt": text, "max_tokens": n, "temperature": 0.7, "ignore_eos": True}
    else:
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": n, "temperature": 0.7,
                "ignore_eos": True}
    body["stream"] = stream
    return route, body, stream


def _has_message(data: bytes) -> str | None:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(obj, dict):
        err = obj.get("error")
        msg = err.get("message") if isinstance(err, dict) else obj.get("message") or err
        if isinstance(msg, str) and msg:
            return msg
    return None


async def one_request(session: aiohttp.ClientSession, url: str, route: str, body: dict, stream: bool,
                      timeout_s: float) -> tuple[str, str]:
    """(kind, detail) of one request, never raising (except for cancellation)."""
    try:
        async with session.post(url + route, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            if r.status != 200:
                data = await r.read()
                msg = _has_message(data)
                return ("failed", f"{r.status}: {msg[:120]}") if msg else ("lost", f"{r.status} without a message")
            if not stream:
                data = await r.read()
                try:
                    obj = json.loads(data)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return "lost", "200 with a body that is not JSON"
                ok = ("text" in obj) if route == "/generate" else bool(obj.get("choices"))
                return ("succeeded", "") if ok else ("lost", "200 without an answer")
            last = None
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    ev, buf = buf.split(b"\n\n", 1)
                    ev = ev.strip()
                    if ev.startswith(b"data:"):
                        last = ev[5:].strip()
            if last == b"[DONE]":
                return "succeeded", ""
            if last is not None:
                try:
                    err = json.loads(last).get("error")
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    err = None
                if isinstance(err, dict) and err.get("message"):
                    return "failed", f"stream error event: {err['message'][:120]}"
            return "lost", "stream ended without [DONE] or an error event"
    except asyncio.TimeoutError:
        return "lost", f"no answer within {timeout_s} s"
    except (aiohttp.ClientError, OSError) as e:
        return "lost", f"{type(e).__name__}: {e}"


async def client_task(session, url, rng, i, a, stats: Stats) -> None:
    route, body, stream = make_request(rng, i, a.max_new_tokens)
    t0 = time.time()
    abort_after = rng.uniform(0.05, 3.0) if rng.random() < a.abort_prob else None
    task = asyncio.ensure_future(one_request(session, url, route, body, stream, a.client_timeout_s))
    if abort_after is not None:
        done, _ = await asyncio.wait({task}, timeout=abort_after)
        if not done:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            stats.outcomes.append(Outcome("aborted", route, stream, t0, time.time()))
            return
    kind, detail = await task
    stats.outcomes.append(Outcome(kind, route, stream, t0, time.time(), detail))


async def closed_loop(url: str, concurrency: int, seconds: float, a) -> float:
    """Completed requests per second with `concurrency` clients back to back."""
    rng = random.Random(7)
    done = 0
    stop_at = time.time() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker(k: int) -> None:
            nonlocal done
            i = 0
            while time.time() < stop_at:
                route, body, stream = make_request(rng, 10_000_000 + k * 100_000 + i, a.max_new_tokens)
                kind, detail = await one_request(session, url, route, body, stream, a.client_timeout_s)
                if kind == "succeeded":
                    done += 1
                else:
                    print(f"capacity run: {kind} {detail}", flush=True)
                i += 1

        t0 = time.time()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return done / (time.time() - t0)


# ---- the run --------------------------------------------------------------------------------
async def probe_loop(url: str, stop: asyncio.Event, probes: list[tuple[float, bool]]) -> None:
    body = {"text": "ping", "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            t = time.time()
            try:
                async with session.post(url + "/generate", json=body, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                ok = False
            probes.append((t, ok))
            await asyncio.sleep(max(0.0, 1.0 - (time.time() - t)))


async def rss_loop(procs: list[Proc], stop: asyncio.Event, samples: list[dict], t0: float) -> None:
    while not stop.is_set():
        row = {"t": round(time.time() - t0, 1)}
        for p in procs:
            for k, v in p.rss().items():
                row[f"{k}#{p.incarnation}"] = v
        samples.append(row)
        await asyncio.sleep(2.0)


async def fault_schedule(prefill: Proc, decode: Proc, a, t0: float, faults: list[dict]) -> None:
    plan = [(0.12, "kill", decode), (0.34, "kill", prefill), (0.56, "pause", decode), (0.78, "pause", prefill)]
    loop = asyncio.get_running_loop()
    for frac, kind, proc in plan:
        at = t0 + frac * a.duration_s
        await asyncio.sleep(max(0.0, at - time.time()))
        f: dict = {"kind": kind, "target": proc.name, "at_s": round(time.time() - t0, 1)}
        if kind == "kill":
            proc.kill()
            f["t_fault"] = time.time()
            await asyncio.sleep(a.down_s)
            for attempt in range(3):  # a start that fails (a port still held) is retried
                try:
                    f["restart_s"] = round(await loop.run_in_executor(None, proc.start), 1)
                    break
                except RuntimeError as e:
                    f.setdefault("restart_errors", []).append(str(e)[:200])
                    await asyncio.sleep(5)
            f["t_back"] = time.time()  # the process answers /health again
        else:
            proc.signal(signal.SIGSTOP)
            f["t_fault"] = time.time()
            await asyncio.sleep(a.pause_s)
            proc.signal(signal.SIGCONT)
            f["t_back"] = time.time()
        faults.append(f)
        print(f"[{f['at_s']:6.1f}s] {kind} {proc.name}", flush=True)


def recovery(faults: list[dict], probes: list[tuple[float, bool]]) -> None:
    """Per fault: the first successful probe sent after the process was back (restarted or
    resumed), and the gap since the fault itself."""
    for f in faults:
        after = [t for t, ok in probes if ok and t >= f["t_back"]]
        f["serving_again_after_back_s"] = round(after[0] - f["t_back"], 2) if after else None
        f["serving_again_after_fault_s"] = round(after[0] - f["t_fault"], 2) if after else None
        failed = [t for t, ok in probes if not ok and f["t_fault"] <= t]
        f["probes_failed"] = sum(1 for t in failed if not after or t < after[0])


async def run_load(router: Proc, prefill: Proc, decode: Proc, rate: float, a, res: dict) -> Stats:
    stats = Stats()
    rng = random.Random(a.seed)
    stop = asyncio.Event()
    probes: list[tuple[float, bool]] = []
    samples: list[dict] = []
    faults: list[dict] = []
    t0 = time.time()
    bg = [asyncio.ensure_future(probe_loop(router.url, stop, probes)),
          asyncio.ensure_future(rss_loop([router, prefill, decode], stop, samples, t0))]
    sched = asyncio.ensure_future(fault_schedule(prefill, decode, a, t0, faults))
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
            if i % 200 == 0:
                print(f"[{time.time() - t0:6.1f}s] sent {i}, in flight {len(tasks)}, "
                      f"ok {stats.count('succeeded')}, failed {stats.count('failed')}, "
                      f"lost {stats.count('lost')}", flush=True)
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
    res["probes"] = {"sent": len(probes), "ok": sum(ok for _, ok in probes)}
    return stats


def kv_clean(proc: Proc, timeout: float = 60) -> dict:
    queues = ("num_running_reqs", "num_waiting_reqs", "prealloc_queue_len", "transfer_queue_len",
              "bootstrap_queue_len", "inflight_queue_len")
    deadline = time.time() + timeout
    while True:
        try:
            ld = httpx.get(proc.url + "/get_load", timeout=10).json()
        except (httpx.HTTPError, ValueError) as e:
            if time.time() > deadline:
                return {"clean": False, "error": f"{type(e).__name__}: {e}"}
            time.sleep(1)
            continue
        clean = ld["num_used_pages"] == 0 and all(ld.get(k, 0) == 0 for k in queues)
        if clean or time.time() > deadline:
            return {"clean": clean, **{k: ld.get(k) for k in ("num_used_pages", *queues, "num_failed_transfers")}}
        time.sleep(0.5)


def rss_summary(samples: list[dict]) -> dict:
    """Per process incarnation: first (after 30 s of load, or its first sample), last, max RSS in MiB."""
    series: dict[str, list[tuple[float, int]]] = {}
    for row in samples:
        for k, v in row.items():
            if k != "t":
                series.setdefault(k, []).append((row["t"], v))
    out = {}
    for k, pts in series.items():
        warm = [v for t, v in pts if t >= pts[0][0] + 30] or [pts[0][1]]
        out[k] = {"from_s": pts[0][0], "to_s": pts[-1][0], "first_mib": round(warm[0] / 2**20, 1),
                  "last_mib": round(pts[-1][1] / 2**20, 1), "max_mib": round(max(v for _, v in pts) / 2**20, 1),
                  "growth_mib": round((pts[-1][1] - warm[0]) / 2**20, 1)}
    return out


def plot_rss(samples: list[dict], faults: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, int]]] = {}
    for row in samples:
        for k, v in row.items():
            if k != "t":
                series.setdefault(k, []).append((row["t"], v))
    fig, ax = plt.subplots(figsize=(11, 5))
    for k, pts in sorted(series.items()):
        ax.plot([t for t, _ in pts], [v / 2**20 for _, v in pts], label=k, linewidth=1)
    for f in faults:
        ax.axvline(f["at_s"], color="grey", linestyle=":", linewidth=1)
        ax.text(f["at_s"], ax.get_ylim()[1] * 0.98, f"{f['kind']} {f['target']}", rotation=90, va="top",
                fontsize=7)
    ax.set_xlabel("seconds into the soak")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("pdserve soak: RSS per process (name#incarnation)")
    ax.legend(fontsize=7, ncol=2, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(res: dict) -> str:
    c = res["counts"]
    lines = [f"| sent | succeeded | failed (clear error) | aborted by client | lost |",
             "|---:|---:|---:|---:|---:|",
             f"| {res['sent']} | {c['succeeded']} | {c['failed']} | {c['aborted']} | **{c['lost']}** |", "",
             "| fault | at (s) | restart (s) | serving again after the process is back (s) | "
             "after the fault (s) | probes failed |", "|---|---:|---:|---:|---:|---:|"]
    for f in res["faults"]:
        lines.append(f"| {f['kind']} {f['target']} | {f['at_s']} | {f.get('restart_s', '-')} | "
                     f"{f['serving_again_after_back_s']} | {f['serving_again_after_fault_s']} | {f['probes_failed']} |")
    lines += ["", "| process#incarnation | seconds | RSS first (MiB) | last | max | growth |",
              "|---|---|---:|---:|---:|---:|"]
    for k, s in sorted(res["rss"].items()):
        lines.append(f"| {k} | {s['from_s']}–{s['to_s']} | {s['first_mib']} | {s['last_mib']} | {s['max_mib']} | "
                     f"{s['growth_mib']:+} |")
    lines += ["", f"KV pools at the end: prefill {res['kv_end']['prefill']}, decode {res['kv_end']['decode']}"]
    return "\n".join(lines)


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
    ap.add_argument("--down-s", type=float, default=3.0, help="seconds a killed server stays down")
    ap.add_argument("--pause-s", type=float, default=10.0, help="seconds a paused server stays stopped")
    ap.add_argument("--client-timeout-s", type=float, default=200.0, help="a request with no answer by then is lost")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    out_dir = os.path.dirname(a.output) or "."
    os.makedirs(out_dir, exist_ok=True)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(a),
                 "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                          text=True).stdout.strip()}
    prefill, decode, router = deployment(out_dir)
    procs = [prefill, decode, router]
    # SIGTERM (timeout, Ctrl-C of a wrapper) still stops the servers: they run in their own sessions
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for p in procs:
            p.start()
        httpx.post(router.url + "/generate", json={"text": "warm up", "sampling_params": {"max_new_tokens": 4}},
                   timeout=120).raise_for_status()
        if a.rate is None:
            cap = asyncio.run(closed_loop(router.url, a.capacity_concurrency, a.capacity_s, a))
            res["capacity_req_s"] = round(cap, 3)
            rate = cap * a.load_fraction
        else:
            rate = a.rate
        res["rate_req_s"] = round(rate, 3)
        print(f"capacity {res.get('capacity_req_s')} req/s -> Poisson {rate:.2f} req/s for {a.duration_s:.0f} s",
              flush=True)
        stats = asyncio.run(run_load(router, prefill, decode, rate, a, res))
        res["counts"] = {k: stats.count(k) for k in ("succeeded", "failed", "aborted", "lost")}
        res["lost_details"] = [o.detail for o in stats.outcomes if o.kind == "lost"][:50]
        failed: dict[str, int] = {}
        for o in stats.outcomes:
            if o.kind == "failed":
                key = o.detail.split(":", 1)[0] + ": " + o.detail.split(":", 1)[-1][:70]
                failed[key] = failed.get(key, 0) + 1
        res["failed_kinds"] = dict(sorted(failed.items(), key=lambda kv: -kv[1])[:20])
        res["kv_end"] = {"prefill": kv_clean(prefill), "decode": kv_clean(decode)}
        res["rss"] = rss_summary(res["rss_samples"])
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
