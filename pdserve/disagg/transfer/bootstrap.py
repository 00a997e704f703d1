"""The prefill bootstrap server (HTTP, default port 8998), its client calls, and the decode
side's heartbeat monitor.

    PUT /route                  a prefill rank registers its transfer endpoint (JSON RankInfo)
    GET /route?engine_rank=N    that rank's RankInfo (404 until registered)
    GET /route?engine_rank=-1   {"tp_size": T, "ranks": [RankInfo, ...]} (also without a query)
    GET /health                 200 "OK" (decode heartbeats)

It is a stdlib `ThreadingHTTPServer` in a daemon thread: the traffic is a handful of tiny
requests per decode rank (lookups are cached, heartbeats every few seconds), so an event loop
buys nothing, and it can start inside any process (HTTP front end or scheduler) without
owning that process's asyncio loop. Bodies are JSON decoded with a msgspec schema and capped
at 64 KiB.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Callable
from urllib.parse import parse_qs, urlsplit

import msgspec

from pdserve.disagg.transfer.base import BaseKVBootstrapServer

logger = logging.getLogger(__name__)

DEFAULT_BOOTSTRAP_PORT = 8998
MAX_REQUEST_BODY = 64 * 1024

_Count = Annotated[int, msgspec.Meta(ge=1, le=1 << 31)]


class RankInfo(msgspec.Struct, forbid_unknown_fields=True):
    """One prefill rank's transfer endpoint and KV layout."""

    engine_rank: Annotated[int, msgspec.Meta(ge=0, le=4095)]
    tp_size: Annotated[int, msgspec.Meta(ge=1, le=4096)]
    rank_ip: Annotated[str, msgspec.Meta(max_length=64)]
    rank_port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    backend: Annotated[str, msgspec.Meta(max_length=32)]
    page_size: _Count
    num_layers: _Count
    total_kv_heads: _Count
    head_dim: _Count
    dtype: Annotated[str, msgspec.Meta(max_length=32)]

    def __post_init__(self) -> None:
        if self.engine_rank >= self.tp_size:
            raise ValueError(f"engine_rank {self.engine_rank} >= tp_size {self.tp_size}")
        ipaddress.ip_address(self.rank_ip)  # ValueError -> msgspec.ValidationError


class RouteTable(msgspec.Struct):
    tp_size: int
    ranks: list[RankInfo]


class BootstrapError(RuntimeError):
    pass


def split_addr(addr: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"bootstrap address must be host:port, got {addr!r}")
    return host.strip("[]"), int(port)


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    timeout = 10  # seconds a slow client may hold a handler thread
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("bootstrap %s: " + format, self.address_string(), *args)

    def _reply(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: HTTPStatus, msg: str) -> None:
        self._reply(status, json.dumps({"error": msg}).encode())

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/health":
            self._reply(HTTPStatus.OK, b"OK", "text/plain")
        elif url.path == "/route":
            q = parse_qs(url.query)
            raw = q.get("engine_rank", ["-1"])[0]
            try:
                rank = int(raw)
            except ValueError:
                return self._error(HTTPStatus.BAD_REQUEST, f"engine_rank must be an integer, got {raw!r}")
            table = self.server.table()
            if rank == -1:
                return self._reply(HTTPStatus.OK, msgspec.json.encode(table))
            for info in table.ranks:
                if info.engine_rank == rank:
                    return self._reply(HTTPStatus.OK, msgspec.json.encode(info))
            self._error(HTTPStatus.NOT_FOUND, f"prefill rank {rank} has not registered")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route {url.path}")

    def do_PUT(self) -> None:
        if urlsplit(self.path).path != "/route":
            return self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        if not (0 < length <= MAX_REQUEST_BODY):
            self.close_connection = True
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body must be 1..{MAX_REQUEST_BODY} bytes")
        try:
            info = msgspec.json.decode(self.rfile.read(length), type=RankInfo)
        except msgspec.DecodeError as e:
            return self._error(HTTPStatus.BAD_REQUEST, f"bad RankInfo: {e}")
        self.server.register(info)
        self._reply(HTTPStatus.OK, b'{"ok": true}')


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int]) -> None:
        super().__init__(addr, _Handler)
        self._lock = threading.Lock()
        self._ranks: dict[int, RankInfo] = {}

    def register(self, info: RankInfo) -> None:
        with self._lock:
            if any(r.tp_size != info.tp_size for r in self._ranks.values()):
                logger.warning("prefill tp size changed to %d: dropping the old registrations", info.tp_size)
                self._ranks.clear()
            self._ranks[info.engine_rank] = info
        logger.info("bootstrap: prefill rank %d registered at %s:%d", info.engine_rank, info.rank_ip, info.rank_port)

    def table(self) -> RouteTable:
        with self._lock:
            ranks = sorted(self._ranks.values(), key=lambda r: r.engine_rank)
        return RouteTable(tp_size=ranks[0].tp_size if ranks else 0, ranks=ranks)


class KVBootstrapServer(BaseKVBootstrapServer):
    """Start with `KVBootstrapServer(host, port)`; `port=0` picks a free port (tests)."""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_BOOTSTRAP_PORT) -> None:
        self.host = host
        self._httpd = _HTTPServer((host, port))
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"kv-bootstrap-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("KV bootstrap server listening on %s:%d", host, self.port)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def table_sizes(self) -> dict[str, int]:
        return {"bootstrap_threads_tracked": len(getattr(self._httpd, "_threads", None) or [])}

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()


# -- client calls -----------------------------------------------------------------------
def _request(addr: str, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
    host, port = split_addr(addr)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read(MAX_REQUEST_BODY * 16 + 1)
        if len(data) > MAX_REQUEST_BODY * 16:
            raise BootstrapError(f"oversized reply from bootstrap server {addr}")
        return resp.status, data
    finally:
        conn.close()


def register_rank(addr: str, info: RankInfo, timeout: float = 5.0) -> None:
    status, data = _request(addr, "PUT", "/route", msgspec.json.encode(info), timeout)
    if status != 200:
        raise BootstrapError(f"bootstrap server {addr} refused registration: {status} {data[:200]!r}")


def fetch_route(addr: str, timeout: float = 5.0) -> RouteTable:
    status, data = _request(addr, "GET", "/route?engine_rank=-1", None, timeout)
    if status != 200:
        raise BootstrapError(f"bootstrap server {addr} answered {status} {data[:200]!r}")
    try:
        return msgspec.json.decode(data, type=RouteTable)
    except msgspec.DecodeError as e:
        raise BootstrapError(f"bad route table from {addr}: {e}") from None


def check_health(addr: str, timeout: float = 2.0) -> None:
    status, _ = _request(addr, "GET", "/health", None, timeout)
    if status != 200:
        raise BootstrapError(f"bootstrap server {addr} /health answered {status}")


class HeartbeatMonitor:
    """Pings one prefill bootstrap server's /health every `interval` seconds.

    After `max_failure` consecutive failures it calls `on_dead(addr, message)` once; a later
    success re-arms it (and calls `on_alive(addr)`).
    """

    def __init__(
        self,
        addr: str,
        interval: float,
        max_failure: int,
        on_dead: Callable[[str, str], None],
        on_alive: Callable[[str], None] | None = None,
    ) -> None:
        self.addr = addr
        self.interval = interval
        self.max_failure = max_failure
        self._on_dead = on_dead
        self._on_alive = on_alive
        self.failures = 0
        self.dead = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kv-heartbeat-{addr}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                check_health(self.addr, timeout=min(self.interval, 2.0))
            except Exception as e:  # noqa: BLE001 - any failure counts as a missed beat
                self.failures += 1
                logger.debug("heartbeat to %s failed (%d): %s", self.addr, self.failures, e)
                if self.failures >= self.max_failure and not self.dead:
                    self.dead = True
                    msg = (
                        f"prefill bootstrap server {self.addr} is unreachable: {self.failures} consecutive "
                        f"heartbeats failed (every {self.interval:g}s; last error: {e})"
                    )
                    logger.error(msg)
                    self._on_dead(self.addr, msg)
                continue
            self.failures = 0
            if self.dead:
                self.dead = False
                logger.info("prefill bootstrap server %s is reachable again", self.addr)
                if self._on_alive:
                    self._on_alive(self.addr)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
