"""RL weight sync and memory release on a real server (issue #15; SGLang's endpoints).

A trainer (this test process) is rank 0 of a gloo group the server joins over HTTP
(/init_weights_update_group); it perturbs weights of the real model and broadcasts them,
per parameter and as one flattened bucket (/update_weights_from_distributed). The server's
weights then equal the trainer's (/get_weights_by_name), its greedy output equals
transformers run with the same perturbed weights (fp32) and differs from before. A bad
update changes nothing; memory released gives RSS back and resumed gives the same output."""

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import psutil
import pytest
import torch
import torch.distributed as dist

from pdserve.net import free_port
from tests.conftest import ServerProc
from tests.weights_reference import BUCKET, MAX_NEW, PER_PARAM, PROMPTS, hf_generate, load_hf, perturbed

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server():
    s = ServerProc("--dtype", "float32", "--max-total-tokens", "8192")
    yield s
    s.stop()


def generate(url: str) -> list[list[int]]:
    outs = []
    for p in PROMPTS:
        r = httpx.post(
            url + "/generate",
            json={"text": p, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        outs.append(r.json()["output_ids"])
    return outs


def scheduler_rss(server) -> int:
    parent = psutil.Process(server.proc.pid)
    procs = [p for p in parent.children(recursive=True) if "scheduler_process" in " ".join(p.cmdline())]
    assert len(procs) == 1
    return procs[0].memory_info().rss


def test_broadcast_update_then_release_and_resume(server):
    url = server.url
    before = generate(url)
    hf = load_hf()
    new = perturbed(hf)

    # the trainer hosts the group's store and is rank 0; the server joins as rank 1
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    pool = ThreadPoolExecutor(1)
    join = pool.submit(
        httpx.post,
        url + "/init_weights_update_group",
        json={
            "master_address": "127.0.0.1",
            "master_port": port,
            "rank_offset": 1,
            "world_size": 2,
            "group_name": "g1",
            "backend": "gloo",
        },
        timeout=120,
    )
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=60)
    opts._devices = [dist.ProcessGroupGloo.create_default_device()]
    group = dist.ProcessGroupGloo(dist.PrefixStore("g1", store), 0, 2, opts)
    assert join.result().status_code == 200, join.result().text

    # per parameter: one broadcast per name
    body = {
        "names": PER_PARAM,
        "dtypes": ["float32"] * 2,
        "shapes": [list(new[n].shape) for n in PER_PARAM],
        "group_name": "g1",
    }
    call = pool.submit(httpx.post, url + "/update_weights_from_distributed", json=body, timeout=120)
    for n in PER_PARAM:
        group.broadcast(new[n].contiguous(), 0).wait()
    assert call.result().status_code == 200, call.result().text
    # one flattened bucket: the tensors' bytes back to back
    body = {
        "names": BUCKET,
        "dtypes": ["float32"] * 2,
        "shapes": [list(new[n].shape) for n in BUCKET],
        "group_name": "g1",
        "load_format": "flattened_bucket",
    }
    call = pool.submit(httpx.post, url + "/update_weights_from_distributed", json=body, timeout=120)
    flat = torch.cat([new[n].contiguous().view(-1).view(torch.uint8) for n in BUCKET])
    group.broadcast(flat, 0).wait()
    assert call.result().status_code == 200, call.result().text

    for n in [*PER_PARAM, *BUCKET]:
        r = httpx.post(url + "/get_weights_by_name", json={"name": n, "truncate_size": 3}, timeout=30)
        assert r.status_code == 200, r.text
        torch.testing.assert_close(torch.tensor(r.json()), new[n][:3], rtol=0, atol=0)

    after = generate(url)
    assert after == hf_generate(hf, new)
    assert after != before

    # a bad update is rejected whole: the good tensor in it is not applied either
    from safetensors.torch import save

    good = {"model.layers.3.mlp.down_proj.weight": torch.zeros(576, 1536)}
    for bad in (
        {"model.layers.3.mlp.no_such.weight": torch.zeros(3)},
        {"model.layers.3.self_attn.q_proj.weight": torch.zeros(5, 5)},
    ):
        payload = base64.b64encode(save({**good, **bad})).decode()
        r = httpx.post(url + "/update_weights_from_tensor", json={"serialized_named_tensors": [payload]}, timeout=60)
        assert r.status_code == 400 and "weights not updated" in r.json()["message"], r.text
    r = httpx.post(
        url + "/get_weights_by_name",
        json={"name": "model.layers.3.mlp.down_proj.weight", "truncate_size": 1},
        timeout=30,
    )
    assert torch.tensor(r.json()).abs().sum() > 0
    assert httpx.post(url + "/destroy_weights_update_group", json={"group_name": "g1"}, timeout=30).status_code == 200

    # memory: released while a request is in flight -> refused; then released for real
    assert httpx.post(url + "/pause_generation", timeout=30).status_code == 200
    stream = pool.submit(
        httpx.post,
        url + "/generate",
        json={"text": PROMPTS[0], "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}},
        timeout=120,
    )
    deadline = time.time() + 30
    while server.load()["num_running_reqs"] + server.load()["num_waiting_reqs"] == 0 and time.time() < deadline:
        time.sleep(0.05)
    r = httpx.post(url + "/release_memory_occupation", json={}, timeout=60)
    assert r.status_code == 409 and "in flight" in r.json()["message"], r.text
    assert httpx.post(url + "/continue_generation", timeout=30).status_code == 200
    assert stream.result().json()["output_ids"] == after[0]

    info = httpx.get(url + "/get_server_info", timeout=30).json()
    kv_bytes = info["max_total_num_tokens"] * 30 * 2 * 3 * 64 * 4  # layers x (k, v) x heads x dim x fp32
    time.sleep(2)  # the pool's background prefault
    rss0 = scheduler_rss(server)
    r = httpx.post(url + "/release_memory_occupation", json={"tags": ["weights", "kv_cache"]}, timeout=120)
    assert r.status_code == 200, r.text
    dropped = rss0 - scheduler_rss(server)
    assert dropped >= 0.8 * (info["weight_bytes"] + kv_bytes), (dropped, info["weight_bytes"], kv_bytes)
    r = httpx.post(url + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}, timeout=30)
    assert r.status_code == 503 and "resume_memory_occupation" in r.text
    assert httpx.post(url + "/resume_memory_occupation", json={}, timeout=120).status_code == 200
    assert generate(url) == after
    assert server.wait_idle_and_free()["num_used_pages"] == 0


def test_bad_calls_get_clear_errors(server):
    url = server.url
    cases = [
        (
            "/init_weights_update_group",
            {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 0, "world_size": 2},
            "rank_offset",
        ),
        (
            "/init_weights_update_group",
            {"master_address": "127.0.0.1", "master_port": "x", "rank_offset": 1, "world_size": 2},
            "master_port",
        ),
        (
            "/init_weights_update_group",
            {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2, "backend": "nccl"},
            "needs GPUs",
        ),
        (
            "/update_weights_from_distributed",
            {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "nope"},
            "no weights update group",
        ),
        ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["int64"], "shapes": [[1]]}, "dtype"),
        ("/update_weights_from_tensor", {"serialized_named_tensors": ["%%%"]}, "base64"),
        ("/update_weights_from_disk", {"model_path": "/nonexistent/model"}, "model_path"),
        ("/get_weights_by_name", {"name": "nope"}, "unknown weight name"),
        ("/release_memory_occupation", {"tags": ["gpu"]}, "unknown memory tag"),
    ]
    for path, body, words in cases:
        r = httpx.post(url + path, json=body, timeout=30)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        assert words in r.text, (path, r.text)
