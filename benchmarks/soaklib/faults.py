"""The fault schedule (kill and restart, or pause and resume, a server) and, per fault, how
long the router took to serve a probe again."""

from __future__ import annotations

import asyncio
import signal
import time

from soaklib.clients import Probe
from soaklib.procs import Proc

# (fraction of the run, kind, target): the default schedule of the 10-minute soak
DEFAULT_PLAN = (("kill", "decode"), ("kill", "prefill"), ("pause", "decode"), ("pause", "prefill"))


def parse_plan(spec: str) -> list[tuple[str, str]]:
    """ "kill-decode,pause-prefill" -> [("kill", "decode"), ("pause", "prefill")]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, target = item.partition("-")
        if kind not in ("kill", "pause") or target not in ("prefill", "decode"):
            raise ValueError(f"a fault is kill-prefill, kill-decode, pause-prefill or pause-decode, not {item!r}")
        out.append((kind, target))
    return out


async def fault_schedule(procs: dict[str, Proc], plan: list[tuple[str, str]], a, t0: float, faults: list[dict]) -> None:
    """The n faults at 12 %, ..., 78 % of --duration-s, evenly spaced (one fault: at 30 %);
    a killed server is restarted after --down-s, a paused one resumed after --pause-s."""
    loop = asyncio.get_running_loop()
    n = len(plan)
    for i, (kind, target) in enumerate(plan):
        proc = procs[target]
        at = t0 + (0.12 + 0.66 * i / max(1, n - 1)) * a.duration_s if n > 1 else t0 + 0.3 * a.duration_s
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
        f["back_at_s"] = round(f["t_back"] - t0, 1)
        faults.append(f)
        print(f"[{f['at_s']:6.1f}s] {kind} {proc.name}", flush=True)


def recovery(faults: list[dict], probes: list[Probe]) -> None:
    """Per fault: the first successful probe sent after the process was back (restarted or
    resumed), the gap since the fault itself, and why the probes in between failed."""
    for f in faults:
        after = [p.t for p in probes if p.ok and p.t >= f["t_back"]]
        f["serving_again_after_back_s"] = round(after[0] - f["t_back"], 2) if after else None
        f["serving_again_after_fault_s"] = round(after[0] - f["t_fault"], 2) if after else None
        failed = [p for p in probes if not p.ok and f["t_fault"] <= p.t and (not after or p.t < after[0])]
        f["probes_failed"] = len(failed)
        why: dict[str, int] = {}
        for p in failed:
            key = p.detail.split(" (")[0][:90]
            why[key] = why.get(key, 0) + 1
        f["probe_failures"] = dict(sorted(why.items(), key=lambda kv: -kv[1])[:6])
