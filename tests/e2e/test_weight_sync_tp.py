"""RL weight sync and memory release with --tp-size 2 (issue #15): every tp rank gets the calls;
and the same calls through a router, to a tp-1 and a tp-2 server at once.

One real tp-2 server (rank 1 in its own process; SmolLM2's 3 KV heads split 1 + 2). The trainer
(this test process) hosts a gloo group of world size 3; the server's ranks join it as
rank_offset + tp_rank = 1 and 2 and each receives the broadcasts and cuts its own shard. Then
/get_weights_by_name (put together from both ranks) equals the trainer's tensors, greedy output
equals transformers with the new weights; an update whose whole shape is wrong but whose rank-0
shard would fit is rejected on every rank; release gives back each rank's memory, resume gives
the same output; /update_weights_from_disk (each rank reads the checkpoint) restores the original.

Through a router (plain mode, its own key; the workers' admin key on the fan-outs): the group is
joined with rank offsets 1 and 2 (tp sizes 1 and 2, world size 4), one broadcast reaches both
servers, release/resume/update-from-disk reach both.
"""

import base64
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import psutil
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save

from pdserve.model.paths import default_model_path
from pdserve.net import free_port
from tests.conftest import ServerProc
from pdserve.router.config import HealthCheckConfig, RouterConfig
from pdserve.router.serve import RouterThread
from tests.weights_reference import BUCKET, MAX_NEW, PER_PARAM, PROMPTS, hf_generate, load_hf, perturbed

pytestmark = pytest.mark.e2e

ADMIN, ROUTER = "admin-key", "router-key"
SERVER_ARGS = ("--dtype", "float32", "--max-total-tokens", "4096", "--admin-api-key", ADMIN)


@pytest.fixture(scope="module")
def tp2():
    s = ServerProc(*SERVER_ARGS, "--tp-size", "2")
    yield s
    s.stop()


def post(url: str, path: str, body: dict | None = None, key: str = ADMIN, timeout: float = 300) -> httpx.Response:
    return httpx.post(url + path, json=body or {}, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def generate(url: str, key: str = ADMIN) -> list[list[int]]:
    outs = []
    for p in PROMPTS:
        r = post(url, "/generate", {"text": p, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}}, key)
        assert r.status_code == 200, r.text
        outs.append(r.json()["output_ids"])
    return outs


def trainer_group(port: int, world: int, name: str):
    """The trainer's end: host the store and join as rank 0 (blocks until every rank joined)."""
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=60)
    opts._devices = [dist.ProcessGroupGloo.create_default_device()]
    return dist.ProcessGroupGloo(dist.PrefixStore(name, store), 0, world, opts), store


def rank_procs(server) -> list[psutil.Process]:
    """[rank 0 (the scheduler process), rank 1 (its tp worker)]."""
    parent = psutil.Process(server.proc.pid)
    sched = next(p for p in parent.children(recursive=True) if "scheduler_process" in " ".join(p.cmdline()))
    worker = next(p for p in sched.children() if "tp_worker" in " ".join(p.cmdline()))
    return [sched, worker]


def weight(url: str, name: str, rows: int, key: str = ADMIN) -> torch.Tensor:
    r = post(url, "/get_weights_by_name", {"name": name, "truncate_size": rows}, key)
    assert r.status_code == 200, r.text
    return torch.tensor(r.json())


def test_tp2_weight_sync_release_resume(tp2):
    url = tp2.url
    hf = load_hf()  # hf_generate puts the new weights into it: each test loads its own
    pool = ThreadPoolExecutor(2)
    try:
        before = generate(url)
        new = perturbed(hf)

        port = free_port()
        spec = {"master_address": "127.0.0.1", "master_port": port, "world_size": 3, "group_name": "tp"}
        r = post(url, "/init_weights_update_group", {**spec, "rank_offset": 2})
        assert r.status_code == 400 and "rank_offset" in r.text  # rank 1 would be rank 3 of 3
        join = pool.submit(post, url, "/init_weights_update_group", {**spec, "rank_offset": 1})
        group, _store = trainer_group(port, 3, "tp")  # both tp ranks joined
        assert join.result().status_code == 200, join.result().text
        assert "rank 1..2" in join.result().json()["message"]

        # per parameter (down_proj: columns split over the ranks; norm: on both) and one bucket
        # (k_proj: heads split 1 + 2; up_proj: rows split)
        for names, fmt in ((PER_PARAM, None), (BUCKET, "flattened_bucket")):
            body = {
                "names": names,
                "dtypes": ["float32"] * len(names),
                "shapes": [list(new[n].shape) for n in names],
                "group_name": "tp",
                "load_format": fmt,
            }
            call = pool.submit(post, url, "/update_weights_from_distributed", body)
            if fmt is None:
                for n in names:
                    group.broadcast(new[n].contiguous(), 0).wait()
            else:
                group.broadcast(torch.cat([new[n].contiguous().view(-1).view(torch.uint8) for n in names]), 0).wait()
            assert call.result().status_code == 200, call.result().text

        # whole tensors, put together from both ranks' shards (k_proj: all 192 rows; up_proj:
        # past the split at row 768; down_proj: both halves of each row)
        for n, rows in ((PER_PARAM[0], 3), (PER_PARAM[1], 1), (BUCKET[0], 192), (BUCKET[1], 800)):
            torch.testing.assert_close(weight(url, n, rows), new[n][:rows], rtol=0, atol=0)
        after = generate(url)
        assert after == hf_generate(hf, new)
        assert after != before

        # q_proj 600 x 576: rank 0's slice (rows 0..191) would fit, the whole does not -> no
        # rank takes any of it, nor the good down_proj beside it
        bad = {
            "model.layers.3.mlp.down_proj.weight": torch.zeros(576, 1536),
            "model.layers.3.self_attn.q_proj.weight": torch.zeros(600, 576),
        }
        entry = base64.b64encode(save(bad)).decode()
        r = post(url, "/update_weights_from_tensor", {"serialized_named_tensors": [entry, entry]})  # one per rank
        assert r.status_code == 400 and "weights not updated" in r.text and "[576, 576]" in r.text, r.text
        r = post(url, "/update_weights_from_tensor", {"serialized_named_tensors": [entry] * 3})
        assert r.status_code == 400 and "one per tensor-parallel rank (2)" in r.text, r.text
        down = weight(url, "model.layers.3.mlp.down_proj.weight", 1)
        assert down[0, :768].abs().sum() > 0 and down[0, 768:].abs().sum() > 0  # rank 0's and rank 1's columns

        # memory: each rank gives back what it reports; 503 while released; same output after
        procs = rank_procs(tp2)
        rss0 = [p.memory_info().rss for p in procs]
        r = post(url, "/release_memory_occupation")
        assert r.status_code == 200, r.text
        ranks = r.json()["data"]["ranks"]
        assert len(ranks) == 2 and ranks[1]["bytes_released"] > 100 * 2**20
        for p, rss, info in zip(procs, rss0, ranks):
            assert rss - p.memory_info().rss >= 0.8 * info["bytes_released"], (rss, p.memory_info().rss, info)
        r = post(url, "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2}})
        assert r.status_code == 503
        assert post(url, "/resume_memory_occupation").status_code == 200
        assert generate(url) == after

        # every rank reads the checkpoint and takes its shard: back to the original output
        r = post(url, "/update_weights_from_disk", {"model_path": default_model_path()})
        assert r.status_code == 200, r.text
        assert generate(url) == before
        assert post(url, "/destroy_weights_update_group", {"group_name": "tp"}).status_code == 200
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def test_through_a_router_to_tp1_and_tp2_servers(tp2):
    hf = load_hf()
    tp1 = ServerProc(*SERVER_ARGS)
    cfg = RouterConfig(
        worker_urls=(tp1.url, tp2.url),
        port=0,
        policy="round_robin",
        api_key=ROUTER,
        worker_admin_api_key=ADMIN,
        request_timeout_secs=300,
        load_check_interval_secs=0,
        health=HealthCheckConfig(interval_secs=1.0, timeout_secs=5.0),
    )
    pool = ThreadPoolExecutor(2)
    try:
        with RouterThread(cfg) as rt:
            url = rt.url
            before = generate(tp1.url)
            assert post(url, "/release_memory_occupation", key=ADMIN).status_code == 401  # the router's key
            new = perturbed(hf)
            port = free_port()
            spec = {"master_address": "127.0.0.1", "master_port": port, "group_name": "rt"}
            r = post(url, "/init_weights_update_group", {**spec, "world_size": 3}, ROUTER)
            assert r.status_code == 400 and "[1, 2]" in r.text, r.text  # 1 + tp sizes 1 and 2
            join = pool.submit(post, url, "/init_weights_update_group", {**spec, "world_size": 4}, ROUTER)
            group, _store = trainer_group(port, 4, "rt")
            r = join.result()
            assert r.status_code == 200, r.text
            assert [w["rank_offset"] for w in r.json()["workers"]] == [1, 2]

            body = {
                "names": PER_PARAM,
                "dtypes": ["float32"] * 2,
                "shapes": [list(new[n].shape) for n in PER_PARAM],
                "group_name": "rt",
            }
            call = pool.submit(post, url, "/update_weights_from_distributed", body, ROUTER)
            for n in PER_PARAM:  # one broadcast reaches both servers (all three engine ranks)
                group.broadcast(new[n].contiguous(), 0).wait()
            r = call.result()
            assert r.status_code == 200 and len(r.json()["workers"]) == 2, r.text
            torch.testing.assert_close(weight(url, PER_PARAM[0], 2, ROUTER), new[PER_PARAM[0]][:2], rtol=0, atol=0)
            want = hf_generate(hf, {n: new[n] for n in PER_PARAM})
            assert generate(tp1.url) == want and generate(tp2.url) == want

            r = post(url, "/release_memory_occupation", {"tags": ["weights"]}, ROUTER)
            assert r.status_code == 200 and all(w["status"] == 200 for w in r.json()["workers"]), r.text
            assert post(tp1.url, "/generate", {"text": "hi"}).status_code == 503
            assert post(tp2.url, "/generate", {"text": "hi"}).status_code == 503
            assert post(url, "/resume_memory_occupation", {"tags": ["weights"]}, ROUTER).status_code == 200
            r = post(url, "/update_weights_from_disk", {"model_path": default_model_path()}, ROUTER)
            assert r.status_code == 200, r.text
            assert generate(tp1.url) == before and generate(tp2.url) == before
            assert post(url, "/destroy_weights_update_group", {"group_name": "rt"}, ROUTER).status_code == 200
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        tp1.stop()
