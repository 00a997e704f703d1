"""The soak's results: KV pools at the end, RSS per process incarnation, the Markdown table
and the RSS plot."""

from __future__ import annotations

import time

import httpx

from soaklib.procs import Proc

QUEUES = (
    "num_running_reqs",
    "num_waiting_reqs",
    "prealloc_queue_len",
    "transfer_queue_len",
    "bootstrap_queue_len",
    "inflight_queue_len",
)


def kv_clean(proc: Proc, timeout: float = 60) -> dict:
    """The server's /get_load once its pool holds no request pages and its queues are empty
    (or after `timeout`)."""
    deadline = time.time() + timeout
    while True:
        try:
            ld = httpx.get(proc.url + "/get_load", timeout=10).json()
        except (httpx.HTTPError, ValueError) as e:
            if time.time() > deadline:
                return {"clean": False, "error": f"{type(e).__name__}: {e}"}
            time.sleep(1)
            continue
        clean = ld["num_used_pages"] == 0 and all(ld.get(k, 0) == 0 for k in QUEUES)
        if clean or time.time() > deadline:
            return {"clean": clean, **{k: ld.get(k) for k in ("num_used_pages", *QUEUES, "num_failed_transfers")}}
        time.sleep(0.5)


def _series(samples: list[dict]) -> dict[str, list[tuple[float, int]]]:
    series: dict[str, list[tuple[float, int]]] = {}
    for row in samples:
        for k, v in row.items():
            if k != "t":
                series.setdefault(k, []).append((row["t"], v))
    return series


def rss_summary(samples: list[dict], warm_s: float = 30.0) -> dict:
    """Per process incarnation, MiB: `first` (the sample `warm_s` after its first one),
    `last`, `max`, growth first -> last, and the growth over the second half of its life
    (`growth_2nd_half`: what is left once warm-up effects are over)."""
    out = {}
    for k, pts in _series(samples).items():
        warm = [(t, v) for t, v in pts if t >= pts[0][0] + warm_s] or [pts[0]]
        mid_t = (warm[0][0] + pts[-1][0]) / 2
        mid = next(v for t, v in pts if t >= mid_t)
        out[k] = {
            "from_s": pts[0][0],
            "to_s": pts[-1][0],
            "first_mib": round(warm[0][1] / 2**20, 1),
            "last_mib": round(pts[-1][1] / 2**20, 1),
            "max_mib": round(max(v for _, v in pts) / 2**20, 1),
            "growth_mib": round((pts[-1][1] - warm[0][1]) / 2**20, 1),
            "growth_2nd_half_mib": round((pts[-1][1] - mid) / 2**20, 1),
        }
    return out


def plot_rss(samples: list[dict], faults: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    for k, pts in sorted(_series(samples).items()):
        ax.plot([t for t, _ in pts], [v / 2**20 for _, v in pts], label=k, linewidth=1)
    for f in faults:
        ax.axvline(f["at_s"], color="grey", linestyle=":", linewidth=1)
        ax.text(f["at_s"], ax.get_ylim()[1] * 0.98, f"{f['kind']} {f['target']}", rotation=90, va="top", fontsize=7)
    ax.set_xlabel("seconds into the soak")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("pdserve soak: RSS per process (name#incarnation)")
    ax.legend(fontsize=7, ncol=2, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(res: dict) -> str:
    c = res["counts"]
    lines = [
        "| sent | succeeded | failed (clear error) | aborted by client | lost |",
        "|---:|---:|---:|---:|---:|",
        f"| {res['sent']} | {c['succeeded']} | {c['failed']} | {c['aborted']} | **{c['lost']}** |",
        "",
        "| fault | at (s) | restart (s) | serving again after the process is back (s) | "
        "after the fault (s) | probes failed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for f in res["faults"]:
        lines.append(
            f"| {f['kind']} {f['target']} | {f['at_s']} | {f.get('restart_s', '-')} | "
            f"{f['serving_again_after_back_s']} | {f['serving_again_after_fault_s']} | {f['probes_failed']} |"
        )
    lines += [
        "",
        "| process#incarnation | seconds | RSS first (MiB) | last | max | growth | growth, 2nd half |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for k, s in sorted(res["rss"].items()):
        lines.append(
            f"| {k} | {s['from_s']}–{s['to_s']} | {s['first_mib']} | {s['last_mib']} | {s['max_mib']} | "
            f"{s['growth_mib']:+} | {s['growth_2nd_half_mib']:+} |"
        )
    lines += ["", f"KV pools at the end: prefill {res['kv_end']['prefill']}, decode {res['kv_end']['decode']}"]
    return "\n".join(lines)
