"""The weight broadcast group: learner rank 0 sends, every vLLM worker process receives (gloo or NCCL).

One code path for CPU and GPU: the group is a torch ``ProcessGroupGloo`` or ``ProcessGroupNCCL`` built
directly on its own ``TCPStore`` (a stateless group: torch.distributed's default group, which DeepSpeed
and vLLM each use in their own processes, is not touched). Only the constructor depends on the device.

    rank 0                                 learner rank 0 (the sender; TCPStore server)
    ranks 1 + i*TP .. i*TP + TP            rollout worker i's vLLM worker processes (TP ranks)

A sync sends the model as buckets. Both sides know each bucket's tensors (names, dtypes, shapes) before
anything moves (``Learner.weight_plan``), so each bucket travels as ONE flat byte buffer in ONE
collective: ``layout`` places every tensor at a 64-byte aligned offset and pads the buffer to whole
4 KiB pages; ``pack`` fills it on the sender, ``unpack`` gives the receiver views into it (no copy).
``checksum`` is computed on both sides over the whole buffer, so a corrupted or misaligned bucket
(e.g. a buffer read before its transfer finished) is caught before the engine generates with it.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

ALIGN = 64          # bytes: every tensor starts on a cache line (and on any dtype's alignment)
PAGE = 4096         # bytes: buffers are whole pages, so they view as rows of 1024 int32 words
BucketPlan = list[tuple[str, str, list[int]]]  # [(HF name, dtype name, full shape)] in send order


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def layout(bucket: BucketPlan) -> tuple[list[Slot], int]:
    """Where each tensor of a bucket lies in its flat buffer, and the buffer's size in bytes."""
    slots, offset = [], 0
    for name, dtype_name, shape in bucket:
        dtype = getattr(torch, dtype_name)
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        slots.append(Slot(name, dtype, tuple(shape), offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    return slots, max(PAGE, -(-offset // PAGE) * PAGE)


def pack(tensors: list[tuple[str, torch.Tensor]], slots: list[Slot], size: int, device) -> torch.Tensor:
    """The bucket's tensors copied into one flat uint8 buffer laid out by ``slots``."""
    buffer = torch.zeros(size, dtype=torch.uint8, device=device)
    for (name, tensor), slot in zip(tensors, slots, strict=True):
        if name != slot.name or tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise ValueError(f"weight broadcast: tensor {name} {tensor.dtype} {tuple(tensor.shape)} does not match "
                             f"the plan's {slot.name} {slot.dtype} {slot.shape}")
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[slot.offset:slot.offset + slot.nbytes].copy_(flat)
    return buffer


def unpack(buffer: torch.Tensor, slots: list[Slot]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views into a received buffer."""
    return [(s.name, buffer[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)) for s in slots]


def checksum(buffer: torch.Tensor) -> int:
    """A cheap position-sensitive checksum of a page-padded buffer, on its own device: the int32 words
    summed per 4 KiB page, each page sum weighted by its index + 1. Integer arithmetic (wrapping in
    int64), so the sender's and every receiver's value agree exactly on any device."""
    pages = buffer.view(torch.int32).view(-1, PAGE // 4).sum(dim=1, dtype=torch.int64)
    weights = torch.arange(1, pages.numel() + 1, dtype=torch.int64, device=buffer.device)
    return int((pages * weights).sum())


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
        self.rank, self.world_size, self.epoch, self.device = rank, world_size, epoch, device
        self.timeout = timeout

    def broadcast(self, buffer: torch.Tensor) -> None:
        """Rank 0's buffer into every member's; raises when it does not finish within the group's timeout
        (a member that hangs or died), which makes this group unusable: the driver builds a new one."""
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
