"""Bootstrap server routes, limits, and the heartbeat monitor."""

import http.client
import json
import threading

import msgspec
import pytest

from pdserve.disagg.transfer.bootstrap import (
    BootstrapError,
    HeartbeatMonitor,
    KVBootstrapServer,
    RankInfo,
    check_health,
    fetch_route,
    register_rank,
    split_addr,
)
from tests.disagg.helpers import wait_for


def _info(rank=0, tp=2, port=1234):
    return RankInfo(
        engine_rank=rank,
        tp_size=tp,
        rank_ip="127.0.0.1",
        rank_port=port,
        backend="tcp",
        page_size=16,
        num_layers=2,
        total_kv_heads=4,
        head_dim=8,
        dtype="bfloat16",
    )


@pytest.fixture
def server():
    s = KVBootstrapServer("127.0.0.1", 0)
    yield s
    s.close()


def _raw(server, method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    out = r.status, r.read()
    c.close()
    return out


def test_register_and_lookup(server):
    assert fetch_route(server.addr).ranks == []
    register_rank(server.addr, _info(1, port=2000))
    t = fetch_route(server.addr)
    assert t.tp_size == 2 and [r.engine_rank for r in t.ranks] == [1]
    register_rank(server.addr, _info(0, port=1000))
    assert [r.rank_port for r in fetch_route(server.addr).ranks] == [1000, 2000]
    status, body = _raw(server, "GET", "/route?engine_rank=1")
    assert status == 200 and json.loads(body)["rank_port"] == 2000
    assert _raw(server, "GET", "/route?engine_rank=5")[0] == 404
    assert _raw(server, "GET", "/route?engine_rank=x")[0] == 400
    check_health(server.addr)
    assert _raw(server, "GET", "/health") == (200, b"OK")


def test_rejects_bad_bodies(server):
    assert _raw(server, "PUT", "/route", b"{not json", {"Content-Length": "9"})[0] == 400
    bad = msgspec.json.encode(_info()).replace(b'"127.0.0.1"', b'"not-an-ip"')
    assert _raw(server, "PUT", "/route", bad)[0] == 400
    bad = json.dumps({**json.loads(msgspec.json.encode(_info())), "engine_rank": 9}).encode()
    assert _raw(server, "PUT", "/route", bad)[0] == 400  # rank >= tp_size
    assert _raw(server, "PUT", "/route", b"x" * 70000)[0] == 413
    assert fetch_route(server.addr).ranks == []


def test_split_addr():
    assert split_addr("10.0.0.1:8998") == ("10.0.0.1", 8998)
    assert split_addr("[::1]:80") == ("::1", 80)
    for bad in ("nohost", "h:", ":80", "h:x"):
        with pytest.raises(ValueError):
            split_addr(bad)


def test_heartbeat_detects_death_and_recovery():
    s = KVBootstrapServer("127.0.0.1", 0)
    addr, port = s.addr, s.port
    dead, alive = [], threading.Event()
    hb = HeartbeatMonitor(addr, 0.1, 2, on_dead=lambda a, m: dead.append(m), on_alive=lambda a: alive.set())
    try:
        assert not wait_for(lambda: dead, 0.5)  # healthy: nothing reported
        s.close()
        assert wait_for(lambda: dead, 3)
        assert "2 consecutive heartbeats failed" in dead[0] and addr in dead[0]
        s = KVBootstrapServer("127.0.0.1", port)
        assert alive.wait(3) and len(dead) == 1
    finally:
        hb.stop()
        s.close()
    with pytest.raises((BootstrapError, OSError)):
        check_health(addr, timeout=0.5)
