"""Routing policies: a base class, a registry, and `random`, `round_robin`,
`power_of_two`, `cache_aware` (importing this package registers all four)."""

from pdserve.router.policies.base import POLICIES, LoadBalancingPolicy, make_policy, register_policy
from pdserve.router.policies import cache_aware as _cache_aware  # noqa: F401  (registers)
from pdserve.router.policies import simple as _simple  # noqa: F401  (registers)

__all__ = ["POLICIES", "LoadBalancingPolicy", "make_policy", "register_policy"]
