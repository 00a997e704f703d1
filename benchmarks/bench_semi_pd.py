"""Semi-PD against the other deployments on the same cores, model and workload (issue #13).

Deployments (each alone on the machine, one after the other):
  colocated        `pdserve serve` (mode null)
  pd_disjoint      1P1D, `pdserve launch --cpu-split disjoint` (one core each, shm transfer)
  semi_pd_fixed    `pdserve serve --enable-semi-pd` at --split (default 70/30, the server's)
  semi_pd_slo      `pdserve serve --enable-semi-pd --enable-slo-aware` from --split, the
                   controller's targets = the benchmark's SLOs, its interval --slo-interval s,
                   its window --slo-window s
A Semi-PD name may carry its own split and core policy: `semi_pd_fixed@70/30`,
`semi_pd_slo+overlap`, `semi_pd_fixed@70/30+weighted` (PDSERVE_SEMI_PD_CORES=<policy>,
docs/semi_pd.md "What a percentage means on CPU"), and a starting prefill cap in tokens:
`semi_pd_fixed@80/20~128` (PDSERVE_SEMI_PD_PREFILL_CAP, docs/semi_pd.md "The prefill cap").

Workloads (--workload):
  poisson     `pdserve bench --dataset-name mixed` (128-token prompts, 1 in 8 of 768 tokens,
              48 output tokens), Poisson arrivals, for each rate of --rates, with its own
              seed per rate (before session 4 every rate sent the same prompts, which
              co-located and 1P1D then found in their prefix cache; --same-prompts).
              --no-prefix-cache: co-located and 1P1D with --disable-radix-cache, as Semi-PD.
  mix_shift   Poisson arrivals at each rate of --rates; the first half of the requests have
              short prompts and long outputs (--shift-a, default 64 in / 128 out), the second
              half long prompts and short outputs (--shift-b, default 512 in / 8 out). For
              Semi-PD the split is sampled every second (the split-over-time plot).

SLOs: --slo-factor (default 3) x the TTFT / TPOT of one request of the workload's longest
prompt class (768 tokens, 48 output tokens) alone on the co-located server, measured first
(median of 3; the 128-token class is measured and recorded too), or given with --slo-ms. The
basis is the longest class so that every request, alone, meets its SLO with the same margin;
until session 5 it was the 128-token class at 7.5x, a TTFT target a lone 768-token prompt
barely met, so every deployment's attainment was capped by its long prompts. The factor is
3, not the Semi-PD paper's 7.5x / 10x (of one request alone, on GPUs, where batching a decode
step costs little): 7.5x a lone 768-token prompt is a ~9 s TTFT target that separates the
deployments only once a queue diverges (docs/benchmarks.md "Semi-PD, session 6"). A request
meets its SLO if its TTFT and its TPOT both do. --plot --rescore-slo-ms T,P scores saved runs
at other targets too (from the per-request records). Reported per deployment and rate: TTFT and TPOT
p50 / p99, SLO attainment; the highest rate at which attainment stays >= 90 %; RSS and PSS of
the deployment's process tree (RSS counts shared memory once per process, PSS splits it);
the load average at each rate. --measure-switch: the time of a split change, in place (re-pin
between two steps) and by process rotation (standby workers), each under one streaming
request, with the longest gap between its tokens.

Each invocation should stay under ~8 min (it holds the exclusive benchmark lock), so run one
workload and one or two deployments per invocation and merge them with --plot:

    benchlock.sh x .venv/bin/python benchmarks/bench_semi_pd.py --measure-slo-only --output bench_out/sp_slo.json
    benchlock.sh x .venv/bin/python benchmarks/bench_semi_pd.py --workload poisson --no-prefix-cache \
        --deployments colocated --slo-ms 3053,56 --output bench_out/sp_poisson_a.json
    benchlock.sh x .venv/bin/python benchmarks/bench_semi_pd.py --workload poisson \
        --deployments semi_pd_slo --slo-ms 3053,56 --output bench_out/sp_poisson_b.json
    .venv/bin/python benchmarks/bench_semi_pd.py --plot docs/img --rescore-slo-ms 7631,140 'bench_out/sp_poisson_*.json'

(--slo-ms: the SLOs the first command printed, so every invocation scores against the same.)
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import random
import subprocess
import sys
import threading
import time

import httpx
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import free_port, mixed_bench_cmd, stop_server, stream_times, write_json  # noqa: E402
from bench_pd import _get, start, wait_quiet  # noqa: E402

SHORT_INPUT, LONG_INPUT, OUTPUT_LEN = 128, 768, 48  # the poisson workload's prompt classes, output
DEPLOYMENTS = ("colocated", "pd_disjoint", "semi_pd_fixed", "semi_pd_slo")
LABELS = {
    "colocated": "co-located (mode null)",
    "pd_disjoint": "1P1D, disjoint cores",
    "semi_pd_fixed": "Semi-PD fixed",
    "semi_pd_slo": "Semi-PD SLO-aware",
}


def parse_deployment(name: str, default_split: str) -> tuple[str, str, str | None]:
    """`kind[@P/D][+policy][~cap]` -> (kind, split, core policy or None); a `~cap` (a starting
    prefill cap in tokens, $PDSERVE_SEMI_PD_PREFILL_CAP) is read by `deploy`."""
    name = name.partition("~")[0]
    base, _, policy = name.partition("+")
    kind, _, split = base.partition("@")
    if kind not in DEPLOYMENTS:
        raise SystemExit(f"unknown deployment {name!r}: one of {DEPLOYMENTS}, e.g. semi_pd_fixed@70/30+overlap")
    return kind, split or default_split, policy or None


def deploy(name: str, a, slo: tuple[float, float], extra: list[str] = ()) -> tuple[str, subprocess.Popen]:
    kind, split, policy = parse_deployment(name, a.split)
    py = [sys.executable, "-m", "pdserve.cli"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    common = ["--port", str(port), "--dtype", "float32", "--max-total-tokens", str(a.max_total_tokens)]
    no_cache = a.no_prefix_cache and not kind.startswith("semi_pd")
    pre, dec = (int(x) for x in split.split("/"))
    if kind == "colocated":
        return url, start(py + ["serve", *common, *(["--disable-radix-cache"] if no_cache else [])], url, "/health")
    if kind == "pd_disjoint":
        return url, start(
            py
            + [
                "launch",
                *common,
                "--transfer-backend",
                "shm",
                "--bootstrap-port-base",
                str(free_port()),
                "--cpu-split",
                "disjoint",
                *(["--server-args=--disable-radix-cache"] if no_cache else []),
            ],
            url,
            "/readiness",
        )
    semi = ["--enable-semi-pd", "--initial-prefill-sm", str(pre), "--initial-decode-sm", str(dec), *extra]
    if kind == "semi_pd_slo":
        semi += [
            "--enable-slo-aware",
            "--slo-ttft-target",
            f"{slo[0]:.1f}",
            "--slo-tpot-target",
            f"{slo[1]:.1f}",
            "--slo-monitoring-interval",
            str(a.slo_interval),
            "--slo-window-size",
            str(max(a.slo_window, a.slo_interval)),
        ]
    cap = name.partition("~")[2]
    env = {"PDSERVE_SEMI_PD_CORES": policy, "PDSERVE_SEMI_PD_PREFILL_CAP": cap or None}
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v:
            os.environ[k] = v  # the server's processes inherit it
    try:
        return url, start(py + ["serve", *common, *semi], url, "/health")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def memory_mib(proc: subprocess.Popen) -> dict:
    """RSS and PSS of the deployment's process tree, MiB. RSS counts a shared page in every
    process that maps it (the Semi-PD weights and KV pool once per worker), PSS splits it."""
    rss = pss = 0
    n = 0
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                m = p.memory_full_info()
                rss, pss, n = rss + m.rss, pss + m.pss, n + 1
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return {"rss_mib": rss / 2**20, "pss_mib": pss / 2**20, "processes": n}


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_poisson(url: str, rate: float, out_file: str, a, slo: tuple[float, float], seed: int = 1) -> dict:
    cmd = mixed_bench_cmd(
        url,
        num_prompts=a.num_prompts,
        output_len=OUTPUT_LEN,
        input_len=SHORT_INPUT,
        long_input_len=LONG_INPUT,
        rate=rate,
        out_file=out_file,
        warmup=1,
        slo_ms=slo,
        seed=seed,
    )
    subprocess.run(cmd, check=True, timeout=1800, stdout=subprocess.DEVNULL)
    with open(out_file) as f:
        m = json.load(f)
    return {
        "ttft_p50_ms": _get(m, "ttft_ms", "median"),
        "ttft_p99_ms": _get(m, "ttft_ms", "p99"),
        "tpot_p50_ms": _get(m, "tpot_ms", "median"),
        "tpot_p99_ms": _get(m, "tpot_ms", "p99"),
        "attainment": _get(m, "slo_attainment"),
        "goodput": _get(m, "goodput"),
        "failed": _get(m, "failed"),
    }


def shift_requests(a, rate: float) -> list[tuple[float, str, list[int], int]]:
    """(arrival s, phase, prompt ids, output tokens): Poisson arrivals (seed 1), the first half
    of phase A's shape, the second half of phase B's, distinct prompts (no prefix hits)."""
    rng = random.Random(1)
    (ia, oa), (ib, ob) = (tuple(int(x) for x in v.split("/")) for v in (a.shift_a, a.shift_b))
    t, out = 0.0, []
    for k in range(a.num_prompts):
        phase, n_in, n_out = ("A", ia, oa) if k < a.num_prompts // 2 else ("B", ib, ob)
        ids = [(k * 7919 + j * 31 + int(rate * 1000)) % 40000 + 100 for j in range(n_in)]
        out.append((t, phase, ids, n_out))
        t += rng.expovariate(rate)
    return out


async def _one(client: httpx.AsyncClient, url: str, t0: float, req, rec: list) -> None:
    at, phase, ids, n_out = req
    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    sent = time.perf_counter()
    times: list[float] = []
    n_prev, err = 0, None
    body = {"input_ids": ids, "stream": True, "sampling_params": {"max_new_tokens": n_out, "ignore_eos": True}}
    body["sampling_params"]["temperature"] = 0
    try:
        async with client.stream("POST", url + "/generate", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                n = json.loads(line[6:])["meta_info"]["completion_tokens"]
                now = time.perf_counter()
                times.extend([now] * (n - n_prev))
                n_prev = n
    except Exception as e:  # noqa: BLE001 (a failed request is counted, not raised)
        err = repr(e)
    ttft = (times[0] - sent) * 1000 if times else float("nan")
    tpot = (times[-1] - times[0]) / (len(times) - 1) * 1000 if len(times) > 1 else 0.0
    rec.append(
        {"arrival_s": sent - t0, "phase": phase, "ttft_ms": ttft, "tpot_ms": tpot, "tokens": len(times), "error": err}
    )


async def _sample_split(url: str, t0: float, samples: list, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=10) as c:
        while not stop.is_set():
            try:
                st = (await c.get(url + "/semi_pd/status")).json()
                sp = st["current_split"]
                samples.append((time.perf_counter() - t0, sp["prefill_percentage"], sp["decode_percentage"]))
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass


def summarize(recs: list[dict], slo: tuple[float, float]) -> dict:
    ok = [r for r in recs if r["error"] is None]
    good = [r for r in ok if r["ttft_ms"] <= slo[0] and r["tpot_ms"] <= slo[1]]
    ttft = [r["ttft_ms"] for r in ok]
    tpot = [r["tpot_ms"] for r in ok if r["tokens"] > 1]
    return {
        "ttft_p50_ms": _pct(ttft, 0.5),
        "ttft_p99_ms": _pct(ttft, 0.99),
        "tpot_p50_ms": _pct(tpot, 0.5),
        "tpot_p99_ms": _pct(tpot, 0.99),
        "attainment": len(good) / len(recs) if recs else float("nan"),
        "failed": len(recs) - len(ok),
    }


def run_mix_shift(url: str, rate: float, a, slo: tuple[float, float], semi: bool) -> dict:
    reqs = shift_requests(a, rate)

    async def go() -> tuple[list, list]:
        rec: list = []
        samples: list = []
        stop = asyncio.Event()
        t0 = time.perf_counter()
        limits = httpx.Limits(max_connections=a.num_prompts + 4)
        async with httpx.AsyncClient(timeout=900, limits=limits) as c:
            sampler = asyncio.create_task(_sample_split(url, t0, samples, stop)) if semi else None
            await asyncio.gather(*(_one(c, url, t0, r, rec) for r in reqs))
            stop.set()
            if sampler is not None:
                await sampler
        return rec, samples

    rec, samples = asyncio.run(go())
    rec.sort(key=lambda r: r["arrival_s"])
    out = summarize(rec, slo)
    for ph in ("A", "B"):
        out[f"phase_{ph}"] = summarize([r for r in rec if r["phase"] == ph], slo)
    out["shift_at_s"] = next((r["arrival_s"] for r in rec if r["phase"] == "B"), None)
    out["split_samples"] = samples
    out["requests"] = rec
    return out


def unloaded_latency(url: str, input_len: int, n: int = 3) -> tuple[float, float]:
    """Median TTFT and TPOT (ms) of one `input_len`-token prompt / OUTPUT_LEN-token output,
    alone, distinct prompts (no prefix-cache hit)."""
    ttfts, tpots = [], []
    for i in range(n):
        ids = [(i * 7919 + j * 31 + input_len) % 40000 + 100 for j in range(input_len)]
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": OUTPUT_LEN, "ignore_eos": True}}
        body["sampling_params"]["temperature"] = 0
        ttft, times = stream_times(url, body)
        ttfts.append(ttft * 1000)
        tpots.append((times[-1] - times[0]) / max(1, len(times) - 1) * 1000)
    return sorted(ttfts)[n // 2], sorted(tpots)[n // 2]


SWITCH_SPLITS = ((70, 30), (30, 70), (50, 50), (60, 40), (40, 60))


def measure_switch(a, mechanism: str) -> dict:
    """Split changes on an otherwise idle Semi-PD server while one request streams 256
    tokens: the time each change took to take effect, and the stream's longest token gap."""
    url, proc = deploy("semi_pd_fixed", a, (0, 0), ["--semi-pd-switch", mechanism])
    try:
        stream_times(url, {"text": "warm up", "sampling_params": {"max_new_tokens": 4}})
        wait_quiet([proc])
        box: dict = {}

        def streamer() -> None:
            body = {
                "input_ids": list(range(1000, 1128)),
                "sampling_params": {"max_new_tokens": 256, "ignore_eos": True, "temperature": 0},
            }
            box["ttft"], box["times"] = stream_times(url, body)

        th = threading.Thread(target=streamer)
        th.start()
        time.sleep(1.0)
        splits = SWITCH_SPLITS[:3] if mechanism == "rotation" else SWITCH_SPLITS
        with httpx.Client(timeout=120) as c:
            for pre, dec in splits:
                n0 = c.get(url + "/semi_pd/status").json()["process_rotation_status"]["num_changes"]
                c.post(url + "/semi_pd/reallocate", json={"prefill_percentage": pre, "decode_percentage": dec})
                deadline = time.time() + 120
                while time.time() < deadline:  # a rotation completes in the background
                    st = c.get(url + "/semi_pd/status").json()["process_rotation_status"]
                    if st["num_changes"] > n0:
                        break
                    time.sleep(0.05)
                time.sleep(0.3)
            st = c.get(url + "/semi_pd/status").json()["process_rotation_status"]
        th.join()
        times = box.get("times", [])
        gaps = [(y - x) * 1000 for x, y in zip(times, times[1:])]
        return {
            "mechanism": mechanism,
            "splits": [f"{p}/{d}" for p, d in splits],
            "rotation_seconds": st["rotation_seconds"],
            "pin_seconds": st["pin_seconds"],
            "stream_tokens": len(times),
            "stream_gap_p50_ms": _pct(gaps, 0.5),
            "stream_gap_max_ms": max(gaps) if gaps else float("nan"),
        }
    finally:
        stop_server(proc)


def plot(out_dir: str, files: list[str], suffix: str = "") -> None:
    """attainment vs rate per workload (all deployments of the given JSON files), and the
    split over time of the mix-shift runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for pat in files:
        for fn in sorted(glob.glob(pat)):
            with open(fn) as f:
                r = json.load(f)
            if "deployments" in r:  # not a per-rate `pdserve bench` file the glob also matched
                runs.append(r)
    os.makedirs(out_dir, exist_ok=True)
    for wl in ("poisson", "mix_shift"):
        mine = [r for r in runs if r.get("workload", "poisson") == wl]
        if not mine:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in mine:
            for name, d in r["deployments"].items():
                xs = sorted(float(x) for x in d["rates"])
                label = name
                if wl == "poisson" and not r.get("fresh_prompts", False) and not name.startswith("semi_pd"):
                    label += " (same prompts each rate: prefix-cache hits)"
                ax.plot(xs, [d["rates"][_key(d, x)]["attainment"] for x in xs], marker="o", label=label)
        ax.axhline(0.9, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("SLO attainment")
        slo = mine[0]
        ax.set_title(f"{wl}: TTFT<={slo['slo_ttft_ms']:.0f} ms, TPOT<={slo['slo_tpot_ms']:.0f} ms (2 cores)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fn = os.path.join(out_dir, f"semi_pd_attainment_{wl}{suffix}.png")
        fig.savefig(fn, dpi=110)
        plt.close(fig)
        print("wrote", fn)
    shift = [r for r in runs if r.get("workload") == "mix_shift"]
    series = [
        (name, rate, m)
        for r in shift
        for name, d in r["deployments"].items()
        if name.startswith("semi_pd")
        for rate, m in d["rates"].items()
        if m.get("split_samples")
    ]
    if series:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, rate, m in series:
            xs = [s[0] for s in m["split_samples"]]
            ax.step(xs, [s[1] for s in m["split_samples"]], where="post", label=f"{name} @ {rate}/s prefill %")
            if m.get("shift_at_s") is not None:
                ax.axvline(m["shift_at_s"], color="grey", ls=":", lw=0.8)
        ax.set_xlabel("time since the first request (s); dotted: first long-prompt request")
        ax.set_ylabel("prefill share (%)")
        ax.set_ylim(0, 100)
        ax.set_title("mix-shift: Semi-PD split over time")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fn = os.path.join(out_dir, f"semi_pd_split_mix_shift{suffix}.png")
        fig.savefig(fn, dpi=110)
        plt.close(fig)
        print("wrote", fn)


def markdown(files: list[str]) -> str:
    """The docs/benchmarks.md tables of the given JSON files: one row per deployment and rate."""
    out = []
    for pat in files:
        for fn in sorted(glob.glob(pat)):
            with open(fn) as f:
                r = json.load(f)
            if not r.get("deployments"):
                continue
            out.append(
                f"\n{fn}: {r.get('workload', 'poisson')}, {r['num_prompts']} requests per rate, {r['date']}, "
                f"load average {r['loadavg_start'][0]:.1f} at the start\n"
            )
            out.append("| deployment | rate/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | attainment | load |")
            out.append("|---|---|---|---|---|---|")
            for name, d in r["deployments"].items():
                for rate, m in d["rates"].items():
                    row = (
                        f"| {name} | {float(rate):g} | {m['ttft_p50_ms']:.0f} / {m['ttft_p99_ms']:.0f} | "
                        f"{m['tpot_p50_ms']:.0f} / {m['tpot_p99_ms']:.0f} | {m['attainment']:.2f} | "
                        f"{m['loadavg'][0]:.1f} |"
                    )
                    out.append(row)
                    for ph in ("A", "B"):
                        p = m.get(f"phase_{ph}")
                        if p:
                            out.append(
                                f"| &nbsp;&nbsp;phase {ph} | | {p['ttft_p50_ms']:.0f} / {p['ttft_p99_ms']:.0f} | "
                                f"{p['tpot_p50_ms']:.0f} / {p['tpot_p99_ms']:.0f} | {p['attainment']:.2f} | |"
                            )
            out.append("")
            for name, d in r["deployments"].items():
                mi, ml = d.get("memory_idle", {}), d.get("memory_loaded", {})
                extra = ""
                if "split_history" in d:
                    extra = f"; splits {' -> '.join(c['split'] for c in d['split_history'])}"
                    if d.get("controller"):
                        extra += f"; controller {json.dumps(d['controller'])}"
                out.append(
                    f"- {name}: highest rate with >= 90 %: {d['max_rate_90pct']}; RSS / PSS idle "
                    f"{mi.get('rss_mib', 0):.0f} / {mi.get('pss_mib', 0):.0f} MiB, loaded "
                    f"{ml.get('rss_mib', 0):.0f} / {ml.get('pss_mib', 0):.0f} MiB ({mi.get('processes', 0)} processes)"
                    f"{extra}"
                )
    return "\n".join(out)


def _key(d: dict, x: float) -> str:
    return next(k for k in d["rates"] if float(k) == x)


def _request_latencies(fn: str, name: str, rate: str, m: dict) -> list[tuple[float, float | None]] | None:
    """(TTFT ms, TPOT ms or None) of every request of one deployment and rate, a failed one as
    (inf, None); from the mix-shift records, or from the poisson run's `pdserve bench` JSON
    (`<output>.<deployment>.<rate>.json`, TPOT as `pdserve bench` computes it). None if absent."""
    if "requests" in m:
        return [
            (r["ttft_ms"], r["tpot_ms"] if r["tokens"] > 1 else None) if r["error"] is None else (float("inf"), None)
            for r in m["requests"]
        ]
    path = f"{fn}.{name.replace('/', '-')}.{rate}.json"
    if not os.path.exists(path):
        return None
    with open(path) as f:
        reqs = json.load(f)["runs"][0]["requests"]
    out = []
    for r in reqs:
        if not r["success"]:
            out.append((float("inf"), None))
            continue
        n = r["output_len"]
        out.append((r["ttft_s"] * 1000, (r["latency_s"] - r["ttft_s"]) / (n - 1) * 1000 if n > 1 else None))
    return out


def attainment_at(lat: list[tuple[float, float | None]], slo: tuple[float, float]) -> float:
    good = sum(1 for t, p in lat if t <= slo[0] and (p is None or p <= slo[1]))
    return good / len(lat) if lat else float("nan")


def issue_measure(files: list[str], slos: list[tuple[float, float]]) -> str:
    """Per workload and SLO: each deployment's attainment by rate, the highest rate with >= 90 %
    ("highest"), the highest up to which every rate tried from the lowest stays >= 90 %
    ("stays"), and SLO-aware Semi-PD's highest over the best other deployment's (the issue's
    target: >= 1.3). Scored from the per-request records, so any SLO can be applied."""
    by_wl: dict[str, dict[str, dict[float, list]]] = {}
    for pat in files:
        for fn in sorted(glob.glob(pat)):
            with open(fn) as f:
                r = json.load(f)
            if "deployments" not in r:  # a per-rate `pdserve bench` file the glob also matched
                continue
            for name, d in r["deployments"].items():
                for rate, m in d["rates"].items():
                    lat = _request_latencies(fn, name, rate, m)
                    if lat is not None:
                        by_wl.setdefault(r.get("workload", "poisson"), {}).setdefault(name, {})[float(rate)] = lat
    out = []
    for wl, deps in by_wl.items():
        for slo in slos:
            out.append(f"\n{wl}, SLO TTFT <= {slo[0]:.0f} ms, TPOT <= {slo[1]:.0f} ms\n")
            rates = sorted({x for v in deps.values() for x in v})
            out.append("| deployment | " + " | ".join(f"{x:g}" for x in rates) + " | highest >= 90 % | stays >= 90 % |")
            out.append("|---|" + "---|" * (len(rates) + 2))
            best: dict[str, float] = {}
            for name, per in deps.items():
                att = {x: attainment_at(per[x], slo) for x in sorted(per)}
                ok = [x for x, v in att.items() if v >= 0.9]
                stays = 0.0
                for x, v in att.items():
                    if v < 0.9:
                        break
                    stays = x
                best[name] = max(ok) if ok else 0.0
                cells = " | ".join(f"{att[x]:.2f}" if x in att else "" for x in rates)
                out.append(f"| {name} | {cells} | {best[name]:g} | {stays:g} |")
            slo_aware = [v for k, v in best.items() if k.startswith("semi_pd_slo")]
            others = [v for k, v in best.items() if not k.startswith("semi_pd_slo")]
            if slo_aware and others:
                den = max(others)
                ratio = f"{max(slo_aware) / den:.2f}" if den > 0 else "undefined (no other deployment reaches 90 %)"
                out.append(f"\nSemi-PD SLO-aware / best other, highest rate >= 90 %: {ratio} (target >= 1.3)")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default="bench_out/semi_pd.json")
    ap.add_argument("--workload", choices=("poisson", "mix_shift"), default="poisson")
    ap.add_argument("--rates", default="0.5,1,2,3,4.5", help="Poisson request rates, comma-separated")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument(
        "--slo-factor",
        type=float,
        default=3.0,
        help="SLOs = this x the unloaded TTFT / TPOT of the longest prompt class, co-located (default %(default)s)",
    )
    ap.add_argument(
        "--split",
        default="70/30",
        help="Semi-PD's (initial) split, prefill/decode %% (default %(default)s, the server's --initial-prefill-sm/"
        "--initial-decode-sm; sessions 4-5 used 50/50, the only whole-core split under the `disjoint` policy)",
    )
    ap.add_argument("--slo-interval", type=float, default=5.0, help="SLO controller interval, s")
    ap.add_argument(
        "--slo-window",
        type=float,
        default=30.0,
        help="SLO metrics window, s (default %(default)s, the server's; 15 s held fewer than the controller's 5 "
        "samples at 0.25 req/s)",
    )
    ap.add_argument("--max-total-tokens", type=int, default=32768)
    ap.add_argument("--deployments", default=",".join(DEPLOYMENTS))
    ap.add_argument("--shift-a", default="64/128", help="mix_shift first half: prompt/output tokens")
    ap.add_argument("--shift-b", default="512/8", help="mix_shift second half: prompt/output tokens")
    ap.add_argument(
        "--same-prompts",
        dest="fresh_prompts",
        action="store_false",
        help="poisson: the same prompts (seed 1) at every rate, as before session 4; a deployment with a "
        "prefix cache then computes only the first rate's prompts (Semi-PD has none)",
    )
    ap.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="co-located and 1P1D with --disable-radix-cache (Semi-PD has no prefix cache)",
    )
    ap.add_argument("--measure-switch", action="store_true", help="time in-place and rotation split changes")
    ap.add_argument(
        "--plot", metavar="DIR", help="only plot the given JSON files (globs) into DIR and print their tables"
    )
    ap.add_argument("files", nargs="*")
    ap.add_argument("--plot-suffix", default="", help="appended to the PNG names (e.g. _s5: keep earlier figures)")
    ap.add_argument(
        "--slo-ms",
        default="",
        help="TTFT,TPOT targets in ms instead of --slo-factor x unloaded co-located (to compare with an earlier run)",
    )
    ap.add_argument(
        "--rescore-slo-ms",
        default="",
        metavar="T,P[;T,P...]",
        help="with --plot: also score the runs at these TTFT,TPOT targets (ms), from the per-request records",
    )
    ap.add_argument(
        "--measure-slo-only",
        action="store_true",
        help="only measure the unloaded co-located latencies and the SLOs they give, then stop",
    )
    a = ap.parse_args()
    if a.plot:
        print(markdown(a.files))
        slos = []
        for f in a.files[:1] if a.files else []:
            with open(sorted(glob.glob(f))[0]) as fh:
                r0 = json.load(fh)
            slos.append((r0["slo_ttft_ms"], r0["slo_tpot_ms"]))
        for v in filter(None, a.rescore_slo_ms.split(";")):
            t, p = (float(x) for x in v.split(","))
            slos.append((t, p))
        print(issue_measure(a.files, slos))
        plot(a.plot, a.files, a.plot_suffix)
        return 0
    rates = [float(r) for r in a.rates.split(",")]
    kinds = [k for k in a.deployments.split(",") if k]
    for k in kinds:
        parse_deployment(k, a.split)
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "workload": a.workload,
        "rates": rates,
        "num_prompts": a.num_prompts,
        "split": a.split,
        "fresh_prompts": a.fresh_prompts,
        "no_prefix_cache": a.no_prefix_cache,
        "cores": len(os.sched_getaffinity(0)),
        "loadavg_start": os.getloadavg(),
        "deployments": {},
    }
    if a.workload == "mix_shift":
        res.update(shift_a=a.shift_a, shift_b=a.shift_b)
    if a.slo_ms:
        slo = tuple(float(v) for v in a.slo_ms.split(","))
        res.update(slo_ttft_ms=slo[0], slo_tpot_ms=slo[1])
    else:  # the SLOs: a multiple of one request alone on the co-located server
        url, proc = deploy("colocated", a, (0, 0))
        try:
            stream_times(url, {"text": "warm up", "sampling_params": {"max_new_tokens": 4}})
            wait_quiet([proc])
            short = unloaded_latency(url, SHORT_INPUT)
            long = unloaded_latency(url, LONG_INPUT)
        finally:
            stop_server(proc)
        ttft0, tpot0 = long[0], max(long[1], short[1])  # the longest class; TPOT: the slower of the two
        slo = (a.slo_factor * ttft0, a.slo_factor * tpot0)
        res.update(
            unloaded={f"{SHORT_INPUT}": short, f"{LONG_INPUT}": long},
            unloaded_ttft_ms=ttft0,
            unloaded_tpot_ms=tpot0,
            slo_ttft_ms=slo[0],
            slo_tpot_ms=slo[1],
        )
        print(
            f"unloaded co-located, {OUTPUT_LEN} output tokens: {SHORT_INPUT}-token prompt TTFT {short[0]:.1f} ms, "
            f"TPOT {short[1]:.1f} ms; {LONG_INPUT}-token prompt TTFT {long[0]:.1f} ms, TPOT {long[1]:.1f} ms -> "
            f"SLO ({a.slo_factor:g}x) TTFT {slo[0]:.0f} ms, TPOT {slo[1]:.0f} ms",
            flush=True,
        )
        if a.measure_slo_only:
            res["slo_factor"] = a.slo_factor
            write_json(a.output, res)
            return 0
    res["slo_factor"] = a.slo_factor
    for name in kinds:
        url, proc = deploy(name, a, slo)
        semi = name.startswith("semi_pd")
        d: dict = {"rates": {}}
        try:
            stream_times(url, {"text": "warm up", "sampling_params": {"max_new_tokens": 4}})
            wait_quiet([proc])
            d["memory_idle"] = memory_mib(proc)
            for rate in rates:
                t = time.time()
                if a.workload == "poisson":
                    seed = 1 + rates.index(rate) if a.fresh_prompts else 1
                    m = run_poisson(url, rate, f"{a.output}.{name.replace('/', '-')}.{rate}.json", a, slo, seed)
                else:
                    m = run_mix_shift(url, rate, a, slo, semi)
                m["loadavg"] = os.getloadavg()
                m["seconds"] = time.time() - t
                if semi:  # where the split and the prefill cap stood at the end of the rate
                    prs = httpx.get(url + "/semi_pd/status", timeout=30).json()["process_rotation_status"]
                    m["split_end"] = prs["current_sm_allocation"]
                    m["prefill_cap_end"] = prs.get("prefill_cap_tokens")
                d["rates"][str(rate)] = m
                brief = {k: v for k, v in m.items() if k not in ("requests", "split_samples")}
                print(name, rate, brief, flush=True)
                mem = memory_mib(proc)  # after the rate's requests, pool pages touched
                if mem["pss_mib"] > d.get("memory_loaded", {}).get("pss_mib", 0):
                    d["memory_loaded"] = mem
            d["memory_after"] = memory_mib(proc)
            if semi:
                st = httpx.get(url + "/semi_pd/status", timeout=30).json()
                d["split_history"] = st["process_rotation_status"]["changes"]
                d["prefill_cap_history"] = st["process_rotation_status"].get("prefill_cap_changes", [])
                d["final_split"] = st["current_split"]
                if st.get("slo_controller_status"):
                    d["controller"] = st["slo_controller_status"]["statistics"]
                d["step_timing"] = st["step_timing"]
                d["plan"] = st["process_rotation_status"]["plan"]
                d["cpu_share"] = st["process_rotation_status"]["cpu_share"]
        finally:
            stop_server(proc)
        ok = [r for r in rates if d["rates"].get(str(r), {}).get("attainment", 0) >= 0.9]
        d["max_rate_90pct"] = max(ok) if ok else 0.0
        res["deployments"][name] = d
    if a.measure_switch:
        res["switch"] = {m: measure_switch(a, m) for m in ("in_place", "rotation")}
    res["loadavg_end"] = os.getloadavg()
    print(
        f"\n{a.workload}, {a.num_prompts} requests per rate; SLO TTFT <= {slo[0]:.0f} ms, TPOT <= {slo[1]:.0f} ms "
        f"({'--slo-ms' if a.slo_ms else f'{a.slo_factor:g}x unloaded co-located'}); load average at start {res['loadavg_start'][0]:.1f}"
    )
    print(f"{'deployment':<28}{'rate':>6}{'TTFT p50':>10}{'p99':>9}{'TPOT p50':>10}{'p99':>8}{'attain':>8}{'load':>6}")
    for name, d in res["deployments"].items():
        for r, m in d["rates"].items():
            print(
                f"{name:<28}{float(r):>6.2f}{m['ttft_p50_ms']:>10.0f}{m['ttft_p99_ms']:>9.0f}"
                f"{m['tpot_p50_ms']:>10.0f}{m['tpot_p99_ms']:>8.0f}{m['attainment']:>8.2f}{m['loadavg'][0]:>6.1f}"
            )
            for ph in ("A", "B"):
                if f"phase_{ph}" in m:
                    p = m[f"phase_{ph}"]
                    print(
                        f"{'  phase ' + ph:<28}{'':>6}{p['ttft_p50_ms']:>10.0f}{p['ttft_p99_ms']:>9.0f}"
                        f"{p['tpot_p50_ms']:>10.0f}{p['tpot_p99_ms']:>8.0f}{p['attainment']:>8.2f}"
                    )
        mem = d.get("memory_idle", {})
        print(
            f"{name:<28} highest rate with >= 90 % attainment: {d['max_rate_90pct']}; "
            f"idle RSS {mem.get('rss_mib', 0):.0f} MiB, PSS {mem.get('pss_mib', 0):.0f} MiB"
        )
        if "split_history" in d:
            print(f"{'':<28} split changes: {[c['split'] for c in d['split_history']]}")
            caps = [c["tokens"] for c in d.get("prefill_cap_history", [])]
            print(f"{'':<28} prefill cap changes (tokens, None: whole chunks): {caps}")
    for m, sw in res.get("switch", {}).items():
        print(
            f"switch {m}: rotation s {sw['rotation_seconds']}, pin s {sw['pin_seconds']}, "
            f"stream gap p50 {sw['stream_gap_p50_ms']:.0f} ms, max {sw['stream_gap_max_ms']:.0f} ms"
        )
    write_json(a.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
