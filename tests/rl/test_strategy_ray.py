"""The sglang_pd_dis strategy on a real local Ray (2 CPUs): one prefill engine (tp 1) and one
decode engine (tp 2: different tp sizes on the two sides) plus the router, a trainer in this
process pushing weights into every engine rank (per parameter, in a bucket, point to point),
memory offload and reload (issue #15)."""

import logging
import random
import socket

import pytest
import torch

from pdserve.rl import TrainerGroup, create_strategy
from pdserve.launch.ray_actor import port_free
from pdserve.net import free_port
from tests.weights_reference import BUCKET, MAX_NEW, PER_PARAM, PROMPTS, hf_generate, load_hf, perturbed

pytestmark = pytest.mark.e2e
ray = pytest.importorskip("ray")

GREEDY = {"max_new_tokens": MAX_NEW, "temperature": 0}


def free_base_port() -> int:
    for _ in range(200):
        base = random.randrange(20000, 60000, 10)
        if all(port_free("127.0.0.1", p) for p in (base - 1, base, base + 1, base + 500, base + 501)):
            return base
    raise RuntimeError("no free ports")


def config(base: int, **extra) -> dict:
    return {
        "strategy_args": {
            "strategy_name": "sglang_pd_dis",
            "strategy_config": {
                "dtype": "float32",
                "max_total_tokens": 4096,
                "log_level": "warning",
                "base_port": base,
                "disable_custom_all_reduce": True,
                **extra,
            },
        }
    }


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_taken_port_is_a_clear_error(ray_local):
    base = free_base_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 500))  # the decode rank's port
        s.listen()
        strategy = create_strategy(config(base), world_size=2, cpus_per_rank=1)
        with pytest.raises(RuntimeError, match=f"port {base + 500} .* is taken"):
            strategy.initialize()


def test_rollouts_weight_sync_and_offload(ray_local, caplog):
    caplog.set_level(logging.INFO, logger="pdserve.rl")
    strategy = create_strategy(config(free_base_port(), decode_tp_size=2), world_size=2, cpus_per_rank=1)
    with strategy:
        logs = caplog.text
        assert "[sglang_pd_dis][local]: global_rank=0 dp_rank=0 dp_size=1 tp_size=1 is_prefill=True" in logs
        assert "[sglang_pd_dis][local]: global_rank=1 dp_rank=0 dp_size=1 tp_size=2 is_prefill=False" in logs
        assert "Initialized prefill engine on rank 0" in logs
        assert f"Initializing router with prefill URLs: ['{strategy.urls[0]}']" in logs
        assert "Router started successfully" in logs

        before = strategy.generate(PROMPTS, GREEDY)
        assert all(len(o["output_ids"]) == MAX_NEW and len(o["output_token_logprobs"]) == MAX_NEW for o in before)
        hf = load_hf()
        assert [o["output_ids"] for o in before] == hf_generate(hf)  # PD output = the reference
        new = perturbed(hf)

        # trainer = rank 0; the prefill engine rank 1, the decode engine's tp ranks 2 and 3
        assert strategy.weight_sync_world_size() == 4
        port = free_port()
        trainer = TrainerGroup("127.0.0.1", port, strategy.weight_sync_world_size(), group_name="actor")
        pending = strategy.setup_collective_group("actor", "127.0.0.1", port)
        trainer.connect()
        pending.wait(120)
        pending = strategy.broadcast_parameter(
            "actor", PER_PARAM, ["float32"] * 2, [list(new[n].shape) for n in PER_PARAM]
        )
        trainer.broadcast([new[n] for n in PER_PARAM])
        pending.wait(120)
        pending = strategy.broadcast_bucket(
            "actor", [{"name": n, "dtype": "float32", "shape": list(new[n].shape)} for n in BUCKET]
        )
        trainer.broadcast_bucket([new[n] for n in BUCKET])
        pending.wait(120)
        for n, rows in ((PER_PARAM[0], 2), (PER_PARAM[1], 1), (BUCKET[0], 192), (BUCKET[1], 2)):
            for got in strategy.get_weights_by_name(n, truncate_size=rows):  # both engines, all ranks
                torch.testing.assert_close(torch.tensor(got), new[n][:rows], rtol=0, atol=0)
        after = [o["output_ids"] for o in strategy.generate(PROMPTS, GREEDY)]
        assert after == hf_generate(hf, new)
        assert after != [o["output_ids"] for o in before]

        # point to point, in a bucket: back to the old values of one weight
        old = dict(hf.named_parameters())  # hf now holds `new`; restore PER_PARAM[1] by /1.3
        restored = (old[PER_PARAM[1]].detach() / 1.3).contiguous()
        buf = restored.view(-1).view(torch.uint8)
        strategy.update_parameter_in_bucket(
            [{"name": PER_PARAM[1], "dtype": "float32", "shape": list(restored.shape), "offset": 0}], buf
        )
        rows = strategy.get_weights_by_name(PER_PARAM[1], truncate_size=4)
        assert all(torch.allclose(torch.tensor(r), restored[:4]) for r in rows)
        with pytest.raises(RuntimeError, match="unknown weight name"):
            strategy.update_parameter("model.layers.0.no_such.weight", torch.zeros(3))
        strategy.update_parameter(PER_PARAM[1], new[PER_PARAM[1]])

        # offload gives memory back on both ranks; reload gives the same rollouts
        rss0 = strategy.engine_rss_bytes()
        strategy.offload_states()
        rss1 = strategy.engine_rss_bytes()
        assert all(a - b > 400 * 2**20 for a, b in zip(rss0, rss1)), (rss0, rss1)
        strategy.load_states()
        assert [o["output_ids"] for o in strategy.generate(PROMPTS, GREEDY)] == after
