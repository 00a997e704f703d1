"""The routing-policy interface and its registry.

A policy picks one worker out of a non-empty list of available ones. The router
calls it once per role per attempt (prefill and decode policies are separate
instances, so their state, such as a round-robin counter or prefix trees, is too).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Sequence

if TYPE_CHECKING:
    from pdserve.router.config import RouterConfig
    from pdserve.router.workers import Worker


class LoadBalancingPolicy(ABC):
    """Base class; subclasses set `name` and register with `@register_policy`."""

    name: ClassVar[str]
    # True when the policy reads `Worker.load`: the router then polls /get_load
    needs_load: ClassVar[bool] = False

    def __init__(self, config: "RouterConfig", rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()

    @abstractmethod
    def select(self, workers: Sequence["Worker"], text: str | None) -> "Worker":
        """One of `workers` (never empty). `text` is the request's routing key
        (prompt text, joined chat messages, or token ids as text), or None."""

    def on_worker_removed(self, url: str) -> None:
        """Forget any state about a worker that left the pool."""


POLICIES: dict[str, type[LoadBalancingPolicy]] = {}


def register_policy(cls: type[LoadBalancingPolicy]) -> type[LoadBalancingPolicy]:
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, config: "RouterConfig", rng: random.Random | None = None) -> LoadBalancingPolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose from {', '.join(sorted(POLICIES))}") from None
    return cls(config, rng)
