import math

import numpy as np
import pytest

from pdserve.bench.arrivals import arrival_offsets, parse_rate_range, parse_rates


def test_all_at_once():
    assert arrival_offsets(5, math.inf) == [0.0] * 5


def test_poisson_mean_gap_and_seed():
    offs = arrival_offsets(4000, 8.0, 1.0, seed=3)
    gaps = np.diff(offs)
    assert offs[0] == 0.0 and all(g >= 0 for g in gaps)
    assert abs(gaps.mean() - 1 / 8.0) < 0.01
    # exponential gaps: coefficient of variation 1
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.08
    assert arrival_offsets(50, 8.0, 1.0, seed=3) == offs[:50]
    assert arrival_offsets(50, 8.0, 1.0, seed=4) != offs[:50]


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_keeps_rate_changes_spread(burstiness):
    gaps = np.diff(arrival_offsets(4000, 5.0, burstiness, seed=0))
    assert abs(gaps.mean() - 0.2) < 0.02
    # gamma(k): CV = 1/sqrt(k)
    assert abs(gaps.std() / gaps.mean() - 1 / math.sqrt(burstiness)) < 0.15


def test_bad_values():
    with pytest.raises(ValueError, match="request-rate"):
        arrival_offsets(3, 0.0)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_offsets(3, 1.0, burstiness=0.0)


def test_parse_rates():
    assert parse_rates("inf") == [math.inf]
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    for bad in ("", "x", "0", "-1", "nan"):
        with pytest.raises(ValueError):
            parse_rates(bad)
    assert parse_rate_range("1,4,1") == [1.0, 2.0, 3.0, 4.0]
    assert parse_rate_range("0.5,1.6,0.5") == [0.5, 1.0, 1.5]
    with pytest.raises(ValueError):
        parse_rate_range("4,1,1")
