"""The soak's clients: the request mix, one request classified by what its client saw, the
closed-loop capacity run and the recovery probe."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import aiohttp

WORDS = (
    "river stone cloud garden engine lamp forest paper window silver morning harbor signal "
    "yellow market thunder pencil orbit candle meadow bridge winter copper island music"
).split()


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
        body = {
            "messages": [{"role": "user", "content": text}],
            "max_tokens": n,
            "temperature": 0.7,
            "ignore_eos": True,
        }
    body["stream"] = stream
    return route, body, stream


def error_message(data: bytes) -> str | None:
    """The message of an error body in OpenAI's (or a plain `message`) shape, else None."""
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


async def one_request(
    session: aiohttp.ClientSession, url: str, route: str, body: dict, stream: bool, timeout_s: float
) -> tuple[str, str]:
    """(kind, detail) of one request, never raising (except for cancellation)."""
    try:
        async with session.post(url + route, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            if r.status != 200:
                data = await r.read()
                msg = error_message(data)
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
    """One client: a random request; with probability --abort-prob it goes away within 3 s."""
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


@dataclass
class Probe:
    t: float  # sent
    ok: bool
    latency_s: float
    detail: str = ""  # why it failed


async def probe_loop(url: str, stop: asyncio.Event, probes: list[Probe]) -> None:
    """A one-token /generate through the router, one at a time, at most one a second."""
    body = {"text": "ping", "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            t = time.time()
            detail = ""
            try:
                async with session.post(url + "/generate", json=body, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    data = await r.read()
                    ok = r.status == 200
                    if not ok:
                        detail = f"{r.status}: {(error_message(data) or '')[:100]}"
            except asyncio.TimeoutError:
                ok, detail = False, "no answer within 5 s"
            except (aiohttp.ClientError, OSError) as e:
                ok, detail = False, f"{type(e).__name__}: {e}"[:100]
            probes.append(Probe(t, ok, round(time.time() - t, 2), detail))
            await asyncio.sleep(max(0.0, 1.0 - (time.time() - t)))


async def router_state_loop(url: str, stop: asyncio.Event, states: list[dict], t0: float) -> None:
    """The router's view of its workers (/workers: health, circuit, in-flight) every second."""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            t = time.time()
            try:
                async with session.get(url + "/workers", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    obj = await r.json(content_type=None)
                ws = obj.get("workers", obj) if isinstance(obj, dict) else obj
                row = {"t": round(t - t0, 1)}
                for w in ws if isinstance(ws, list) else []:
                    row[w["role"]] = {k: w.get(k) for k in ("healthy", "circuit", "in_flight")}
                states.append(row)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
                pass
            await asyncio.sleep(max(0.0, 1.0 - (time.time() - t)))
