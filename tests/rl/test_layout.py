"""The strategy's rank rules and configuration checks (seed 000), without starting engines."""

import socket

import pytest

from pdserve.rl import StrategyArgs, create_strategy
from pdserve.launch.ray_actor import port_free
from pdserve.rl.layout import colocated_plan, pd_plan

SEED_YAML = """
strategy_args:
  strategy_name: "sglang_pd_dis"
  strategy_config:
    mem_fraction_static: 0.9
    log_level: "info"
    disable_custom_all_reduce: true
    prefill_tp_size: 4
    decode_tp_size: 4
"""


def test_the_seed_example_ranks_and_ports():
    args = StrategyArgs.from_yaml(SEED_YAML)
    assert args.strategy_name == "sglang_pd_dis"
    assert args.engine_flags() == ["--mem-fraction-static", "0.9", "--log-level", "info"]
    plans = pd_plan(8, args.get("prefill_tp_size"), args.get("decode_tp_size"))
    assert [p.port for p in plans] == [30000, 30500, 31000, 31500, 32000, 32500, 33000, 33500]
    assert [p.is_prefill for p in plans] == [True] * 4 + [False] * 4
    assert [p.dp_rank for p in plans] == [0, 1, 2, 3] * 2
    assert plans[0].log_line() == (
        "[sglang_pd_dis][local]: global_rank=0 dp_rank=0 dp_size=4 tp_size=4 is_prefill=True is_decode=False"
    )


def test_tp_sizes_default_to_half_the_devices_and_may_differ():
    assert {p.tp_size for p in pd_plan(4, devices=8)} == {4}
    plans = pd_plan(2, prefill_tp_size=1, decode_tp_size=2, devices=2)
    assert [p.tp_size for p in plans] == [1, 2]
    assert [p.port for p in colocated_plan(3, base_port=40000)] == [40000, 40500, 41000]


@pytest.mark.parametrize("world_size", [1, 3, 7, 0])
def test_an_odd_world_size_is_a_clear_error(world_size):
    with pytest.raises(ValueError, match="world_size must be even"):
        pd_plan(world_size, devices=2)


def test_bad_configuration_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="unknown strategy_name 'vllm_pd'"):
        create_strategy({"strategy_name": "vllm_pd"}, world_size=2)
    with pytest.raises(ValueError, match="strategy_config.mem_fraction: `pdserve serve` has no such flag"):
        create_strategy({"strategy_name": "sglang_pd_dis", "strategy_config": {"mem_fraction": 0.5}}, world_size=2)
    with pytest.raises(ValueError, match="set by the strategy"):
        StrategyArgs("sglang", {"port": 1}).engine_flags()
    with pytest.raises(ValueError, match="world_size must be even"):
        create_strategy({"strategy_name": "sglang_pd_dis"}, world_size=3)
    with pytest.raises(ValueError, match="base_port"):
        pd_plan(4, base_port=64900, devices=2)


def test_port_free_sees_a_taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not port_free("127.0.0.1", s.getsockname()[1])
