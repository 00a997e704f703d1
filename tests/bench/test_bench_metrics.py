import pytest

from pdserve.bench.backends import RequestOutput
from pdserve.bench.metrics import BenchMetrics, Slo, compute_metrics, meets_slo, tpot_of


def _ok(ttft, latency, n_out, prompt_len=10, **server):
    return RequestOutput(
        success=True,
        prompt_len=prompt_len,
        output_len=n_out,
        ttft=ttft,
        latency=latency,
        itl=[(latency - ttft) / max(1, n_out - 1)] * (n_out - 1),
        server=server,
    )


def test_figures_by_hand():
    outs = [
        _ok(0.1, 1.1, 11),  # TPOT 100 ms
        _ok(0.3, 0.7, 5),  # TPOT 100 ms
        _ok(0.2, 0.2, 1),  # one token: no TPOT
        RequestOutput(error="HTTP 500: boom", prompt_len=10),
        RequestOutput(error="HTTP 500: boom", prompt_len=10),
    ]
    m = compute_metrics(outs, duration_s=2.0, slo=Slo(ttft_ms=250, tpot_ms=150))
    assert (m.completed, m.failed) == (3, 2)
    assert m.total_input_tokens == 30 and m.total_output_tokens == 17
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(8.5)
    assert m.total_throughput == pytest.approx(23.5)
    assert m.ttft_ms.mean == pytest.approx(200.0) and m.ttft_ms.median == pytest.approx(200.0)
    assert m.tpot_ms.count == 2 and m.tpot_ms.mean == pytest.approx(100.0)
    assert m.itl_ms.count == 14 and m.itl_ms.p99 == pytest.approx(100.0)
    assert m.e2e_ms.max == pytest.approx(1100.0)
    assert m.concurrency == pytest.approx(1.0)
    # the TTFT-300ms request misses; failures miss; 2 of 5 meet every SLO
    assert m.good_requests == 2
    assert m.goodput == pytest.approx(1.0)
    assert m.slo_attainment == pytest.approx(0.4)
    assert m.errors == {"HTTP 500: boom": 2}
    assert m.phases is None
    assert BenchMetrics.from_dict(m.to_dict()) == m


def test_tpot_slo_only_and_no_slo():
    outs = [_ok(0.1, 1.1, 11), _ok(0.1, 2.1, 11)]  # TPOT 100 ms and 200 ms
    m = compute_metrics(outs, 1.0, Slo(tpot_ms=150))
    assert m.good_requests == 1 and m.slo_attainment == 0.5
    assert tpot_of(outs[1]) == pytest.approx(0.2)
    assert not meets_slo(outs[1], Slo(tpot_ms=150)) and meets_slo(outs[1], Slo(ttft_ms=100))
    m = compute_metrics(outs, 1.0)
    assert m.goodput is None and m.slo_attainment is None


def test_phase_split():
    outs = [
        _ok(0.1, 1.0, 5, prefill_time=0.1, transfer_time=0.05, decode_time=0.85),
        _ok(0.1, 1.0, 5, prefill_time=0.3, transfer_time=0.15, decode_time=0.55),
        _ok(0.1, 1.0, 5),
    ]  # reports nothing: left out of the means
    m = compute_metrics(outs, 1.0)
    assert set(m.phases) == {"prefill", "transfer", "decode"}
    assert m.phases["prefill"]["mean_ms"] == pytest.approx(200.0)
    assert m.phases["transfer"]["share"] == pytest.approx(0.1)
    assert m.phases["decode"]["share"] == pytest.approx(0.7)


def test_empty_run():
    m = compute_metrics([RequestOutput(error="x")], 1.0, Slo(ttft_ms=1))
    assert m.completed == 0 and m.ttft_ms.mean is None and m.slo_attainment == 0.0
