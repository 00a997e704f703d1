"""Running the router: blocking (`serve`, what the CLI uses) or in a background thread
(`RouterThread`, for launchers, RL drivers and tests that want a router in-process)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Callable

from aiohttp import web

from pdserve.router.app import build_app
from pdserve.router.config import RouterConfig
from pdserve.router.router import Router

logger = logging.getLogger("pdserve.router")


async def serve(
    config: RouterConfig, stop: asyncio.Event | None = None, on_ready: Callable[[Router, int], None] | None = None
) -> None:
    """Serves until `stop` is set (or SIGINT/SIGTERM when `stop` is None)."""
    router = Router(config)
    runner = web.AppRunner(build_app(router), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        port = runner.addresses[0][1]
        logger.info(
            "pdserve router (%s mode) listening on http://%s:%d; workers: %s",
            "PD" if router.pd else "plain",
            config.host,
            port,
            ", ".join(f"{w.role.value}={w.url}" for w in router.pool.workers),
        )
        if on_ready is not None:
            on_ready(router, port)
        if stop is None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


class RouterThread:
    """A router on its own event loop in a daemon thread.

    with RouterThread(RouterConfig(...)) as rt:
        httpx.post(rt.url + "/generate", ...)
    """

    def __init__(self, config: RouterConfig, start_timeout: float = 10.0) -> None:
        self.config = config.validate()
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.router: Router | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pdserve-router", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(router: Router, port: int) -> None:
                self.router, self.port = router, port
                self._ready.set()

            await serve(self.config, self._stop, ready)

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced by start()
            self._error = e
        finally:
            self._ready.set()

    def start(self) -> "RouterThread":
        self._thread.start()
        if not self._ready.wait(self.start_timeout) or self.port is None:
            raise RuntimeError(f"router did not start: {self._error!r}")
        return self

    def call(self, fn: Callable[[], object]) -> object:
        """Runs `fn` on the router's loop and returns its result (for inspecting state)."""
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(_call(fn), self._loop)
        return fut.result(10)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    def __enter__(self) -> "RouterThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _call(fn: Callable[[], object]) -> object:
    return fn()
