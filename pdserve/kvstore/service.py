"""The embedded KV cache data service (`pdserve kvstore`): an HTTP server in front of a
MemoryStore, shared by every server started with `--kv-store http://host:port`.

Routes (bodies msgpack, never pickle): POST /exists [keys] -> int; POST /get [keys] ->
[record | nil]; POST /put [[key, record], ...] -> 204; GET /health; GET /metrics
(Prometheus). Keys are 64 hex characters; a record whose header, key, length or checksum
is wrong is refused (400) and nothing of that request is stored.
"""

from __future__ import annotations

import re

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from pdserve.kvstore.memory import MemoryStore
from pdserve.kvstore.record import RecordError, check

KEY = re.compile(r"^[0-9a-f]{64}$")
MAX_KEYS = 65536
MAX_BODY = 1 << 30
_keys_dec = msgspec.msgpack.Decoder(list[str])
_items_dec = msgspec.msgpack.Decoder(list[tuple[str, bytes]])
_enc = msgspec.msgpack.Encoder()


def _keys(data: bytes) -> list[str]:
    try:
        keys = _keys_dec.decode(data)
    except msgspec.DecodeError as e:
        raise web.HTTPBadRequest(text=f"body must be a msgpack list of keys: {e}") from None
    if len(keys) > MAX_KEYS or not all(KEY.match(k) for k in keys):
        raise web.HTTPBadRequest(text=f"at most {MAX_KEYS} keys of 64 hex characters")
    return keys


def build_app(store: MemoryStore) -> web.Application:
    reg = CollectorRegistry()
    pages = Gauge("pdserve_kvstore_pages", "records held", registry=reg)
    used = Gauge("pdserve_kvstore_used_bytes", "bytes held", registry=reg)
    cap = Gauge("pdserve_kvstore_capacity_bytes", "capacity in bytes", registry=reg)
    hits = Counter("pdserve_kvstore_hit_pages", "records found by /exists and /get", registry=reg)
    misses = Counter("pdserve_kvstore_miss_pages", "records asked for by /get and not held", registry=reg)
    bytes_in = Counter("pdserve_kvstore_bytes_in", "record bytes received by /put", registry=reg)
    bytes_out = Counter("pdserve_kvstore_bytes_out", "record bytes sent by /get", registry=reg)
    evictions = Gauge("pdserve_kvstore_evicted_pages", "records evicted (LRU) so far", registry=reg)
    cap.set(store.capacity)

    async def exists(req: web.Request) -> web.Response:
        n = store.exists(_keys(await req.read()))
        hits.inc(n)
        return web.Response(body=_enc.encode(n), content_type="application/msgpack")

    async def get(req: web.Request) -> web.Response:
        recs = store.get(_keys(await req.read()))
        found = [r for r in recs if r is not None]
        hits.inc(len(found))
        misses.inc(len(recs) - len(found))
        bytes_out.inc(sum(len(r) for r in found))
        return web.Response(body=_enc.encode(recs), content_type="application/msgpack")

    async def put(req: web.Request) -> web.Response:
        try:
            items = _items_dec.decode(await req.read())
        except msgspec.DecodeError as e:
            raise web.HTTPBadRequest(text=f"body must be a msgpack list of [key, record]: {e}") from None
        if len(items) > MAX_KEYS:
            raise web.HTTPBadRequest(text=f"at most {MAX_KEYS} records per request")
        for k, rec in items:
            if not KEY.match(k):
                raise web.HTTPBadRequest(text="keys are 64 hex characters")
            try:
                check(k, rec)
            except RecordError as e:
                raise web.HTTPBadRequest(text=f"record {k[:12]}...: {e}") from None
        store.put(items)
        bytes_in.inc(sum(len(r) for _, r in items))
        return web.Response(status=204)

    async def health(_req: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "pages": len(store), "used_bytes": store.used, "capacity_bytes": store.capacity}
        )

    async def metrics(_req: web.Request) -> web.Response:
        pages.set(len(store))
        used.set(store.used)
        evictions.set(store.evicted)
        return web.Response(body=generate_latest(reg), content_type="text/plain")

    app = web.Application(client_max_size=MAX_BODY)
    app.add_routes(
        [
            web.post("/exists", exists),
            web.post("/get", get),
            web.post("/put", put),
            web.get("/health", health),
            web.get("/metrics", metrics),
        ]
    )
    return app
