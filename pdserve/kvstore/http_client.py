"""Client of the embedded service (`http://host:port`), synchronous: the scheduler calls it
from its own thread. Short timeouts: a slow store is a miss, not a stall."""

from __future__ import annotations

import httpx
import msgspec

from pdserve.kvstore.base import KVStore

TIMEOUT_S = 2.0
_enc = msgspec.msgpack.Encoder()
_int_dec = msgspec.msgpack.Decoder(int)
_recs_dec = msgspec.msgpack.Decoder(list[bytes | None])


class HttpStore(KVStore):
    def __init__(self, url: str, timeout: float = TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.client = httpx.Client(timeout=timeout, headers={"content-type": "application/msgpack"})

    def _post(self, path: str, body) -> bytes:
        r = self.client.post(self.url + path, content=_enc.encode(body))
        r.raise_for_status()
        return r.content

    def exists(self, keys: list[str]) -> int:
        return _int_dec.decode(self._post("/exists", keys))

    def get(self, keys: list[str], record_nbytes: int | None = None) -> list[bytes | None]:
        return _recs_dec.decode(self._post("/get", keys))

    def put(self, items: list[tuple[str, bytes]]) -> None:
        self._post("/put", [list(i) for i in items])

    def close(self) -> None:
        self.client.close()
