"""`pdserve launch --ray` on a simulated two-node Ray cluster (ray.cluster_utils.Cluster,
one CPU per node): the prefill and the decode server land on different nodes, the router
serves, and PD output equals the reference (mode null = transformers, tests/e2e/test_correctness.py)."""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from pdserve.net import free_port, free_port_run
from tests.weights_reference import MAX_NEW, PROMPTS, hf_generate, load_hf

pytestmark = pytest.mark.e2e
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20, "include_dashboard": False},
    )
    c.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def test_launch_on_two_ray_nodes(cluster):
    port = free_port_run(3)
    cmd = [
        sys.executable,
        "-m",
        "pdserve.cli",
        "launch",
        "--ray",
        "--ray-address",
        cluster.address,
        "--port",
        str(port),
        "--bootstrap-port-base",
        str(free_port()),
        "--dtype",
        "float32",
        "--max-total-tokens",
        "4096",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "is ready at" in line:
                break
        out = "".join(lines)
        assert "is ready at" in out, out
        nodes = set(re.findall(r"on Ray node (\w+)", out))
        assert len(nodes) == 2, out  # one server per node: each asked for the node's only CPU
        url = f"http://127.0.0.1:{port}"
        got = []
        for p in PROMPTS:
            r = httpx.post(
                url + "/generate",
                json={"text": p, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            got.append(r.json()["output_ids"])
        assert got == hf_generate(load_hf())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, "".join(lines[-20:])
