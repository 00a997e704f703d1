"""The seed's Semi-PD coordinator API, in-process (docs/semi_pd.md):

    from pdserve.server.semi_pd_coordinator import create_semi_pd_coordinator
    from pdserve.semi_pd.allocation import SMAllocation

    with create_semi_pd_coordinator(server_args={"dtype": "float32"}) as coordinator:
        coordinator.get_status()["is_running"]
        coordinator.request_sm_reallocation(SMAllocation(prefill_percentage=80, decode_percentage=20))
        coordinator.get_unified_memory_usage()["utilization_ratio"]
        coordinator.generate("The capital of France is", {"max_new_tokens": 8, "temperature": 0})

It runs a `pdserve.Engine` with `enable_semi_pd_coordinator` on: the Semi-PD resident process,
its prefill and decode workers, the unified KV pool and the SLO-aware controller; the calls go
to the resident over the engine's typed messages (the same as GET /semi_pd/status and
POST /semi_pd/reallocate). It lives in the server layer because it drives an Engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pdserve.config import ServerArgs
from pdserve.semi_pd.allocation import SMAllocation


class SemiPDCoordinator:
    def __init__(self, server_args: ServerArgs | dict | None = None, port_args: Any = None) -> None:
        if port_args is not None:
            raise ValueError(
                "port_args: not yet supported: the coordinator serves in-process; for HTTP start "
                "`pdserve serve --enable-semi-pd-coordinator --host H --port P`"
            )
        if isinstance(server_args, ServerArgs):
            kwargs = dataclasses.asdict(server_args)
        else:
            kwargs = dict(server_args or {})
        kwargs["enable_semi_pd_coordinator"] = True
        self.server_args = ServerArgs(**kwargs)  # validated now, before anything starts
        self._kwargs = kwargs
        self.engine = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> "SemiPDCoordinator":
        from pdserve.server.engine import Engine

        if self.engine is None:
            self.engine = Engine(**self._kwargs)
        return self

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def __enter__(self) -> "SemiPDCoordinator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def is_running(self) -> bool:
        return self.engine is not None and not self.engine._closed

    # ---- the seed's calls ---------------------------------------------------------------
    def get_status(self) -> dict:
        """is_running, components, current_split, process_rotation_status,
        unified_memory_status, slo_controller_status, metrics, slo (GET /semi_pd/status)."""
        if not self.is_running:
            return {"is_running": False, "components": {}}
        return self.engine._call(self.engine.tm.semi_pd_status())

    def request_sm_reallocation(self, allocation: SMAllocation) -> bool:
        """Move the split; True once the resident took it (the workers re-pin before their next step)."""
        if not isinstance(allocation, SMAllocation):
            raise TypeError(f"expected an SMAllocation, got {type(allocation).__name__}")
        self._need_running()
        resp = self.engine._call(
            self.engine.tm.semi_pd_reallocate(allocation.prefill_percentage, allocation.decode_percentage)
        )
        return resp.ok

    def get_unified_memory_usage(self) -> dict | None:
        """total_memory_bytes, allocated_memory_bytes, utilization_ratio of the unified KV pool."""
        if not self.is_running:
            return None
        return self.get_status()["unified_memory_status"]["memory_usage"]

    def get_metrics(self) -> dict:
        """TTFT / TPOT percentiles, throughput and queue lengths over the SLO window."""
        self._need_running()
        return self.get_status()["metrics"]

    def generate(self, *args, **kwargs):
        """`pdserve.Engine.generate` on the Semi-PD engine."""
        self._need_running()
        return self.engine.generate(*args, **kwargs)

    def _need_running(self) -> None:
        if not self.is_running:
            raise RuntimeError("the Semi-PD coordinator is not running: use it as a context manager or call start()")


def create_semi_pd_coordinator(
    server_args: ServerArgs | dict | None = None, port_args: Any = None
) -> SemiPDCoordinator:
    """A coordinator (not started: `with create_semi_pd_coordinator(...) as c:` starts and stops it)."""
    return SemiPDCoordinator(server_args, port_args)
