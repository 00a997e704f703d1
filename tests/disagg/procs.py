"""Entry points of child processes started with multiprocessing 'spawn' (plain arguments only)."""

from __future__ import annotations

import logging
import time

from pdserve.disagg.transfer.bootstrap import KVBootstrapServer
from pdserve.disagg.metadata import KVMetadata
from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer.registry import KVClassType, get_kv_class
from pdserve.engine.shm_segment import allocate_kv_buffer, new_shm_name
from tests.disagg.helpers import make_manager, poll_until, wait_for

DONE = {KVPoll.Success, KVPoll.Failed}


def prefill_main(backend: str, seed: int, jobs: list, out, stop, overrides: dict) -> None:
    """Run a bootstrap server + prefill rank; for each (room, src_pages, token) wait for decode,
    send, report (room, state name); then idle until `stop` is set."""
    logging.basicConfig(level=logging.WARNING)
    bs = KVBootstrapServer("127.0.0.1", 0)
    mgr = make_manager(backend, DisaggregationMode.PREFILL, bootstrap_port=bs.port, seed=seed, **overrides)
    mgr.wait_registered(10)
    out.put(("ready", bs.port))
    sender_cls = get_kv_class(backend, KVClassType.SENDER)
    senders = {room: sender_cls(mgr, bs.addr, room) for room, _, _ in jobs}
    todo = list(jobs)
    deadline = time.monotonic() + 60
    while todo and time.monotonic() < deadline:  # a scheduler loop: non-blocking polls
        for job in list(todo):
            room, src, token = job
            s = senders[room]
            st = s.poll()
            if st == KVPoll.WaitingForInput:
                s.init(len(src))
                s.send(src, KVMetadata(room, token, -0.5, 0, len(src) * 4))
                todo.remove(job)
            elif st == KVPoll.Failed:
                todo.remove(job)
        time.sleep(0.001)
    for room, _, _ in jobs:
        out.put((room, poll_until(senders[room], DONE, 30).name))
    stop.wait(120)
    mgr.shutdown()
    bs.close()


def shm_owner_main(shape: tuple, out) -> None:
    """Allocate a shared-memory KV buffer, report its name, then wait to be killed."""
    import torch

    name = new_shm_name()
    allocate_kv_buffer(shape, torch.bfloat16, name)
    out.put(name)
    wait_for(lambda: False, 120, 0.5)
