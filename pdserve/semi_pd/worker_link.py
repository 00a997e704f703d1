"""The Semi-PD resident's end of a worker process (semi_pd/worker.py): batches out over one
ZMQ socket, logits and acks back over another, in the tp wire format of engine/tp.py (no
pickle); `RemoteModel` is what the resident's ModelRunner calls its model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict

import torch
import zmq

from pdserve.config import ServerArgs
from pdserve.engine.tp import encode_batch, encode_op
from pdserve.net import ipc_addr

ROLES = ("prefill", "decode")


class WorkerDied(RuntimeError):
    pass


class WorkerLink:
    """The resident's end of one worker: batches out, logits (and acks) back."""

    def __init__(
        self, role: str, args: ServerArgs, kv_shm: str, num_pages: int, threads: int, popen=subprocess.Popen
    ) -> None:
        ctx = zmq.Context.instance()
        self.role = role
        self.push = ctx.socket(zmq.PUSH)
        addr = ipc_addr(f"semipd-{role}")
        self.push.bind(addr)
        self.pull = ctx.socket(zmq.PULL)
        raddr = ipc_addr(f"semipd-{role}-reply")
        self.pull.bind(raddr)
        wargs = json.dumps({**asdict(args), "num_threads": threads})
        self.proc = popen(
            [sys.executable, "-m", "pdserve.semi_pd.worker", wargs, role, addr, raddr, kv_shm, str(num_pages)]
        )
        self.pid: int | None = None

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise WorkerDied(f"the Semi-PD {self.role} worker exited with status {self.proc.returncode}")

    def wait(self, op: str, timeout: float = 300.0) -> tuple[dict, list]:
        deadline = time.monotonic() + timeout
        while True:
            if self.pull.poll(200):
                frames = self.pull.recv_multipart(copy=False)
                head = json.loads(bytes(frames[0].buffer))
                if head.get("op") == "error":
                    raise WorkerDied(f"Semi-PD {self.role} worker: {head.get('message')}")
                if head.get("op") == op:
                    return head, frames[1:]
                raise RuntimeError(f"Semi-PD {self.role} worker answered {head.get('op')!r}, expected {op!r}")
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Semi-PD {self.role} worker did not answer {op!r} in {timeout:.0f} s")

    def send(self, frames: list) -> None:
        while True:
            try:
                self.push.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                self.check_alive()
                time.sleep(0.001)

    def forward(self, fb) -> tuple[torch.Tensor, float]:
        self.send(encode_batch(fb))
        head, frames = self.wait("logits")
        shape = head["shape"]
        if 0 in shape:  # a prefill chunk that samples nothing (frombuffer refuses empty buffers)
            return torch.empty(shape, dtype=torch.float32), float(head["seconds"])
        buf = bytearray(frames[0].buffer)  # owned copy: the frame goes away
        return torch.frombuffer(buf, dtype=torch.float32).view(*shape), float(head["seconds"])

    def pin(self, body: dict) -> None:
        self.send(encode_op("pin", **body))
        self.wait("pinned", timeout=30)

    def close(self) -> None:
        try:
            self.push.send_multipart(encode_op("stop"), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.push.close(linger=0)
        self.pull.close(linger=0)


class RemoteModel:
    """What a ModelRunner calls its model: the real config and dtype; the forward runs in
    the worker and the runner samples from the logits it returns."""

    def __init__(self, config, dtype: torch.dtype, link: WorkerLink) -> None:
        self.config, self.dtype, self.link = config, dtype, link
        self.last_seconds = 0.0

    def use_fused_ops(self, enabled: bool) -> bool:
        """The worker's own ModelRunner turns the fused kernels on for the real model."""
        return False

    def forward(self, fb, attn) -> torch.Tensor:
        logits, self.last_seconds = self.link.forward(fb)
        return logits
