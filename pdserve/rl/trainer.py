"""The trainer's end of weight sync: rank 0 of the collective group every engine joins.

    group = TrainerGroup("127.0.0.1", port, world_size=strategy.weight_sync_world_size())
    pending = strategy.setup_collective_group("actor", "127.0.0.1", port)
    group.connect(); pending.wait()
    pending = strategy.broadcast_parameter("actor", names, dtypes, shapes)
    group.broadcast([tensor, ...]); pending.wait()

gloo on CPU (NCCL would take the same calls with device tensors). The trainer hosts the
TCPStore the engines connect to.
"""

from __future__ import annotations

from datetime import timedelta

import torch


class TrainerGroup:
    def __init__(
        self, host: str, port: int, world_size: int, group_name: str = "weight_update_group", timeout_s: float = 600
    ) -> None:
        import torch.distributed as dist

        self.world_size = world_size
        self.group_name = group_name
        self.timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=self.timeout)
        self.group = None

    def connect(self) -> None:
        """Blocks until every engine rank has joined (they are asked to by
        `strategy.setup_collective_group`)."""
        import torch.distributed as dist

        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = self.timeout
        opts._devices = [dist.ProcessGroupGloo.create_default_device()]
        self.group = dist.ProcessGroupGloo(dist.PrefixStore(self.group_name, self.store), 0, self.world_size, opts)

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """One broadcast per tensor, in the order of the names sent to the engines."""
        for t in tensors:
            self.group.broadcast(t.contiguous(), 0).wait()

    def broadcast_bucket(self, tensors: list[torch.Tensor]) -> int:
        """All tensors as one flat uint8 broadcast (load_format "flattened_bucket"). Returns
        its size in bytes."""
        flat = flatten(tensors)
        self.group.broadcast(flat, 0).wait()
        return flat.numel()


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])
