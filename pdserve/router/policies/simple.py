"""Stateless-ish policies: random, round_robin, power_of_two."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from pdserve.router.policies.base import LoadBalancingPolicy, register_policy

if TYPE_CHECKING:
    from pdserve.router.workers import Worker


@register_policy
class RandomPolicy(LoadBalancingPolicy):
    """Uniform choice (what SGLang's mini_lb does)."""

    name = "random"

    def select(self, workers: Sequence["Worker"], text: str | None) -> "Worker":
        return workers[self.rng.randrange(len(workers))]


@register_policy
class RoundRobinPolicy(LoadBalancingPolicy):
    """Cycles through the available workers in pool order."""

    name = "round_robin"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.counter = 0

    def select(self, workers: Sequence["Worker"], text: str | None) -> "Worker":
        w = workers[self.counter % len(workers)]
        self.counter += 1
        return w


@register_policy
class PowerOfTwoPolicy(LoadBalancingPolicy):
    """Two distinct random candidates; the one with the lower load wins (ties: random).

    Load is the worker's `/get_load` report plus this router's in-flight requests.
    """

    name = "power_of_two"
    needs_load = True

    def select(self, workers: Sequence["Worker"], text: str | None) -> "Worker":
        if len(workers) == 1:
            return workers[0]
        a, b = self.rng.sample(range(len(workers)), 2)
        wa, wb = workers[a], workers[b]
        return wa if wa.load <= wb.load else wb
