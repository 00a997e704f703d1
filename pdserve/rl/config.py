"""The strategy's configuration, in the YAML shape of an RL framework's rollout workers
(seed 000):

    strategy_args:
      strategy_name: "sglang_pd_dis"
      strategy_config:
        mem_fraction_static: 0.9
        log_level: "info"
        prefill_tp_size: 1   # default device_count() / 2
        decode_tp_size: 1

`strategy_config` keys are `pdserve serve` flags with underscores (SGLang's names), plus the
strategy's own (prefill_tp_size, decode_tp_size, base_port, transfer_backend). A key that is
neither is an error, so a typo is not silently ignored. `disable_custom_all_reduce` is
accepted and does nothing: on CPU there is no custom all-reduce kernel to disable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STRATEGY_KEYS = {"prefill_tp_size", "decode_tp_size", "tp_size", "base_port", "router_port"}
NO_OP_ON_CPU = {"disable_custom_all_reduce"}
OWNED_FLAGS = {"port", "disaggregation_mode", "disaggregation_bootstrap_port", "num_threads"}
BASE_PORT = 30000
PORT_STRIDE = 500


@dataclass
class StrategyArgs:
    strategy_name: str
    strategy_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> StrategyArgs:
        """From `{"strategy_args": {...}}` or the inner `{strategy_name, strategy_config}`."""
        if not isinstance(d, dict):
            raise ValueError("strategy_args must be a mapping")
        d = d.get("strategy_args", d)
        name = d.get("strategy_name")
        if not isinstance(name, str):
            raise ValueError("strategy_args.strategy_name is required (e.g. 'sglang_pd_dis')")
        cfg = d.get("strategy_config") or {}
        if not isinstance(cfg, dict):
            raise ValueError("strategy_args.strategy_config must be a mapping")
        return cls(name, dict(cfg))

    @classmethod
    def from_yaml(cls, text: str) -> StrategyArgs:
        import yaml

        return cls.from_dict(yaml.safe_load(text))

    def engine_flags(self) -> list[str]:
        """`pdserve serve` flags from strategy_config (strategy keys left out), checked
        against serve's parser so a wrong key or value fails before anything starts."""
        from pdserve.server.serve_cli import build_parser

        parser = build_parser()
        known = {a.dest: a for a in parser._actions}
        flags: list[str] = []
        for key, value in self.strategy_config.items():
            if key in STRATEGY_KEYS or key in NO_OP_ON_CPU:
                continue
            if key in OWNED_FLAGS:
                raise ValueError(f"strategy_config.{key} is set by the strategy for each rank")
            action = known.get(key)
            if action is None:
                raise ValueError(
                    f"strategy_config.{key}: `pdserve serve` has no such flag "
                    f"(keys are its flags with underscores, e.g. mem_fraction_static)"
                )
            flag = action.option_strings[0]
            if action.nargs == 0:  # a switch
                if value is True:
                    flags.append(flag)
                elif value is not False:
                    raise ValueError(f"strategy_config.{key} must be true or false")
            else:
                flags += [flag, str(value)]
        ns, unknown = parser.parse_known_args(flags + ["--port", "1"])
        if unknown:
            raise ValueError(f"strategy_config: cannot pass {unknown}")
        return flags

    def get(self, key: str, default: Any = None) -> Any:
        return self.strategy_config.get(key, default)
