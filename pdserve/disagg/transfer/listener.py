"""The TCP listener both socket-backend services run (prefill's control endpoint, decode's
data endpoint): one thread per accepted connection, a cap on connections, and every socket
the service opens or accepts tracked, so that close() can shut them all down and the
services' blocking reads end."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Listener:
    def __init__(
        self,
        host: str,
        port: int,
        handle: Callable[[socket.socket, object], None],
        *,
        name: str,
        max_conns: int,
        lock: threading.RLock,
    ) -> None:
        self.lock = lock  # the service's: connection bookkeeping happens under it
        self.closed = threading.Event()
        self.conns: set[socket.socket] = set()
        self._handle, self._name, self._max = handle, name, max_conns
        self._handlers: list[threading.Thread] = []
        self._sock = socket.create_server((host, port), backlog=128)
        self._sock.settimeout(0.5)
        self.port: int = self._sock.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._accept_thread.start()

    def track(self, sock: socket.socket) -> None:
        with self.lock:
            self.conns.add(sock)

    def untrack(self, sock: socket.socket) -> None:
        with self.lock:
            self.conns.discard(sock)

    def _accept_loop(self) -> None:
        while not self.closed.is_set():
            try:
                sock, peer = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            with self.lock:
                if len(self.conns) >= self._max:
                    logger.error("too many %s connections; refusing %s", self._name, peer)
                    sock.close()
                    continue
                self.conns.add(sock)
            t = threading.Thread(target=self._run, args=(sock, peer), name=self._name, daemon=True)
            self._handlers = [h for h in self._handlers if h.is_alive()] + [t]
            t.start()

    def _run(self, sock: socket.socket, peer: object) -> None:
        try:
            self._handle(sock, peer)
        finally:
            self.untrack(sock)
            sock.close()

    def close(self) -> None:
        """Stop accepting, shut every tracked socket down, wait for the handlers (idempotent)."""
        self.closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self._sock.close()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._accept_thread.join(timeout=5)
        for t in self._handlers:
            t.join(timeout=2)
