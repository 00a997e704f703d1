"""RL rollout strategies on Ray, with weight sync and memory release (docs/rl.md)."""

from pdserve.rl.config import StrategyArgs
from pdserve.rl.strategy import STRATEGIES, InferenceStrategy, SgLangPdDisStrategy, SgLangStrategy, create_strategy
from pdserve.rl.trainer import TrainerGroup

__all__ = [
    "STRATEGIES",
    "InferenceStrategy",
    "SgLangPdDisStrategy",
    "SgLangStrategy",
    "StrategyArgs",
    "TrainerGroup",
    "create_strategy",
]
