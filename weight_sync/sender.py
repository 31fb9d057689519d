"""The learner's side: its weights as named buckets, gathered under ZeRO-3 one bucket at a time, and
the broadcast into the group. Every call that gathers is collective over the learner ranks; only rank
0 sends or yields tensors.

    sender.plan(bucket_bytes)                       # [BucketPlan], nothing gathered
    for bucket in sender.buckets(bucket_bytes): ... # rank 0: [(name, tensor)]; other ranks: []
    sender.join(address, port, world_size, timeout_s, epoch)       # rank 0 joins the group
    for item in sender.broadcast(bucket_bytes, keep): ...          # rank 0: each bucket's checksum
"""
from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import torch
from torch import nn

from weight_sync.buckets import BucketPlan, checkpoint_names, full_shape, plan_buckets
from weight_sync.group import WeightGroup


def copies(bucket: list[tuple[str, torch.Tensor]], device) -> list[tuple[str, torch.Tensor]]:
    return [(name, t.detach().to(device, copy=True).contiguous()) for name, t in bucket]


class WeightSender:
    def __init__(self, model: nn.Module, zero_stage: int, rank: int, device: torch.device):
        self.model, self.zero3, self.rank, self.device = model, zero_stage == 3, rank, device
        self.names = checkpoint_names(model)
        self.group: WeightGroup | None = None

    def params(self, trainable_only: bool) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad or not trainable_only]

    def plan(self, bucket_bytes: int, trainable_only: bool = True) -> list[BucketPlan]:
        """The buckets ``buckets`` and ``broadcast`` send, as (HF name, dtype name, full shape). Local."""
        return [[(self.names[n], str(p.dtype).removeprefix("torch."), list(full_shape(p))) for n, p in bucket]
                for bucket in plan_buckets(self.params(trainable_only), bucket_bytes)]

    def _gathered(self, bucket_bytes: int, trainable_only: bool) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Per bucket of ``plan``, (HF name, full parameter) on rank 0 ([] on other ranks), valid until the
        next item: under ZeRO-3 the bucket is gathered around the yield and released after it."""
        from deepspeed.runtime.zero import GatheredParameters

        for bucket in plan_buckets(self.params(trainable_only), bucket_bytes):
            with GatheredParameters([p for _, p in bucket], modifier_rank=None, enabled=self.zero3):
                yield [(self.names[n], p.data) for n, p in bucket] if self.rank == 0 else []

    def buckets(self, bucket_bytes: int, trainable_only: bool = True,
                device: str | torch.device = "cpu") -> Iterator[list[tuple[str, torch.Tensor]]]:
        """``plan``'s buckets as (HF name, tensor) copies on ``device`` (rank 0; other ranks: [] each)."""
        for bucket in self._gathered(bucket_bytes, trainable_only):
            yield copies(bucket, device)

    @staticmethod
    def group_address() -> tuple[str, int]:
        """(this node's address, a free port) for the broadcast group's store, which rank 0 serves."""
        with socket.socket() as s:
            s.bind(("", 0))
            return os.environ["MASTER_ADDR"], s.getsockname()[1]

    def join(self, address: str, port: int, world_size: int, timeout_s: float, epoch: int) -> None:
        """Rank 0 joins the broadcast group as its sender (group rank 0); blocks until every rollout
        process joined. Other ranks are not members (they only help gather under ZeRO-3)."""
        if self.rank == 0:
            self.group = None  # the previous membership's group is dropped first
            self.group = WeightGroup(address, port, 0, world_size, timeout_s, epoch, self.device)

    def broadcast(self, bucket_bytes: int, keep: bool = False) -> Iterator:
        """The trainable weights to the group in ``plan`` order: rank 0 yields each bucket's checksum, and
        with ``keep`` then the bucket on the host (the driver's copy for resync). A failed broadcast drops
        the group and raises after rank 0 took part in every gather (no rank is left waiting)."""
        if self.rank == 0 and self.group is None:
            raise RuntimeError("broadcast_weights: learner rank 0 is in no broadcast group")
        plan, error = self.plan(bucket_bytes), None
        for tensors, bucket in zip(self._gathered(bucket_bytes, True), plan, strict=True):
            if self.rank != 0 or error is not None:
                continue
            try:
                total = self.group.send(tensors, bucket)
            except Exception as exc:
                error, self.group = exc, None
                continue
            yield total
            if keep:
                yield copies(tensors, "cpu")
        if error is not None:
            raise error
