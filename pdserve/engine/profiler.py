"""torch.profiler around the scheduler's forward steps: `/start_profile` and `/stop_profile`.

SGLang's contract: the trace lands in the request's `output_dir`, else in
`$SGLANG_TORCH_PROFILER_DIR`, else in /tmp; `num_steps` stops it by itself after that many
steps. The file is named by role, `<profile_id>-<role>.trace.json.gz` (role: prefill,
decode or colocated), so the traces of a PD deployment's servers stay apart.
"""

from __future__ import annotations

import logging
import os
import time

import torch

logger = logging.getLogger("pdserve.profiler")

PROFILER_DIR_ENV = "SGLANG_TORCH_PROFILER_DIR"


def default_output_dir() -> str:
    return os.environ.get(PROFILER_DIR_ENV) or "/tmp"


class Profiler:
    """One profiling session at a time; `step()` after each forward step."""

    def __init__(self, role: str) -> None:
        self.role = role
        self._prof: torch.profiler.profile | None = None
        self._path: str | None = None
        self._steps_left: int | None = None

    @property
    def active(self) -> bool:
        return self._prof is not None

    def start(
        self,
        output_dir: str | None = None,
        num_steps: int | None = None,
        record_shapes: bool = False,
        with_stack: bool = False,
    ) -> str:
        """Starts profiling; returns the path the trace will be written to. ValueError when a
        session is running, the directory cannot be created, or num_steps < 1."""
        if self._prof is not None:
            raise ValueError("profiling is already running; POST /stop_profile first")
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        out_dir = output_dir or default_output_dir()
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise ValueError(f"output_dir {out_dir!r} cannot be created: {e.strerror}") from None
        if not os.access(out_dir, os.W_OK):
            raise ValueError(f"output_dir {out_dir!r} is not writable")
        profile_id = f"{time.time():.0f}"
        self._path = os.path.join(out_dir, f"{profile_id}-{self.role}.trace.json.gz")
        self._steps_left = num_steps
        self._prof = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=record_shapes, with_stack=with_stack
        )
        self._prof.start()
        logger.info("profiling started; the trace goes to %s", self._path)
        return self._path

    def stop(self) -> str:
        """Stops profiling and writes the trace; returns its path. ValueError when none runs."""
        if self._prof is None:
            raise ValueError("profiling is not running; POST /start_profile first")
        prof, path = self._prof, self._path
        self._prof = self._path = None
        self._steps_left = None
        prof.stop()
        prof.export_chrome_trace(path)
        logger.info("profiling stopped; trace written to %s", path)
        return path

    def step(self) -> None:
        """After one forward step: stop by itself once num_steps have run."""
        if self._prof is None or self._steps_left is None:
            return
        self._steps_left -= 1
        if self._steps_left <= 0:
            self.stop()
