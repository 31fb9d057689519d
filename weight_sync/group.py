"""The weight broadcast group: learner rank 0 (group rank 0, the store's server) sends, rollout worker
i's vLLM processes (ranks 1 + i*TP ..) receive; each bucket is one flat byte buffer in one collective.
A stateless group on its own ``TCPStore`` (torch.distributed's default group, which DeepSpeed and vLLM
use in their own processes, is untouched): ``ProcessGroupGloo`` on CPU, ``ProcessGroupNCCL`` on GPU.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from weight_sync.buckets import BucketPlan, checksum, layout, pack, unpack


class WeightGroup:
    """One member's end of the broadcast group (rank 0 sends). ``epoch`` names the membership it was
    built for: the driver rebuilds the group, with a new epoch, whenever the members change."""

    def __init__(self, address: str, port: int, rank: int, world_size: int, timeout_s: float, epoch: int,
                 device: torch.device):
        timeout = datetime.timedelta(seconds=timeout_s)
        # rank 0 serves the store; everyone blocks here until all world_size members have joined.
        store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
        self.store = dist.PrefixStore(f"weights/{epoch}", store)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(self.store, rank, world_size, options)
        else:
            self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        self.rank, self.world_size, self.epoch, self.device, self.timeout = rank, world_size, epoch, device, timeout

    def broadcast(self, buffer: torch.Tensor) -> None:
        """Rank 0's buffer into every member's; past the group's timeout (a member hung or died) it raises
        and the group is unusable: the driver builds a new one."""
        self.group.broadcast(buffer, 0).wait(self.timeout)
        if buffer.is_cuda:
            torch.cuda.current_stream(buffer.device).synchronize()

    def receive(self, bucket: BucketPlan) -> tuple[list[tuple[str, torch.Tensor]], int]:
        """One bucket as (name, tensor) views into a fresh buffer, and its checksum."""
        slots, size = layout(bucket)
        buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        self.broadcast(buffer)
        return unpack(buffer, slots), checksum(buffer)

    def send(self, tensors: list[tuple[str, torch.Tensor]], bucket: BucketPlan) -> int:
        """Rank 0: one bucket to every receiver; returns its checksum."""
        slots, size = layout(bucket)
        buffer = pack(tensors, slots, size, self.device)
        self.broadcast(buffer)
        return checksum(buffer)
