"""Sampling functions and parameter validation."""

import pytest
import torch

from pdserve.sampling_params import SamplingParams
from pdserve.model.sampler import apply_penalties, draw, gather_logprobs, sample


def logits_row(values):
    return torch.tensor([values], dtype=torch.float32)


def test_greedy_is_argmax():
    lg = torch.randn(4, 50)
    assert sample(lg, [SamplingParams(temperature=0)] * 4, [None] * 4) == lg.argmax(-1).tolist()


def test_top_k_one_is_greedy_even_with_temperature():
    lg = torch.randn(3, 20)
    assert sample(lg, [SamplingParams(temperature=1.5, top_k=1)] * 3, [None] * 3) == lg.argmax(-1).tolist()


def test_top_k_restricts_support():
    lg = logits_row([5.0, 4.0, 3.0, -1.0, -2.0])
    g = torch.Generator().manual_seed(0)
    seen = {sample(lg, [SamplingParams(temperature=2.0, top_k=2)], [g])[0] for _ in range(300)}
    assert seen == {0, 1}


def test_top_p_and_min_p():
    lg = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {sample(lg, [SamplingParams(temperature=1.0, top_p=0.7)], [g])[0] for _ in range(300)}
    assert seen == {0, 1}
    seen = {sample(lg, [SamplingParams(temperature=1.0, min_p=0.5)], [g])[0] for _ in range(300)}
    assert seen == {0, 1}  # 0.3 >= 0.5*0.5, 0.15 < 0.25


def test_seed_reproducible():
    lg = torch.randn(1, 100)
    sp = SamplingParams(temperature=1.0, seed=42)
    a = [sample(lg, [sp], [torch.Generator().manual_seed(42)])[0] for _ in range(5)]
    assert len(set(a)) == 1


def test_draw_follows_the_distribution_and_never_picks_a_zero():
    """draw (inverse CDF, float64) replaced torch.multinomial: same distribution, zeros never drawn."""
    p = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2, 0.0])
    g = torch.Generator().manual_seed(3)
    n = 20000
    counts = torch.bincount(torch.tensor([draw(p, g) for _ in range(n)]), minlength=6).double() / n
    assert counts[1] == counts[3] == counts[5] == 0
    torch.testing.assert_close(counts, p.double(), atol=0.015, rtol=0)
    assert draw(torch.tensor([0.0, 0.0, 2.0]), g) == 2  # unnormalized, one index with mass
    # the same seed draws the same tokens
    a = [draw(p, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(a)) == 1


def test_penalties():
    lg = logits_row([1.0, 1.0, 1.0])
    apply_penalties(lg, [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)], [{0: 2, 2: 1}])
    assert torch.allclose(lg, logits_row([1.0 - 1.0 - 0.25, 1.0, 1.0 - 0.5 - 0.25]))


def test_logprobs_and_top():
    lg = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    chosen, tops = gather_logprobs(lg, [1], [2])
    assert chosen[0] == pytest.approx(torch.log(torch.tensor(0.2)).item(), abs=1e-5)
    assert [t for t, _ in tops[0]] == [0, 1]


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(min_p=2), "min_p"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(frequency_penalty=9), "frequency_penalty"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[10**9]), "stop_token_ids"),
        (dict(n=0), "n"),
    ],
)
def test_verify_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw).verify(1000)
