"""A process that attaches a unified KV pool and runs alloc/free scripts against it
(tests/semi_pd/test_unified_memory.py). One JSON request per stdin line, one JSON answer
per stdout line:

    {"name": SEGMENT, "worker": 0, "rounds": 3, "ops": [["alloc", "r1", 0, 2], ["free", "r1"], ...]}
    -> {"errors": [...], "held": {"r1": {"0": [ids]}}, "allocs": n, "failed": n}

Every block it gets is filled with a value unique to (worker, request, layer) and checked
before it is freed: a block handed to both processes at once shows up as an overwritten
marker. Request ids are prefixed with the worker id, so the two never share one.
"""

from __future__ import annotations

import json
import logging
import sys

from pdserve.semi_pd.roles import InstanceRole
from pdserve.semi_pd.unified_memory_manager import UnifiedMemoryManager


def run(job: dict) -> dict:
    umm = UnifiedMemoryManager.attach(job["name"])
    w = int(job["worker"])
    role = InstanceRole.PREFILL if w == 0 else InstanceRole.DECODE
    held: dict[str, dict[int, list[int]]] = {}
    errors: list[str] = []
    allocs = failed = 0

    def marker(rid: str, layer: int) -> float:
        return float(w * 100000 + int(rid[1:]) * 100 + layer + 1)

    def verify(rid: str) -> None:
        for layer, ids in held.get(rid, {}).items():
            table = umm.get_block_table_index(f"w{w}-{rid}", layer)
            if table != ids:
                errors.append(f"{rid} layer {layer}: table {table} != allocated {ids}")
            m = marker(rid, layer)
            for i in ids:
                if not bool((umm.kv[i] == m).all()):
                    errors.append(f"block {i} of {rid} layer {layer} overwritten (held by two requests)")

    def free(rid: str) -> None:
        verify(rid)
        n = umm.deallocate_kv_cache_blocks(f"w{w}-{rid}")
        want = sum(len(v) for v in held.pop(rid, {}).values())
        if n != want:
            errors.append(f"freeing {rid} returned {n} blocks, it held {want}")

    for r in range(int(job.get("rounds", 1))):
        for op in job["ops"]:
            if op[0] == "alloc":
                _, rid, layer, n = op
                ids = umm.allocate_kv_cache_blocks(f"w{w}-{rid}", layer, n, role)
                if ids is None:
                    failed += 1
                    continue
                allocs += 1
                if len(set(ids)) != n:
                    errors.append(f"alloc of {n} returned {ids}")
                for i in ids:
                    umm.kv[i].fill_(marker(rid, layer))
                held.setdefault(rid, {}).setdefault(layer, []).extend(ids)
            elif op[0] == "free":
                free(op[1])
        if r + 1 < int(job.get("rounds", 1)):
            for rid in list(held):
                free(rid)
    for rid in list(held):
        verify(rid)
    umm.close()
    return {
        "errors": errors,
        "held": {rid: {str(k): v for k, v in t.items()} for rid, t in held.items()},
        "allocs": allocs,
        "failed": failed,
    }


def main() -> None:
    logging.disable(logging.WARNING)  # "Failed to allocate" is expected here, hundreds of times
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            out = run(json.loads(line))
        except Exception as e:  # reported to the test, which fails with it
            out = {"errors": [f"{type(e).__name__}: {e}"], "held": {}, "allocs": 0, "failed": 0}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
