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

        def done(action: str, new: SMAllocation, reason: str) -> Decision:
            d = Decision(now, action, cur, new, reason, m["ttft_p95_ms"], m["tpot_p95_ms"], ttft_v, tpot_v)
            self.stats.recent.append(d)
            if action == "move":
                self.stats.moves += 1
            elif action == "refused":
                self.stats.refused += 1
            else:
                self.stats.keeps += 1
            logger.info("Semi-PD split decision: %s %s%s: %s", action, cur, f" -> {new}" if new != cur else "", reason)
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
            new, why = self._both_violated(cur, m)
            if new is None:
                return done("keep", cur, f"both SLOs missed ({figures}); {why}")
            return self._apply(done, cur, new, 0, f"both SLOs missed ({figures}); {why}")
        if self._last_direction == -want and self._streak[want] < s.reverse_patience:
            return done(
                "keep",
                cur,
                f"{'TTFT' if want > 0 else 'TPOT'} missed ({figures}) but moving back against "
                f"the last move waits for {s.reverse_patience} evaluations in a row "
                f"({self._streak[want]} so far)",
            )
        new, why = self._one_violated(cur, want, m)
        if new is None or new == cur:
            return done("keep", cur, f"{'TTFT' if want > 0 else 'TPOT'} missed ({figures}); {why}")
        return self._apply(done, cur, new, want, f"{'TTFT' if want > 0 else 'TPOT'} missed ({figures}); {why}")

    def _apply(self, done, cur: SMAllocation, new: SMAllocation, direction: int, reason: str) -> Decision:
        if not self.actuator.request_sm_reallocation(new):
            return done("refused", cur, f"{reason}; the actuator refused {new}")
        if direction and self._last_direction == -direction:
            self.stats.direction_reversals += 1
        self._last_direction = direction or self._last_direction
        self._since = self.clock()
        self._streak = {+1: 0, -1: 0}
        return done("move", new, reason)

    # ---- choosing a split -----------------------------------------------------------------
    def _predictors(self, cur: SMAllocation, m: dict):
        """(ttft_ms(x), tpot_ms(x)): p95 predicted at the split x / total - x, through the
        shares each role can actually use there (`SplitActuator.effective_shares`: on CPU a
        share buys whole cores, so e.g. prefill at 70 % of 2 cores is no faster than at 50 %)."""
        lam = m["arrival_rate"]
        lin = m["mean_input_length"] or 1.0
        batch = m["mean_decode_batch"]
        total = cur.total

        def eff(x: float) -> tuple[float, float]:
            return self.actuator.effective_shares(SMAllocation(int(x), total - int(x)))

        def calibrated(model_at: Callable[[float], float], observed_ms: float, n: int):
            base = model_at(cur.prefill_percentage)
            if n >= self.settings.min_samples and 0 < base < math.inf and observed_ms > 0:
                return lambda x: observed_ms * model_at(x) / base
            return lambda x: model_at(x) * 1000.0

        ttft = calibrated(
            lambda x: self.model.predict_ttft(eff(x)[0], lam, lin), m["ttft_p95_ms"], m["num_ttft_samples"]
        )
        tpot = calibrated(lambda x: self.model.predict_tpot(eff(x)[1], batch), m["tpot_p95_ms"], m["num_tpot_samples"])
        return ttft, tpot

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

    def _both_violated(self, cur: SMAllocation, m: dict) -> tuple[SMAllocation | None, str]:
        s, slo = self.settings, self.slo
        if not self.model.ready:
            return None, "no fitted latency model to find a split that meets both: keep"
        ttft_at, tpot_at = self._predictors(cur, m)
        total = cur.total
        best = None
        x0 = cur.prefill_percentage
        for x in range(max(s.min_share, x0 - s.max_move), min(total - s.min_share, x0 + s.max_move) + 1, s.step):
            score = max(ttft_at(x) / slo.ttft_target_ms, tpot_at(x) / slo.tpot_target_ms)
            if best is None or score < best[0]:
                best = (score, x)
        if best is None or best[0] > 1.0 or best[1] == cur.prefill_percentage:
            return None, (
                f"no split within one move ({s.max_move} %) is predicted to meet both (the load is beyond "
                f"what any split near this one serves): keep"
            )
        x = best[1]
        return SMAllocation(x, total - x), (
            f"{x}/{total - x} is predicted to meet both (TTFT {ttft_at(x):.1f} ms, TPOT {tpot_at(x):.1f} ms)"
        )

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
            "latency_model": {
                "ready": self.model.ready,
                "prefill_s_per_token": self.model.prefill.a,
                "prefill_s_fixed": self.model.prefill.b,
                "decode_s_per_request": self.model.decode.a,
                "decode_s_fixed": self.model.decode.b,
            },
        }
