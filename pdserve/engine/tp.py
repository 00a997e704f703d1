"""Tensor parallelism on one host (--tp-size T): T processes, one model shard each.

Rank 0 is the scheduler process: it schedules, builds each step's ForwardBatch, sends it to
ranks 1..T-1 (ZMQ, msgpack header + raw tensor bytes; no pickle), runs its own shard and
samples. The others (pdserve/engine/tp_worker.py) run their shard on the batches they get.
All ranks join a torch.distributed gloo group; the two all-reduces per layer (after o_proj
and down_proj, pdserve/model/tp.py) go through a shared-memory segment by default, because
gloo's loopback all-reduce measured 1.0-1.7 ms per call on this VM against ~20 us for the
shared-memory one (docs/architecture.md, "Tensor parallelism"); PDSERVE_TP_ALLREDUCE=gloo
selects gloo's.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta

import msgspec
import numpy as np
import torch

from pdserve.cpus import my_cores, split_cores
from pdserve.model.attention import ExtendSeq, ForwardBatch
from pdserve.net import ipc_addr

logger = logging.getLogger(__name__)

ALLREDUCE_ENV = "PDSERVE_TP_ALLREDUCE"
ALLREDUCE_KINDS = ("shm", "gloo")
SLOT_ELEMS = 1 << 18  # float32 elements per rank per step of the shm all-reduce (1 MiB)
_FLAG_STRIDE = 8  # int64s per rank flag: one 64-byte cache line each


def allreduce_kind() -> str:
    kind = os.environ.get(ALLREDUCE_ENV, "shm")
    if kind not in ALLREDUCE_KINDS:
        raise ValueError(f"{ALLREDUCE_ENV} must be one of {ALLREDUCE_KINDS}, got {kind!r}")
    return kind


# ---- all-reduce -------------------------------------------------------------------------


class ShmAllReduce:
    """In-place sum over T ranks through one shared-memory segment.

    Each call: write my partial (as float32) into my slot of buffer `seq % 2`, publish `seq`
    in my flag, wait until every flag reaches `seq`, then sum the T slots in rank order (the
    same order on every rank, so every rank gets bit-identical results). Two buffers suffice:
    a rank can only write call s+2's buffer after all ranks published s+1, i.e. after they all
    finished reading call s. x86 keeps stores in order, so a flag never overtakes its data.
    Large tensors go through in chunks of SLOT_ELEMS.
    """

    def __init__(self, buf: torch.Tensor, rank: int, size: int, check_alive: Callable[[], None]) -> None:
        flag_bytes = size * _FLAG_STRIDE * 8
        if buf.dtype != torch.uint8 or buf.numel() != self.nbytes(size):
            raise ValueError("all-reduce buffer has the wrong size")
        self.flags = buf[:flag_bytes].numpy().view(np.int64).reshape(size, _FLAG_STRIDE)
        self.data = buf[flag_bytes:].view(torch.float32).view(2, size, SLOT_ELEMS)
        self.rank, self.size = rank, size
        self.seq = int(self.flags[rank, 0])
        self.check_alive = check_alive

    @staticmethod
    def nbytes(size: int) -> int:
        return size * _FLAG_STRIDE * 8 + 2 * size * SLOT_ELEMS * 4

    def _wait(self, seq: int) -> None:
        col = self.flags[:, 0]
        spins = 0
        while col.min() < seq:
            spins += 1
            if spins > 256:
                os.sched_yield()  # ranks may share cores with each other and the server
                if spins % 4096 == 0:
                    self.check_alive()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1)
        for lo in range(0, flat.numel(), SLOT_ELEMS):
            part = flat[lo : lo + SLOT_ELEMS]
            n = part.numel()
            self.seq += 1
            buf = self.data[self.seq & 1]
            buf[self.rank, :n].copy_(part)
            self.flags[self.rank, 0] = self.seq
            self._wait(self.seq)
            part.copy_(buf[:, :n].sum(0))
        return x


class GlooAllReduce:
    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(x)
        return x


def make_allreduce(buf: torch.Tensor, rank: int, size: int, check_alive: Callable[[], None]):
    """The all-reduce PDSERVE_TP_ALLREDUCE selects (shm by default) for this rank."""
    if allreduce_kind() == "gloo":
        return GlooAllReduce()
    return ShmAllReduce(buf, rank, size, check_alive)


def init_gloo(rank: int, size: int, port: int) -> None:
    """Join the instance's gloo group (rank 0 hosts the store on 127.0.0.1:port)."""
    import torch.distributed as dist

    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on loopback
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=timedelta(seconds=120)
    )


# ---- ForwardBatch on the wire -------------------------------------------------------------

_TENSORS = ("input_ids", "positions", "write_pages", "write_offs", "dec_table", "dec_mask", "logits_indices")
_DTYPES = {"int64": torch.int64, "float32": torch.float32, "bfloat16": torch.bfloat16}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_FRAME = 1 << 31


class _TensorHead(msgspec.Struct, array_like=True):
    name: str
    dtype: str
    shape: list[int]


class BatchHeader(msgspec.Struct, forbid_unknown_fields=True):
    op: str  # "forward" | "stop" | "init" | ...
    num_decode: int = 0
    tensors: list[_TensorHead] = []
    extends: list[tuple[int, int, int, bool]] = []  # q_start, q_len, prefix_len, has context tensors
    body: dict = {}  # small op arguments (init)


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(BatchHeader)


def encode_op(op: str, frames: tuple = (), **body) -> list:
    """An op for the workers: the header, then raw byte frames the op reads (no pickle)."""
    return [_enc.encode(BatchHeader(op=op, body=body)), *frames]


def encode_batch(batch: ForwardBatch) -> list:
    heads: list[_TensorHead] = []
    frames: list = []

    def put(name: str, t: torch.Tensor) -> None:
        t = t.contiguous()
        heads.append(_TensorHead(name, _NAMES[t.dtype], list(t.shape)))
        frames.append(t.view(-1).view(torch.uint8).numpy())

    for name in _TENSORS:
        t = getattr(batch, name)
        if t is not None:
            put(name, t)
    ext = []
    for i, e in enumerate(batch.extends):
        has = e.ctx_pages is not None
        ext.append((e.q_start, e.q_len, e.prefix_len, has))
        if has:
            put(f"ctx_pages.{i}", e.ctx_pages)
            put(f"ctx_offs.{i}", e.ctx_offs)
    header = BatchHeader(op="forward", num_decode=batch.num_decode, tensors=heads, extends=ext)
    return [_enc.encode(header), *frames]


def decode_header(frame) -> BatchHeader:
    return _dec.decode(frame)


def decode_batch(h: BatchHeader, frames: list) -> ForwardBatch:
    """The ForwardBatch of `encode_batch`; ValueError on any inconsistency."""
    if len(frames) != len(h.tensors):
        raise ValueError(f"{len(h.tensors)} tensors announced, {len(frames)} frames")
    got: dict[str, torch.Tensor] = {}
    for th, fr in zip(h.tensors, frames):
        dt = _DTYPES.get(th.dtype)
        if dt is None or any(d < 0 for d in th.shape):
            raise ValueError(f"bad tensor header {th}")
        n = int(np.prod(th.shape, dtype=np.int64)) * dt.itemsize
        mv = memoryview(fr)
        if n != mv.nbytes or n > MAX_FRAME:
            raise ValueError(f"tensor {th.name}: {mv.nbytes} bytes for shape {th.shape} {th.dtype}")
        got[th.name] = (
            torch.frombuffer(bytearray(mv), dtype=torch.uint8).view(dt).view(th.shape)
            if n
            else torch.empty(th.shape, dtype=dt)
        )
    batch = ForwardBatch(
        **{k: got.get(k) for k in _TENSORS[:4]},
        num_decode=h.num_decode,
        dec_table=got.get("dec_table"),
        dec_mask=got.get("dec_mask"),
        logits_indices=got.get("logits_indices"),
    )
    for i, (qs, ql, pl, has) in enumerate(h.extends):
        batch.extends.append(
            ExtendSeq(qs, ql, pl, got[f"ctx_pages.{i}"] if has else None, got[f"ctx_offs.{i}"] if has else None)
        )
    if any(t is None for t in (batch.input_ids, batch.positions, batch.write_pages, batch.write_offs)):
        raise ValueError("batch lacks one of input_ids/positions/write_pages/write_offs")
    return batch


# ---- rank 0's side ----------------------------------------------------------------------


class TPDriver:
    """Starts ranks 1..T-1, hands them the pool and the group, broadcasts batches, stops them."""

    def __init__(self, args, startup_timeout: float = 300.0) -> None:
        import zmq

        self.size = args.tp_size
        self.timeout = startup_timeout
        ctx = zmq.Context.instance()
        self.reply = ctx.socket(zmq.PULL)
        reply_addr = ipc_addr("tp-reply")
        self.reply.bind(reply_addr)
        self.socks = []
        self.procs: list[subprocess.Popen] = []
        cores = my_cores()
        groups = split_cores(cores, self.size, share_when_short=True)  # ranks share when short
        threads = max(1, (args.num_threads or len(cores)) // self.size)
        wargs = json.dumps({**asdict(args), "num_threads": threads})
        for r in range(1, self.size):
            sock = ctx.socket(zmq.PUSH)
            addr = ipc_addr(f"tp-{r}")
            sock.bind(addr)
            self.socks.append(sock)
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "pdserve.engine.tp_worker",
                        wargs,
                        str(r),
                        addr,
                        reply_addr,
                        ",".join(map(str, groups[r])),
                    ]
                )
            )
        self.rank0_cores, self.rank0_threads = groups[0], threads
        self.allreduce: Callable | None = None
        self.inbox: list[dict] = []
        self._calls = 0

    def check_alive(self) -> None:
        for r, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                raise RuntimeError(f"tensor-parallel rank {r} exited with status {p.returncode}")

    # Workers answer on one PULL socket: a JSON header, then raw byte frames (a weight's
    # shard). Answers wait in `inbox` until asked for, so an answer to an op that runs in the
    # background (a group join) may arrive while another op is being collected.
    def _drain(self, wait_ms: int) -> None:
        while self.reply.poll(wait_ms):
            wait_ms = 0
            parts = self.reply.recv_multipart()
            msg = json.loads(parts[0])
            if msg.get("op") == "error":  # the worker failed and exits
                raise RuntimeError(f"tensor-parallel rank {msg.get('rank')}: {msg.get('message')}")
            msg["frames"] = parts[1:]
            self.inbox.append(msg)

    def _take(self, match: Callable[[dict], bool]) -> list[dict] | None:
        """Every worker's answer that `match`es, in rank order, once all have arrived."""
        got = [m for m in self.inbox if match(m)]
        if len({int(m["rank"]) for m in got}) < self.size - 1:
            return None
        self.inbox = [m for m in self.inbox if not match(m)]
        return sorted(got, key=lambda m: int(m["rank"]))

    def _collect(self, what: str) -> list[dict]:
        """Wait for `what` from every worker; a worker's error or death raises."""
        deadline = time.monotonic() + self.timeout
        while True:
            got = self._take(lambda m: m.get("op") == what)
            if got is not None:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel ranks did not report {what!r} in {self.timeout:.0f} s")
            self.check_alive()
            self._drain(200)

    def send_op(self, op: str, frames_by_rank: list[tuple] | None = None, **body) -> int:
        """Send `op` to every worker (after the batches already sent: workers run both in
        order); rank r gets frames_by_rank[r - 1]. Returns the call's id for `collect`."""
        self._calls += 1
        for r, sock in enumerate(self.socks, start=1):
            frames = frames_by_rank[r - 1] if frames_by_rank else ()
            self._send(sock, encode_op(op, frames, call=self._calls, **body))
        return self._calls

    def collect(self, call: int) -> list[dict]:
        """Every worker's answer to `call` (dicts with ok, message, status, data, frames)."""
        return self._collect_call(call, block=True)

    def poll_call(self, call: int) -> list[dict] | None:
        """`collect` without waiting: None until every worker has answered."""
        return self._collect_call(call, block=False)

    def _collect_call(self, call: int, block: bool) -> list[dict] | None:
        deadline = time.monotonic() + self.timeout
        while True:
            self.check_alive()
            self._drain(0)
            got = self._take(lambda m: m.get("op") == "done" and m.get("call") == call)
            if got is not None or not block:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel ranks did not answer in {self.timeout:.0f} s")
            self._drain(200)

    def start(
        self, num_pages: int, kv_shm: list[str | None], gloo_port: int, ar_shm: str, ar_buf: torch.Tensor
    ) -> None:
        """Workers have loaded their shard: give them the pool and the group, join it."""
        self._collect("loaded")
        for r, sock in enumerate(self.socks, start=1):
            sock.send_multipart(
                encode_op("init", num_pages=num_pages, kv_shm=kv_shm[r], gloo_port=gloo_port, allreduce_shm=ar_shm)
            )
        init_gloo(0, self.size, gloo_port)
        self._collect("ready")
        self.allreduce = make_allreduce(ar_buf, 0, self.size, self.check_alive)
        logger.info("tensor parallel: %d ranks, %s all-reduce", self.size, allreduce_kind())

    def broadcast(self, batch: ForwardBatch) -> None:
        frames = encode_batch(batch)
        for sock in self.socks:
            self._send(sock, frames)

    def _send(self, sock, frames: list) -> None:
        import zmq

        while True:  # a PUSH socket whose peer died would block forever
            try:
                sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                self.check_alive()
                time.sleep(0.001)

    def close(self) -> None:
        import zmq

        for sock in self.socks:
            try:
                sock.send_multipart(encode_op("stop"), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for sock in self.socks:
            sock.close(linger=0)
        self.reply.close(linger=0)
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
