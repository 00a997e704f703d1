"""The shm backend (prefill and decode on one host): decode's KV pool itself lives in a named
shared-memory segment; prefill maps it once (name and size come with decode's registration)
and copies pages straight into it: one copy, no socket for the bytes. The control protocol
(WRITE_BEGIN / ACK / WRITE_DONE over decode's data endpoint) is one_sided.py's.
"""

from __future__ import annotations

import logging

import numpy as np

from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.transfer import wire
from pdserve.disagg.transfer.base import DTYPE_NAMES, KVArgs
from pdserve.disagg.transfer.decode_side import SocketKVReceiver
from pdserve.disagg.transfer.heads import copy_pages, head_range
from pdserve.disagg.transfer.one_sided import OneSidedDecodeMover, OneSidedPrefillMover
from pdserve.disagg.transfer.prefill_service import Job
from pdserve.disagg.transfer.prefill_side import SocketKVSender
from pdserve.engine.shm_segment import (
    SegmentMaps,
    allocate_kv_buffer,
    check_shm_name,
    cleanup_stale_segments,
    free_kv_buffer,
    new_shm_name,
    segment_of,
)
from pdserve.disagg.transfer.socket_manager import SocketKVManager

__all__ = [
    "ShmKVManager",
    "ShmKVSender",
    "ShmKVReceiver",
    "allocate_kv_buffer",
    "free_kv_buffer",
    "new_shm_name",
    "cleanup_stale_segments",
]

logger = logging.getLogger(__name__)
_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class ShmPrefillMover(OneSidedPrefillMover):
    max_pieces = 1  # one copy per request: torch parallelises it internally

    def __init__(self, args: KVArgs) -> None:
        super().__init__(args)
        self.maps = SegmentMaps()

    def _decode_shape(self, body: wire.RegisterBody) -> tuple[int, ...]:
        h0, h1 = head_range(body.decode_rank, body.decode_tp_size, body.total_kv_heads)
        heads = h1 - h0
        return (body.decode_num_pages, body.num_layers, 2, body.page_size, heads, body.head_dim)

    def check_registration(self, body: wire.RegisterBody, pages: np.ndarray) -> str | None:
        if body.shm_name is None:
            return "the shm backend needs decode's segment name"
        try:
            self.maps.get(body.shm_name, self._decode_shape(body), _DTYPES[body.dtype])
        except (ValueError, OSError) as e:
            return f"cannot map decode's KV segment: {e}"
        return None

    def write(self, job: Job, dst_pages: np.ndarray, link: object) -> None:
        dest, a = job.dest, self.args
        assert dest.shm_name is not None
        h0, h1 = head_range(dest.decode_rank, dest.decode_tp_size, a.layout.total_kv_heads)
        shape = (dest.decode_num_pages, a.num_layers, 2, a.page_size, h1 - h0, a.head_dim)
        dst = self.maps.get(dest.shm_name, shape, a.kv_data.dtype)
        copy_pages(a.kv_data, job.src_pages, dest.src_heads, dst, dst_pages, dest.dst_heads)

    def close(self) -> None:
        self.maps.clear()


class ShmDecodeMover(OneSidedDecodeMover):
    def register_extra(self) -> dict:
        return {"shm_name": self.args.shm_name}


class ShmKVManager(SocketKVManager):
    """Decode mode needs `args.kv_data` from `allocate_kv_buffer(..., shm_name=args.shm_name)`."""

    backend = "shm"

    def __init__(self, args: KVArgs, mode: DisaggregationMode, **kw) -> None:
        if mode == DisaggregationMode.DECODE:
            if not args.shm_name:
                raise ValueError("decode with the shm backend needs KVArgs.shm_name (the KV pool's segment)")
            check_shm_name(args.shm_name)
            if segment_of(args.kv_data) != args.shm_name:
                raise ValueError(
                    f"kv_data is not the shared-memory segment {args.shm_name}: allocate it with "
                    "allocate_kv_buffer(shape, dtype, shm_name)"
                )
        super().__init__(args, mode, **kw)

    def _make_prefill_mover(self) -> ShmPrefillMover:
        return ShmPrefillMover(self.args)

    def _make_decode_mover(self) -> ShmDecodeMover:
        return ShmDecodeMover(self.args, lambda: self.decode)


class ShmKVSender(SocketKVSender):
    pass


class ShmKVReceiver(SocketKVReceiver):
    pass
