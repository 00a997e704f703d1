"""The SLO-aware split controller of Semi-PD (after the paper's Algorithm 1).

Every `monitoring_interval_s` it reads TTFT and TPOT at p95 from the metrics collector
(only requests seen since the last change of split, so a decision never acts on latencies
of the split it already left), and:

- both targets met (or too few samples): keep the split;
- TTFT misses: give prefill more: the smallest step up at which the latency model predicts
  TTFT <= target while TPOT stays within `headroom` of its target (or as far as TPOT allows);
- TPOT misses: the same towards decode;
- both miss: move only to a split the model predicts meets both; otherwise keep (the load
  is beyond what any split serves, and trading one miss for another only flaps).

Hysteresis, so it does not flap: decisions use only samples measured entirely after the
last change (a TTFT of a request that arrived after it, a TPOT of one whose first token came
after it: not the backlog the previous split left), and at least `min_samples` of them; one
move goes at most `max_move` %; a move must keep the other SLO under `headroom` x its target
(predicted); and moving back against the previous move needs the violation to persist
`reverse_patience` evaluations in a row.

Predictions are calibrated on what is observed: predicted p95 at a new split = observed p95
x model(new) / model(current) (the model knows the shape — 100/share scaling, queueing —
the observation knows the level and the tail).

Every decision is logged with its reason; a missed target is logged as
`SLO VIOLATION DETECTED` with the figures.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable

from pdserve.semi_pd.actuator import SplitActuator
from pdserve.semi_pd.allocation import SMAllocation
from pdserve.semi_pd.latency_model import LatencyModel
from pdserve.semi_pd.metrics_collector import SemiPDMetricsCollector

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SLOConstraints:
    """Latency targets in ms, met when the p95 is at or under them."""

    ttft_target_ms: float = 100.0
    tpot_target_ms: float = 50.0

    def __post_init__(self) -> None:
        for name in ("ttft_target_ms", "tpot_target_ms"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < math.inf):
                raise ValueError(f"{name} must be a positive number of ms, got {v!r}")


@dataclass(frozen=True)
class ControllerSettings:
    monitoring_interval_s: float = 10.0  # between two decisions
    step: int = 5  # % granularity of the splits considered
    min_share: int = 10  # % neither role goes under
    min_samples: int = 5  # TTFT (TPOT) samples since the last change before TTFT (TPOT) counts
    headroom: float = 0.9  # a move keeps the other SLO predicted <= headroom x its target
    reverse_patience: int = 2  # evaluations in a row before moving against the last move
    fallback_step: int = 10  # % per move while the latency model has too few step timings
    # the most one decision moves the split, %: the model extrapolates badly far from the
    # split it was calibrated at (on CPU a share is not linear: docs/semi_pd.md)
    max_move: int = 10
    # a step further counts only if it is predicted to cut the missed latency below this
    # fraction of what it was: no move for a share that buys nothing (CPU: whole cores)
    min_gain: float = 0.97
    # behind a gate (timeshare): the shortest prefill forward the cap goes down to, tokens,
    # and the most one decision changes the cap by (a factor)
    min_prefill_cap: int = 32
    max_cap_factor: int = 4

    def __post_init__(self) -> None:
        if not self.monitoring_interval_s > 0:
            raise ValueError("monitoring_interval_s must be > 0")
        if not (1 <= self.step <= 50 and 1 <= self.fallback_step <= 50):
            raise ValueError("step and fallback_step must be in 1..50 (%)")
        if not (self.step <= self.max_move <= 100):
            raise ValueError("max_move must be in step..100 (%)")
        if not (1 <= self.min_share <= 49):
            raise ValueError("min_share must be in 1..49 (%)")
        if not (0 < self.min_gain <= 1):
            raise ValueError("min_gain must be in (0, 1]")
        if not (0 < self.headroom <= 1):
            raise ValueError("headroom must be in (0, 1]")
        if self.min_prefill_cap < 1 or self.max_cap_factor < 2:
            raise ValueError("min_prefill_cap must be >= 1 and max_cap_factor >= 2")
        if self.min_samples < 1 or self.reverse_patience < 1:
            raise ValueError("min_samples and reverse_patience must be >= 1")


@dataclass(frozen=True)
class Decision:
    time: float
    action: str  # "keep" | "move" | "refused" (the actuator said no)
    old: SMAllocation
    new: SMAllocation
    reason: str
    ttft_p95_ms: float
    tpot_p95_ms: float
    ttft_violated: bool
    tpot_violated: bool
    old_cap: int | None = None  # the prefill cap (tokens per prefill forward while decode runs)
    new_cap: int | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["old"], d["new"] = str(self.old), str(self.new)
        return d


@dataclass
class ControllerStats:
    evaluations: int = 0
    ttft_violations: int = 0
    tpot_violations: int = 0
    moves: int = 0
    keeps: int = 0
    refused: int = 0
    direction_reversals: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=64))  # Decisions


class SLOAwareResourceController:
    """Drives a `SplitActuator` (the seed's `process_rotation_manager`) from SLO metrics.
    `evaluate()` makes one decision now; `start_monitoring()` makes one every interval in
    a background thread."""

    def __init__(
        self,
        slo_constraints: SLOConstraints,
        metrics_collector: SemiPDMetricsCollector,
        process_rotation_manager: SplitActuator,
        *,
        settings: ControllerSettings | None = None,
        latency_model: LatencyModel | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.slo = slo_constraints
        self.metrics = metrics_collector
        self.actuator = process_rotation_manager
        self.settings = settings or ControllerSettings()
        self.model = latency_model or LatencyModel()
        self.clock = clock or metrics_collector.clock
        self.stats = ControllerStats()
        self._since: float | None = None  # time of the last change of split
        self._last_direction = 0  # +1: towards prefill, -1: towards decode
        self._streak = {+1: 0, -1: 0}  # evaluations in a row wanting each direction
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- one decision -------------------------------------------------------------------
    def evaluate(self) -> Decision:
        with self._lock:
            return self._evaluate()

    def _evaluate(self) -> Decision:
        s, slo = self.settings, self.slo
        now = self.clock()
        cur = self.actuator.current
        m = self.metrics.get_real_time_metrics(since=self._since)
        self.model.observe(*self.metrics.step_samples())
        self.stats.evaluations += 1
        have_ttft = m["num_ttft_samples"] >= s.min_samples
        have_tpot = m["num_tpot_samples"] >= s.min_samples
        ttft_v = have_ttft and m["ttft_p95_ms"] > slo.ttft_target_ms
        tpot_v = have_tpot and m["tpot_p95_ms"] > slo.tpot_target_ms
        if ttft_v:
            self.stats.ttft_violations += 1
            logger.warning(
                "SLO VIOLATION DETECTED: TTFT p95 %.1f ms > target %.1f ms (%d requests, split %s, prefill queue %d)",
                m["ttft_p95_ms"],
                slo.ttft_target_ms,
                m["num_ttft_samples"],
                cur,
                m["prefill_queue_length"],
            )
        if tpot_v:
            self.stats.tpot_violations += 1
            logger.warning(
                "SLO VIOLATION DETECTED: TPOT p95 %.1f ms > target %.1f ms (%d requests, split %s, decode queue %d)",
                m["tpot_p95_ms"],
                slo.tpot_target_ms,
                m["num_tpot_samples"],
                cur,
                m["decode_queue_length"],
            )

        cap0 = self._cap_now()

        def done(action: str, new: SMAllocation, reason: str, new_cap: int | None = None) -> Decision:
            new_cap = cap0 if new_cap is None else new_cap
            d = Decision(
                now,
                action,
                cur,
                new,
                reason,
                m["ttft_p95_ms"],
                m["tpot_p95_ms"],
                ttft_v,
                tpot_v,
                cap0 if self.actuator.gated else None,
                new_cap if self.actuator.gated else None,
            )
            self.stats.recent.append(d)
            if action == "move":
                self.stats.moves += 1
            elif action == "refused":
                self.stats.refused += 1
            else:
                self.stats.keeps += 1
            change = f" -> {new}" if new != cur else ""
            if new_cap != cap0:
                change += f", prefill cap {cap0} -> {new_cap} tokens"
            logger.info("Semi-PD split decision: %s %s%s: %s", action, cur, change, reason)
            return d

        figures = (
            f"TTFT p95 {m['ttft_p95_ms']:.1f}/{slo.ttft_target_ms:g} ms over {m['num_ttft_samples']}, "
            f"TPOT p95 {m['tpot_p95_ms']:.1f}/{slo.tpot_target_ms:g} ms over {m['num_tpot_samples']}"
        )
        want = +1 if ttft_v and not tpot_v else -1 if tpot_v and not ttft_v else 0
        for d in (+1, -1):
            self._streak[d] = self._streak[d] + 1 if want == d else 0
        if not have_ttft and not have_tpot:
            return done("keep", cur, f"too few requests since the last change ({figures}; need {s.min_samples})")
        if not ttft_v and not tpot_v:
            return done("keep", cur, f"SLOs met ({figures})")
        if ttft_v and tpot_v:
            new, cap, why = self._both_violated(cur, m)
            if new is None:
                return done("keep", cur, f"both SLOs missed ({figures}); {why}")
            return self._apply(done, cur, new, cap, 0, f"both SLOs missed ({figures}); {why}")
        if self._last_direction == -want and self._streak[want] < s.reverse_patience:
            return done(
                "keep",
                cur,
                f"{'TTFT' if want > 0 else 'TPOT'} missed ({figures}) but moving back against "
                f"the last move waits for {s.reverse_patience} evaluations in a row "
                f"({self._streak[want]} so far)",
            )
        new, cap, why = self._choose(cur, want, m)
        if new is None or (new == cur and cap == cap0):
            return done("keep", cur, f"{'TTFT' if want > 0 else 'TPOT'} missed ({figures}); {why}")
        return self._apply(done, cur, new, cap, want, f"{'TTFT' if want > 0 else 'TPOT'} missed ({figures}); {why}")

    def _cap_now(self) -> int:
        """The prefill cap in effect, tokens (the chunk size when there is none)."""
        cap = self.actuator.prefill_cap
        return self.actuator.chunk_tokens if cap is None else cap

    def _apply(self, done, cur: SMAllocation, new: SMAllocation, cap: int, direction: int, reason: str) -> Decision:
        if new != cur and not self.actuator.request_sm_reallocation(new):
            return done("refused", cur, f"{reason}; the actuator refused {new}")
        if cap != self._cap_now():
            self.actuator.set_prefill_cap(cap)
        if direction and self._last_direction == -direction:
            self.stats.direction_reversals += 1
        self._last_direction = direction or self._last_direction
        self._since = self.clock()
        self._streak = {+1: 0, -1: 0}
        return done("move", new, reason, cap)

    # ---- choosing a split -----------------------------------------------------------------
    def _predictors(self, cur: SMAllocation, m: dict):
        """(ttft_ms(x, cap), tpot_ms(x, cap)): p95 predicted at the split x / total - x with
        prefill forwards of at most `cap` tokens while decode runs (default: the cap in
        effect), through the shares each role can actually use there
        (`SplitActuator.effective_shares`: on CPU a share may buy whole cores, so e.g. prefill
        at 70 % of 2 cores is no faster than at 50 % under `disjoint`). Behind a gate
        (`timeshare`) TPOT is the gated model (latency_model.py): decode slowed by the
        prefill time in between plus one capped prefill forward per request; without one,
        a decode step at the decode share."""
        lam = m["arrival_rate"]
        lin = m["mean_input_length"] or 1.0
        lout = m["mean_output_length"] or 2.0
        batch = m["mean_decode_batch"]
        total = cur.total
        gated = self.actuator.gated
        cap0 = self._cap_now()

        def eff(x: float) -> tuple[float, float]:
            return self.actuator.effective_shares(SMAllocation(int(x), total - int(x)))

        def ttft_model(x: float, cap: int) -> float:
            return self.model.predict_ttft(eff(x)[0], lam, lin, cap if gated else None)

        def tpot_model(x: float, cap: int) -> float:
            if gated:
                return self.model.predict_tpot_gated(eff(x)[0], batch, cap, lam, lin, lout)
            return self.model.predict_tpot(eff(x)[1], batch)

        def calibrated(model_at: Callable[[float, int], float], observed_ms: float, n: int):
            base = model_at(cur.prefill_percentage, cap0)
            if n >= self.settings.min_samples and 0 < base < math.inf and observed_ms > 0:
                return lambda x, cap=cap0: observed_ms * model_at(x, cap) / base
            return lambda x, cap=cap0: model_at(x, cap) * 1000.0

        return (
            calibrated(ttft_model, m["ttft_p95_ms"], m["num_ttft_samples"]),
            calibrated(tpot_model, m["tpot_p95_ms"], m["num_tpot_samples"]),
        )

    def _choose(self, cur: SMAllocation, direction: int, m: dict) -> tuple[SMAllocation | None, int, str]:
        """One SLO missed: (split, cap, why). Without a gate only the split moves. Behind one
        (`timeshare`) TPOT is set by how long a prefill forward holds decode back and how much
        of the time prefill takes: a TPOT miss first shortens prefill forwards (the cap), and
        gives decode more share only once a shorter forward is predicted to help no more; a
        TTFT miss first gives prefill more share, then lets its forwards grow again."""
        cap0 = self._cap_now()
        if not self.actuator.gated:
            new, why = self._one_violated(cur, direction, m)
            return new, cap0, why
        if direction < 0:
            cap, why = self._cap_move(cur, -1, m)
            if cap is not None:
                return cur, cap, why
            new, why2 = self._one_violated(cur, -1, m)
            return new, cap0, f"{why}; {why2}"
        new, why = self._one_violated(cur, +1, m)
        if new is not None and new != cur:
            return new, cap0, why
        cap, why2 = self._cap_move(cur, +1, m)
        if cap is not None:
            return cur, cap, f"{why}; {why2}"
        return None, cap0, f"{why}; {why2}"

    def _cap_move(self, cur: SMAllocation, direction: int, m: dict) -> tuple[int | None, str]:
        """Behind a gate: a shorter (direction -1, for TPOT) or longer (+1, for TTFT) prefill
        forward cap, in halvings / doublings, at most `max_cap_factor` per decision; (None,
        why) when none is predicted to help while keeping the other SLO within headroom."""
        s, slo = self.settings, self.slo
        chunk = self.actuator.chunk_tokens
        c0 = self._cap_now()
        floor = min(s.min_prefill_cap, chunk)
        lo, hi = max(floor, c0 // s.max_cap_factor), min(chunk, c0 * s.max_cap_factor)
        if direction < 0 and c0 <= floor:
            return None, f"prefill forwards are already at the shortest cap ({c0} tokens)"
        if direction > 0 and c0 >= chunk:
            return None, f"prefill forwards are not capped (whole chunks of {chunk} tokens)"
        if not self.model.ready:
            if direction < 0:
                return max(lo, c0 // 2), (
                    f"latency model not fitted yet: prefill forwards capped at half ({max(lo, c0 // 2)} tokens)"
                )
            return None, "latency model not fitted yet: the prefill cap stays"
        ttft_at, tpot_at = self._predictors(cur, m)
        x0 = cur.prefill_percentage
        missed_at = (lambda c: tpot_at(x0, c)) if direction < 0 else (lambda c: ttft_at(x0, c))
        here = missed_at(c0)
        best = None
        c = c0
        while True:
            c = max(lo, c // 2) if direction < 0 else min(hi, c * 2)
            t_ttft, t_tpot = ttft_at(x0, c), tpot_at(x0, c)
            if direction < 0:
                fixed, other_ok = t_tpot <= slo.tpot_target_ms, t_ttft <= s.headroom * slo.ttft_target_ms
            else:
                fixed, other_ok = t_ttft <= slo.ttft_target_ms, t_tpot <= s.headroom * slo.tpot_target_ms
            pred = f"predicted TTFT {t_ttft:.1f} ms, TPOT {t_tpot:.1f} ms with prefill forwards of <= {c} tokens"
            if not other_ok or not missed_at(c) < s.min_gain * here:
                if best is None:
                    why = "keeps the other SLO within headroom" if not other_ok else "is predicted to help"
                    return None, f"no prefill cap within one move {why} ({pred})"
                return best
            best = (c, pred)
            here = missed_at(c)
            if fixed or c in (lo, hi):
                return best

    def _one_violated(self, cur: SMAllocation, direction: int, m: dict) -> tuple[SMAllocation | None, str]:
        s, slo = self.settings, self.slo
        total = cur.total
        lo, hi = s.min_share, total - s.min_share
        x0 = cur.prefill_percentage
        if (direction > 0 and x0 >= hi) or (direction < 0 and x0 <= lo):
            return None, f"already at the limit ({s.min_share} % is the least either role gets)"
        lo, hi = max(lo, x0 - s.max_move), min(hi, x0 + s.max_move)  # one move goes at most this far
        if not self.model.ready:
            x = min(hi, max(lo, x0 + direction * s.fallback_step))
            return SMAllocation(x, total - x), (
                f"latency model not fitted yet ({len(self.model.prefill)} prefill, {len(self.model.decode)} decode "
                f"step timings): a step of {s.fallback_step} %"
            )
        ttft_at, tpot_at = self._predictors(cur, m)
        missed_at = ttft_at if direction > 0 else tpot_at  # the SLO to fix
        here = missed_at(x0)
        best = None
        x = x0
        while True:
            x = min(hi, max(lo, x + direction * s.step))
            y = total - x
            t_ttft, t_tpot = ttft_at(x), tpot_at(x)
            if direction > 0:
                fixed, other_ok = t_ttft <= slo.ttft_target_ms, t_tpot <= s.headroom * slo.tpot_target_ms
            else:
                fixed, other_ok = t_tpot <= slo.tpot_target_ms, t_ttft <= s.headroom * slo.ttft_target_ms
            pred = f"predicted TTFT {t_ttft:.1f} ms, TPOT {t_tpot:.1f} ms at {x}/{y}"
            if not other_ok:
                if best is None:
                    return None, f"no move keeps the other SLO within {s.headroom:g} x its target ({pred})"
                return SMAllocation(best[0], total - best[0]), f"as far as the other SLO allows ({best[1]})"
            if not missed_at(x) < s.min_gain * here:  # this share buys that role nothing more here
                if best is None:
                    return None, (
                        f"no split within one move is predicted to help: {pred} (the role gets no more compute "
                        f"from a larger share here)"
                    )
                return SMAllocation(best[0], total - best[0]), f"as far as it helps ({best[1]})"
            best = (x, pred)
            here = missed_at(x)
            if fixed:
                return SMAllocation(x, y), pred
            if x in (lo, hi):
                return SMAllocation(x, y), f"as far as one move goes ({s.max_move} %), target still missed ({pred})"

    def _both_violated(self, cur: SMAllocation, m: dict) -> tuple[SMAllocation | None, int, str]:
        """Both missed: a split (and, behind a gate, a prefill cap) within one move predicted
        to meet both, else (None, cap, why)."""
        s, slo = self.settings, self.slo
        c0 = self._cap_now()
        if not self.model.ready:
            return None, c0, "no fitted latency model to find a split that meets both: keep"
        ttft_at, tpot_at = self._predictors(cur, m)
        total = cur.total
        caps = [c0]
        if self.actuator.gated:
            chunk, floor = self.actuator.chunk_tokens, min(s.min_prefill_cap, self.actuator.chunk_tokens)
            c, f = c0, 1
            while f < s.max_cap_factor:
                f *= 2
                caps += [max(floor, c0 // f), min(chunk, c * f)]
            caps = sorted(set(caps), reverse=True)
        best = None
        x0 = cur.prefill_percentage
        for x in range(max(s.min_share, x0 - s.max_move), min(total - s.min_share, x0 + s.max_move) + 1, s.step):
            for c in caps:
                score = max(ttft_at(x, c) / slo.ttft_target_ms, tpot_at(x, c) / slo.tpot_target_ms)
                if best is None or score < best[0]:
                    best = (score, x, c)
        # behind a gate the two knobs act mostly on one SLO each (the share on TTFT, the cap on
        # TPOT): a move that is predicted to cut the worse of the two misses is taken even if
        # it does not meet both yet
        here = max(ttft_at(x0, c0) / slo.ttft_target_ms, tpot_at(x0, c0) / slo.tpot_target_ms)
        good = best is not None and (best[0] <= 1.0 or (self.actuator.gated and best[0] < s.min_gain * here))
        if not good or (best[1] == x0 and best[2] == c0):
            why = (
                f"no split within one move ({s.max_move} %) is predicted to meet both (the load is beyond "
                f"what any split near this one serves): keep"
            )
            return None, c0, why
        _, x, c = best
        cap = f", prefill forwards <= {c} tokens" if self.actuator.gated else ""
        what = "meet both" if best[0] <= 1.0 else "cut the worse miss most"
        why = f"{x}/{total - x}{cap} is predicted to {what} (TTFT {ttft_at(x, c):.1f} ms, TPOT {tpot_at(x, c):.1f} ms)"
        return SMAllocation(x, total - x), c, why

    # ---- monitoring thread --------------------------------------------------------------
    def start_monitoring(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="semi-pd-slo-controller", daemon=True)
        self._thread.start()

    def stop_monitoring(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def is_monitoring(self) -> bool:
        return self._thread is not None

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.monitoring_interval_s):
            try:
                self.evaluate()
            except Exception:  # one bad evaluation must not end monitoring
                logger.exception("SLO controller evaluation failed")

    def __enter__(self) -> "SLOAwareResourceController":
        self.start_monitoring()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_monitoring()

    def get_status(self) -> dict:
        st = self.stats
        last = st.recent[-1].as_dict() if st.recent else None
        return {
            "is_monitoring": self.is_monitoring,
            "current_split": self.actuator.current.as_dict(),
            "slo": asdict(self.slo),
            "statistics": {
                k: getattr(st, k)
                for k in (
                    "evaluations",
                    "ttft_violations",
                    "tpot_violations",
                    "moves",
                    "keeps",
                    "refused",
                    "direction_reversals",
                )
            },
            "last_decision": last,
            "gated": self.actuator.gated,
            "prefill_cap_tokens": self.actuator.prefill_cap,
            "latency_model": {
                "ready": self.model.ready,
                "prefill_s_per_token": self.model.prefill.a,
                "prefill_s_fixed": self.model.prefill.b,
                "decode_s_per_request": self.model.decode.a,
                "decode_s_fixed": self.model.decode.b,
            },
        }
