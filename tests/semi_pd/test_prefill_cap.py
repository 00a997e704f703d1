"""The prefill cap behind the `timeshare` step gate (issue #13, session 7): a decode step
waits for a whole prefill forward, so TPOT is governed by how long a prefill forward may
run while decode has requests (the cap) and by how much of the time prefill takes, not by
the decode share alone. The gated latency model (latency_model.py: `predict_tpot_gated`)
and the controller's decisions (slo_algorithm.py: `_choose`, `_cap_move`) on synthetic
metrics, and a closed loop against a simulated gated server."""

from __future__ import annotations

import logging
import math
import random

import pytest

from pdserve.semi_pd.actuator import InMemorySplit
from pdserve.semi_pd.allocation import SMAllocation
from pdserve.semi_pd.latency_model import LatencyModel
from pdserve.semi_pd.metrics_collector import SemiPDMetricsCollector
from pdserve.semi_pd.slo_algorithm import ControllerSettings, SLOAwareResourceController, SLOConstraints
from pdserve.semi_pd.step_gate import CAP_ENV, initial_prefill_cap
from tests.semi_pd.test_slo_controller import Clock

# the box's figures, roughly (docs/benchmarks.md "Semi-PD, session 6"): a prefill forward
# 1.2 ms/token + 18 ms, a decode step 2 ms/request + 18 ms, both at 100 % (timeshare)
A_P, B_P, A_D, B_D = 1.2e-3, 1.8e-2, 2e-3, 1.8e-2


def law(a_p=A_P, b_p=B_P, a_d=A_D, b_d=B_D) -> LatencyModel:
    m = LatencyModel()
    m.prefill.a, m.prefill.b, m.decode.a, m.decode.b = a_p, b_p, a_d, b_d
    return m


def feed(clock, mc, n, ttft_ms, tpot_ms, rate=1.0, out_len=48, input_len=208):
    """n requests arriving at `rate` per second with the given TTFT and TPOT."""
    for i in range(n):
        rid = f"c{clock.t}-{i}"
        t0 = clock.t + i / rate
        mc.record_request_arrival(rid, input_len, timestamp=t0)
        mc.record_first_token(rid, timestamp=t0 + ttft_ms / 1000)
        mc.record_request_completion(rid, out_len, timestamp=t0 + ttft_ms / 1000 + (out_len - 1) * tpot_ms / 1000)
    clock.t += n / rate + (ttft_ms + out_len * tpot_ms) / 1000


def fit_steps(clock, mc, n=20, max_tokens=512):
    """Step timings as the resident records them under `timeshare`: each forward alone on
    the machine, so at 100 %."""
    rng = random.Random(1)
    for i in range(n):
        tokens = rng.randint(16, max_tokens)
        mc.record_prefill_batch(tokens, A_P * tokens + B_P, 100, timestamp=clock.t + 0.05 * i)
        batch = rng.randint(1, 4)
        mc.record_decode_step(batch, A_D * batch + B_D, 100, timestamp=clock.t + 0.05 * i)


def gated(split=(70, 30), cap=None, ttft=3000.0, tpot=56.0, **settings):
    clock = Clock()
    mc = SemiPDMetricsCollector(window_size_seconds=30.0, clock=clock)
    act = InMemorySplit(SMAllocation(*split), gated=True, chunk_tokens=512)
    act.set_prefill_cap(cap)
    ctl = SLOAwareResourceController(
        SLOConstraints(ttft, tpot), mc, act, settings=ControllerSettings(**settings), clock=clock
    )
    return clock, mc, act, ctl


# ---- the gated latency model ----------------------------------------------------------------
def test_gated_tpot_is_set_by_the_prefill_forward_and_prefill_time_not_the_decode_share():
    m = law()
    lam, lin, lout = 1.0, 208, 48
    tpot = lambda x, cap: m.predict_tpot_gated(x, 2, cap, lam, lin, lout)  # noqa: E731
    # prefill needs ~27 % of the time at 1 req/s: any share above that gives decode the same
    assert tpot(70, 512) == pytest.approx(tpot(40, 512)) == pytest.approx(tpot(80, 512))
    # a shorter prefill forward cuts the tail one forward adds to a request's TPOT
    assert tpot(70, 128) < tpot(70, 256) < tpot(70, 512)
    assert tpot(70, 512) - tpot(70, 128) == pytest.approx((A_P * 384) / 47, rel=0.1)
    # once prefill is held to its share (it would take more), a smaller share helps decode
    assert tpot(20, 128) < tpot(25, 128)
    # prefill needs the whole machine: no TPOT
    assert m.predict_tpot_gated(100, 2, 128, 10.0, lin, lout) == math.inf
    # each forward pays the fixed cost: capped prefill is slower, and so is TTFT
    assert m.prefill_service(768, 128) == pytest.approx(A_P * 768 + 6 * B_P)
    assert m.prefill_service(768) == pytest.approx(A_P * 768 + B_P)
    assert m.predict_ttft(70, lam, lin, 32) > m.predict_ttft(70, lam, lin, 512)
    assert m.predict_ttft(70, lam, lin) == pytest.approx(m.predict_ttft(70, lam, lin, 512))


def test_the_actuator_holds_the_cap():
    act = InMemorySplit(SMAllocation(70, 30), gated=True, chunk_tokens=512)
    assert act.prefill_cap is None
    act.set_prefill_cap(128)
    assert act.prefill_cap == 128
    act.set_prefill_cap(512)  # the chunk size: no cap
    assert act.prefill_cap is None and [c for _, c in act.cap_history] == [128, None]
    with pytest.raises(ValueError, match="positive number of tokens"):
        act.set_prefill_cap(0)


# ---- decisions on synthetic metrics ---------------------------------------------------------
def test_gated_tpot_miss_shortens_prefill_forwards_not_the_split(caplog):
    """Session 6: on TPOT misses the controller moved 70/30 -> 35/65 and TPOT got worse.
    Behind the gate it now caps the prefill forward and keeps the split."""
    clock, mc, act, ctl = gated((70, 30))
    fit_steps(clock, mc)
    feed(clock, mc, 20, ttft_ms=400, tpot_ms=70)
    with caplog.at_level(logging.INFO, logger="pdserve.semi_pd.slo_algorithm"):
        d = ctl.evaluate()
    assert d.action == "move" and d.tpot_violated, d.reason
    assert act.current == SMAllocation(70, 30)  # the split stays
    assert act.prefill_cap is not None and 128 <= act.prefill_cap < 512, d.reason  # at most 4x per move
    assert d.old_cap == 512 and d.new_cap == act.prefill_cap
    assert f"prefill cap 512 -> {act.prefill_cap} tokens" in caplog.text
    assert ctl.get_status()["prefill_cap_tokens"] == act.prefill_cap


def test_gated_tpot_miss_that_neither_knob_helps_keeps():
    """Prefill takes little of the time and its forwards are already short: no cap and no
    share is predicted to help, so nothing moves (session 6 moved to 35/65 here)."""
    clock, mc, act, ctl = gated((70, 30), cap=32)
    fit_steps(clock, mc)
    feed(clock, mc, 20, ttft_ms=400, tpot_ms=70)
    d = ctl.evaluate()
    assert d.action == "keep" and act.current == SMAllocation(70, 30) and act.prefill_cap == 32, d.reason
    assert "no split within one move is predicted to help" in d.reason


def test_gated_ttft_miss_gives_prefill_more_share():
    clock, mc, act, ctl = gated((50, 50), cap=64, ttft=1000.0)
    fit_steps(clock, mc)
    feed(clock, mc, 20, ttft_ms=2500, tpot_ms=30)
    d = ctl.evaluate()
    assert d.action == "move" and act.current.prefill_percentage > 50 and act.prefill_cap == 64, d.reason


def test_gated_ttft_miss_at_the_share_limit_lets_prefill_forwards_grow():
    clock, mc, act, ctl = gated((90, 10), cap=32, ttft=1000.0)
    fit_steps(clock, mc)
    feed(clock, mc, 20, ttft_ms=2500, tpot_ms=25)
    d = ctl.evaluate()
    assert d.action == "move" and act.current == SMAllocation(90, 10), d.reason
    assert act.prefill_cap is not None and act.prefill_cap > 32 and "already at the limit" in d.reason


def test_gated_tpot_miss_before_the_model_is_fitted_halves_the_cap():
    clock, mc, act, ctl = gated((70, 30))
    feed(clock, mc, 20, ttft_ms=400, tpot_ms=70)
    d = ctl.evaluate()
    assert d.action == "move" and act.prefill_cap == 256 and act.current == SMAllocation(70, 30), d.reason
    assert "latency model not fitted yet" in d.reason


def test_gated_undoing_a_cap_needs_a_persistent_ttft_miss():
    clock, mc, act, ctl = gated((90, 10), ttft=1000.0)
    fit_steps(clock, mc)
    feed(clock, mc, 20, ttft_ms=400, tpot_ms=70)
    assert ctl.evaluate().action == "move"
    cap = act.prefill_cap
    assert cap is not None
    feed(clock, mc, 20, ttft_ms=2500, tpot_ms=25)  # TTFT misses once: wait
    d = ctl.evaluate()
    assert d.action == "keep" and "waits for 2 evaluations" in d.reason and act.prefill_cap == cap
    feed(clock, mc, 20, ttft_ms=2500, tpot_ms=25)  # and again: the cap grows back
    d = ctl.evaluate()
    assert d.action == "move" and (act.prefill_cap is None or act.prefill_cap > cap), d.reason
    assert ctl.stats.direction_reversals == 1


def test_ungated_actuators_never_cap():
    clock = Clock()
    mc = SemiPDMetricsCollector(window_size_seconds=30.0, clock=clock)
    act = InMemorySplit(SMAllocation(70, 30))  # not gated: the share is a speed
    ctl = SLOAwareResourceController(SLOConstraints(3000, 56), mc, act, clock=clock)
    fit_steps(clock, mc)
    feed(clock, mc, 20, ttft_ms=400, tpot_ms=90)
    d = ctl.evaluate()
    assert d.action == "move" and act.current.decode_percentage > 30 and act.prefill_cap is None
    assert d.old_cap is None and d.new_cap is None


# ---- closed loop against a simulated gated server -------------------------------------------
class GatedSim:
    """A server behind the gate whose law the controller does not know: prefill's
    forwards add 1.5x the tail the model assumes, and the decode batch follows Little's law."""

    def __init__(self, rate: float, seed: int = 0) -> None:
        self.rate, self.law, self.rng = rate, law(), random.Random(seed)
        self.lin, self.lout = 208, 48

    def latencies(self, x: int, cap: int) -> tuple[float, float]:
        ttft = self.law.predict_ttft(x, self.rate, self.lin, cap)
        s = self.law.prefill_service(self.lin, cap)
        u = min(x / 100, self.rate * s)
        if u >= 1:
            return ttft, math.inf
        batch = max(1.0, self.rate * (self.lout - 1) * (A_D + B_D) / (1 - u))  # Little's law
        tpot = self.law.decode(batch) / (1 - u) + 1.5 * self.law.prefill(cap) / (self.lout - 1)
        return ttft, tpot

    def run(self, clock, mc, act, seconds: float) -> None:
        cap = act.prefill_cap or act.chunk_tokens
        ttft, tpot = self.latencies(act.current.prefill_percentage, cap)
        n = int(self.rate * seconds)
        for i in range(n):
            t0 = clock.t + i * seconds / n
            f = min(ttft, 10.0) * self.rng.uniform(0.8, 1.2)
            p = min(tpot, 10.0) * self.rng.uniform(0.8, 1.2)
            rid = f"g{t0}"
            mc.record_request_arrival(rid, self.lin, timestamp=t0)
            mc.record_first_token(rid, timestamp=t0 + f)
            mc.record_request_completion(rid, self.lout, timestamp=t0 + f + (self.lout - 1) * p)
            tokens = self.rng.randint(16, cap)
            mc.record_prefill_batch(tokens, self.law.prefill(tokens) * self.rng.uniform(0.9, 1.1), 100, timestamp=t0)
            mc.record_decode_step(2, self.law.decode(2) * self.rng.uniform(0.9, 1.1), 100, timestamp=t0)
        clock.t += seconds


@pytest.mark.parametrize("start", [(70, 30), (40, 60)])
def test_gated_closed_loop_meets_tpot_by_capping_and_settles(start):
    clock, mc, act, ctl = gated(start, ttft=1500.0, tpot=45.0, monitoring_interval_s=10)
    sim = GatedSim(rate=1.0)
    _, tpot_uncapped = sim.latencies(start[0], 512)
    assert tpot_uncapped * 1000 * 1.2 > 45  # whole 512-token forwards miss TPOT at any split
    history = []
    for _ in range(30):
        sim.run(clock, mc, act, 10.0)
        ctl.evaluate()
        history.append((act.current.prefill_percentage, act.prefill_cap))
    assert history[-10:] == [history[-1]] * 10, history  # settled
    assert ctl.stats.direction_reversals <= 1 and ctl.stats.moves <= 5, history
    x, cap = history[-1]
    ttft, tpot = sim.latencies(x, cap or 512)
    assert cap is not None and tpot * 1000 <= 45 and ttft * 1000 <= 1500, (history, ttft, tpot)
    assert x >= start[0] - 10, history  # it did not buy TPOT by starving prefill


def test_a_starting_cap_from_the_environment():
    assert initial_prefill_cap({}) is None and initial_prefill_cap({CAP_ENV: ""}) is None
    assert initial_prefill_cap({CAP_ENV: "128"}) == 128
    with pytest.raises(ValueError, match="PDSERVE_SEMI_PD_PREFILL_CAP='lots': must be a whole number"):
        initial_prefill_cap({CAP_ENV: "lots"})
    with pytest.raises(ValueError, match=">= 1 token"):
        initial_prefill_cap({CAP_ENV: "0"})
