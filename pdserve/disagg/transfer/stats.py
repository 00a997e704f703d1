"""Transfer statistics a manager keeps for /metrics and log lines."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class TransferStats:
    """A snapshot; `KVManager.stats()` returns a fresh one (cheap, lock-protected copy)."""

    transfers_completed: int = 0
    transfers_failed: int = 0
    bytes_transferred: int = 0  # KV bytes of completed transfers
    total_transfer_seconds: float = 0.0  # summed first-byte -> Success latency
    last_latency_s: float = 0.0
    last_bytes: int = 0
    max_latency_s: float = 0.0

    @property
    def mean_latency_s(self) -> float:
        return self.total_transfer_seconds / self.transfers_completed if self.transfers_completed else 0.0

    @property
    def gbps(self) -> float:
        """Mean bandwidth over completed transfers, GB/s (1e9 bytes per second)."""
        t = self.total_transfer_seconds
        return self.bytes_transferred / t / 1e9 if t > 0 else 0.0

    @property
    def last_gbps(self) -> float:
        return self.last_bytes / self.last_latency_s / 1e9 if self.last_latency_s > 0 else 0.0


class StatsRecorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._s = TransferStats()

    def record_success(self, nbytes: int, latency_s: float) -> None:
        latency_s = max(latency_s, 0.0)
        with self._lock:
            s = self._s
            self._s = TransferStats(
                transfers_completed=s.transfers_completed + 1,
                transfers_failed=s.transfers_failed,
                bytes_transferred=s.bytes_transferred + nbytes,
                total_transfer_seconds=s.total_transfer_seconds + latency_s,
                last_latency_s=latency_s,
                last_bytes=nbytes,
                max_latency_s=max(s.max_latency_s, latency_s),
            )

    def record_failure(self) -> None:
        with self._lock:
            s = self._s
            self._s = TransferStats(
                s.transfers_completed,
                s.transfers_failed + 1,
                s.bytes_transferred,
                s.total_transfer_seconds,
                s.last_latency_s,
                s.last_bytes,
                s.max_latency_s,
            )

    def snapshot(self) -> TransferStats:
        with self._lock:
            return self._s
