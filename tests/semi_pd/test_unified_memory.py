"""Unified KV block pool (pdserve/semi_pd/unified_memory_manager.py): the seed's API, errors,
zero-copy sharing between processes, and a property test with two processes allocating and
freeing concurrently (no block held twice, none lost)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pdserve.config import ServerArgs
from pdserve.semi_pd.roles import InstanceRole
from pdserve.semi_pd.unified_memory_manager import UnifiedMemoryManager

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def umm():
    m = UnifiedMemoryManager(total_blocks=16, block_size=4096, page_size=16, device="cpu")
    yield m
    m.close()


def test_seed_api_roundtrip(umm):
    ids = umm.allocate_kv_cache_blocks("req_1", layer_id=0, num_blocks=10, requester_role=InstanceRole.PREFILL)
    assert len(ids) == 10 and len(set(ids)) == 10
    assert umm.get_block_table_index("req_1", 0) == ids
    more = umm.allocate_kv_cache_blocks("req_1", 0, 2, InstanceRole.DECODE)  # decode appends
    assert umm.get_block_table_index("req_1", 0) == ids + more
    assert umm.get_block_table_index("req_1", 1) == [] and umm.get_block_table_index("nope", 0) == []
    kv = umm.access_kv_cache("req_1", 0, InstanceRole.PREFILL)
    assert kv.shape == (12, 2, 16, 32)  # 4096 B = 2 x 16 tokens x 32 fp32
    usage = umm.get_memory_usage()
    assert usage["total_memory_bytes"] == 16 * 4096
    assert usage["allocated_memory_bytes"] == 12 * 4096
    assert usage["utilization_ratio"] == pytest.approx(12 / 16)
    assert usage["allocated_blocks_by_role"] == {"prefill": 10, "decode": 2}
    assert umm.allocate_kv_cache_blocks("req_2", 0, 5, "prefill") is None  # all or nothing
    assert umm.num_free_blocks == 4
    assert umm.deallocate_kv_cache_blocks("req_1") == 12
    assert umm.deallocate_kv_cache_blocks("req_1") == 0
    assert umm.get_memory_usage()["utilization_ratio"] == 0 and umm.check_consistency() == []


def test_blocks_are_shared_zero_copy_between_processes(umm):
    ids = umm.allocate_kv_cache_blocks("r", 3, 2, InstanceRole.PREFILL)
    for i in ids:  # non-consecutive would also work: views per block
        umm.kv[i].fill_(7.0)
    code = (
        "import sys; from pdserve.semi_pd.unified_memory_manager import UnifiedMemoryManager as U;"
        "m = U.attach(sys.argv[1]); kv = m.block_views('r', 3, 'decode');"
        "assert all(bool((b == 7.0).all()) for b in kv), 'prefill KV not visible';"
        "[b[1].fill_(9.0) for b in kv]; m.allocate_kv_cache_blocks('r', 3, 1, 'decode'); m.close()"
    )
    subprocess.run([sys.executable, "-c", code, umm.name], check=True, cwd=ROOT, timeout=60)
    table = umm.get_block_table_index("r", 3)
    assert table[:2] == ids and len(table) == 3  # decode's block appended to prefill's table
    assert all(bool((umm.kv[i][1] == 9.0).all()) and bool((umm.kv[i][0] == 7.0).all()) for i in ids)
    assert umm.get_memory_usage()["allocated_blocks_by_role"] == {"prefill": 2, "decode": 1}


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"total_blocks": 0}, "total_blocks (--unified-memory-blocks): must be >= 1"),
        ({"block_size": 100}, "block_size (--unified-memory-block-size): 100 bytes"),
        ({"page_size": 0}, "page_size (--unified-memory-page-size)"),
        ({"total_blocks": 2**40}, "more than this machine's RAM"),
        ({"device": "cuda"}, "device 'cuda'"),
    ],
)
def test_impossible_geometry(kwargs, needle):
    args = {"total_blocks": 4, "block_size": 4096, "page_size": 16, "device": "cpu", **kwargs}
    with pytest.raises(ValueError) as e:
        UnifiedMemoryManager(**args)
    assert needle in str(e.value)


def test_bad_calls(umm):
    with pytest.raises(ValueError, match="role"):
        umm.allocate_kv_cache_blocks("r", 0, 1, "encoder")
    with pytest.raises(ValueError, match="request_id"):
        umm.allocate_kv_cache_blocks("", 0, 1, "prefill")
    with pytest.raises(ValueError, match="num_blocks"):
        umm.allocate_kv_cache_blocks("r", 0, -1, "prefill")
    with pytest.raises(ValueError, match="not found"):
        UnifiedMemoryManager.attach("pdserve-kv-1-00000000deadbeef")
    assert umm.allocate_kv_cache_blocks("r", 0, 0, "prefill") == []


def test_lost_blocks_are_reclaimed(umm):
    """A process killed between taking blocks off the free stack and marking them owned
    leaks them (never hands them out twice); reclaim_lost_blocks returns them."""
    umm._hdr[6] -= 3  # what a crash right after the stack pop leaves
    assert umm.check_consistency() == ["3 blocks are neither free nor owned (lost)"]
    assert umm.reclaim_lost_blocks() == 3
    assert umm.check_consistency() == [] and umm.num_free_blocks == 16


def test_segment_unlinked_on_close():
    m = UnifiedMemoryManager(4, 4096, 16)
    path = f"/dev/shm/{m.name}"
    assert os.path.exists(path)
    m.close()
    assert not os.path.exists(path)


@pytest.mark.parametrize(
    "flags, needle",
    [
        ({"unified_memory_blocks": 0}, "--unified-memory-blocks: must be >= 1"),
        ({"unified_memory_block_size": 4000}, "--unified-memory-block-size: 4000 bytes"),
        ({"unified_memory_page_size": 2000}, "--unified-memory-page-size: must be in 1..1024"),
        ({"unified_memory_blocks": 10**9, "unified_memory_block_size": 2**20}, "more than this machine's RAM"),
    ],
)
def test_server_args_reject_impossible_pools(flags, needle):
    with pytest.raises(ValueError) as e:
        ServerArgs(**flags)
    assert needle in str(e.value)


# ---- two processes at once ---------------------------------------------------------------
class Workers:
    """Two long-lived worker processes (tests/semi_pd/umm_worker.py)."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": ROOT}
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.semi_pd.umm_worker"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]

    def run(self, name: str, scripts: list[list], rounds: int) -> list[dict]:
        for w, (p, ops) in enumerate(zip(self.procs, scripts)):  # both start before either answers
            p.stdin.write(json.dumps({"name": name, "worker": w, "rounds": rounds, "ops": ops}) + "\n")
            p.stdin.flush()
        out = []
        for p in self.procs:
            line = p.stdout.readline()
            assert line, f"worker {p.pid} died"
            out.append(json.loads(line))
        return out

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()
            p.wait(30)


@pytest.fixture(scope="module")
def workers():
    w = Workers()
    yield w
    w.close()


def check_after(umm: UnifiedMemoryManager, results: list[dict]) -> None:
    for w, r in enumerate(results):
        assert r["errors"] == [], (w, r["errors"][:5])
    held = [i for w, r in enumerate(results) for t in r["held"].values() for ids in t.values() for i in ids]
    assert len(held) == len(set(held)), "a block is held by both processes"
    assert umm.get_memory_usage()["allocated_blocks"] == len(held), "blocks leaked"
    assert umm.check_consistency() == []
    for w, r in enumerate(results):
        for rid in r["held"]:
            umm.deallocate_kv_cache_blocks(f"w{w}-{rid}")
    assert umm.num_free_blocks == umm.total_blocks and umm.check_consistency() == []


op = st.one_of(
    st.tuples(st.just("alloc"), st.sampled_from([f"r{i}" for i in range(6)]), st.integers(0, 2), st.integers(1, 5)),
    st.tuples(st.just("free"), st.sampled_from([f"r{i}" for i in range(6)])),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scripts=st.lists(st.lists(op, min_size=1, max_size=40), min_size=2, max_size=2), total_blocks=st.integers(4, 40))
def test_two_processes_allocate_and_free_concurrently(workers, scripts, total_blocks):
    with UnifiedMemoryManager(total_blocks, 256, 2) as umm:
        results = workers.run(umm.name, [[list(o) for o in s] for s in scripts], rounds=20)
        check_after(umm, results)


def test_two_processes_contend_for_a_small_pool(workers):
    """A long, fixed script on a pool both processes keep running out of."""
    import random

    rng = random.Random(13)
    scripts = [
        [
            ["alloc", f"r{rng.randrange(8)}", rng.randrange(3), rng.randint(1, 4)]
            if rng.random() < 0.6
            else ["free", f"r{rng.randrange(8)}"]
            for _ in range(400)
        ]
        for _ in range(2)
    ]
    with UnifiedMemoryManager(24, 256, 2) as umm:
        results = workers.run(umm.name, scripts, rounds=10)
        assert all(r["failed"] > 0 and r["allocs"] > 100 for r in results), results  # it did contend
        check_after(umm, results)
