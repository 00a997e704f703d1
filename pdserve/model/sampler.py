"""Pure sampling functions over a batch of logits."""

from __future__ import annotations

from typing import Sequence

import torch

from pdserve.sampling_params import SamplingParams


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], counts: Sequence[dict[int, int]]) -> None:
    """In place: OpenAI-style frequency and presence penalties over generated tokens."""
    for i, (p, c) in enumerate(zip(params, counts)):
        if not p.has_penalty or not c:
            continue
        ids = torch.tensor(list(c.keys()), dtype=torch.long)
        n = torch.tensor(list(c.values()), dtype=logits.dtype)
        logits[i, ids] -= p.frequency_penalty * n + p.presence_penalty


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """In place: OpenAI's logit_bias (token id -> bias added to its logit), row i for params[i]."""
    for i, p in enumerate(params):
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias.keys()), dtype=torch.long)
            logits[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)


def _filter_probs(probs: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    # probs: [V] for one row
    if p.min_p > 0.0:
        probs = torch.where(probs < p.min_p * probs.max(), torch.zeros_like(probs), probs)
    if p.top_k > 0 and p.top_k < probs.shape[-1]:
        kth = torch.topk(probs, p.top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, 0)
        drop = (cum - sorted_p) > p.top_p * cum[-1]  # keep the smallest set reaching top_p
        sorted_p = torch.where(drop, torch.zeros_like(sorted_p), sorted_p)
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability probs[i] / probs.sum() (probs: [V], >= 0, not all 0):
    the inverse of the cumulative distribution at one uniform number, in float64.
    `torch.multinomial` draws from the same distribution but cost ~1.3 ms per row over a
    49k vocabulary on this CPU (one thread), ~25x this; at temperature 1, the OpenAI routes'
    default, that was ~8 % of a single-stream decode step (docs/benchmarks.md, #12)."""
    cum = torch.cumsum(probs, 0, dtype=torch.float64)
    u = torch.rand(1, dtype=torch.float64, generator=generator) * cum[-1]
    i = int(torch.searchsorted(cum, u, right=True))  # first i with cum[i] > u: never a zero
    if i >= probs.shape[0]:  # u rounded up to the total: the last index with mass
        i = int(probs.nonzero()[-1])
    return i


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """logits: [N, V] float32 (penalties applied). Returns one token id per row."""
    greedy = [p.greedy for p in params]
    ids = logits.argmax(dim=-1).tolist() if any(greedy) else [0] * len(params)
    for i, p in enumerate(params):
        if greedy[i]:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        probs = _filter_probs(probs, p)
        ids[i] = draw(probs, generators[i])
    return ids


def gather_logprobs(
    logits: torch.Tensor, ids: list[int], top_nums: Sequence[int]
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities (of the model's distribution after penalties, before
    temperature) of the chosen tokens, and the top-k alternatives per row."""
    # a token banned by a grammar mask has logit -inf: report OpenAI's floor, -9999.0, so
    # that the answer stays valid JSON (no -Infinity)
    lp = torch.log_softmax(logits, dim=-1).clamp_min_(-9999.0)
    chosen = lp[torch.arange(len(ids)), torch.tensor(ids)].tolist()
    tops: list[list[tuple[int, float]]] = []
    for i, k in enumerate(top_nums):
        if k > 0:
            v, ix = torch.topk(lp[i], k)
            tops.append(list(zip(ix.tolist(), v.tolist())))
        else:
            tops.append([])
    return chosen, tops
