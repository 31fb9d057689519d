"""The learner's side, mixed into ``learner.Learner`` as ``vllm_receiver`` is into vLLM's worker (it
uses the learner's ``model``, ``rank``, ``device`` and ``cfg``): the weights as named buckets, gathered
under ZeRO-3 one bucket at a time, and the broadcast into the group. Every call that gathers is
collective over the learner ranks; only rank 0 sends or yields tensors.

    learner.weight_plan(bucket_bytes)                        # [BucketPlan], nothing gathered
    for bucket in learner.weight_buckets(bucket_bytes): ...  # rank 0: [(name, tensor)]; other ranks: []
    learner.join_weight_group(address, port, world_size, timeout_s, epoch)   # rank 0 joins the group
    for item in learner.broadcast_weights(bucket_bytes, keep): ...           # rank 0: each bucket's checksum
"""
from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from functools import cached_property

import torch
from torch import nn

from weight_sync.buckets import BucketPlan, checkpoint_names, full_shape, plan_buckets
from weight_sync.group import WeightGroup


class WeightSender:
    _weight_group: WeightGroup | None = None  # rank 0's end of the broadcast group (collective path)

    @cached_property
    def weight_names(self) -> dict[str, str]:
        return checkpoint_names(self.model)

    def synced_params(self, trainable_only: bool = True) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad or not trainable_only]

    def weight_plan(self, bucket_bytes: int, trainable_only: bool = True) -> list[BucketPlan]:
        """The buckets ``weight_buckets`` and ``broadcast_weights`` send, as (HF name, dtype name, full shape)."""
        return [[(self.weight_names[n], str(p.dtype).removeprefix("torch."), list(full_shape(p))) for n, p in bucket]
                for bucket in plan_buckets(self.synced_params(trainable_only), bucket_bytes)]

    def _gathered(self, bucket_bytes: int, trainable_only: bool) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Per bucket of ``weight_plan``, (HF name, full parameter) on rank 0 ([] on other ranks), valid until
        the next item: under ZeRO-3 the bucket is gathered around the yield and released after it."""
        from deepspeed.runtime.zero import GatheredParameters

        for bucket in plan_buckets(self.synced_params(trainable_only), bucket_bytes):
            with GatheredParameters([p for _, p in bucket], modifier_rank=None,
                                    enabled=self.cfg.learner.zero_stage == 3):
                yield [(self.weight_names[n], p.data) for n, p in bucket] if self.rank == 0 else []

    def weight_buckets(self, bucket_bytes: int, trainable_only: bool = True,
                       device: str | torch.device = "cpu") -> Iterator[list[tuple[str, torch.Tensor]]]:
        """``weight_plan``'s buckets as (HF name, tensor) copies on ``device`` (rank 0; other ranks: [] each)."""
        for bucket in self._gathered(bucket_bytes, trainable_only):
            yield [(name, t.detach().to(device, copy=True).contiguous()) for name, t in bucket]

    def weight_group_address(self) -> tuple[str, int]:
        """(this node's address, a free port) for the broadcast group's store, which rank 0 serves."""
        with socket.socket() as s:
            s.bind(("", 0))
            return os.environ["MASTER_ADDR"], s.getsockname()[1]

    def join_weight_group(self, address: str, port: int, world_size: int, timeout_s: float, epoch: int) -> None:
        """Rank 0 joins the broadcast group as its sender (group rank 0); blocks until every rollout
        process joined. Other ranks are not members (they only help gather under ZeRO-3)."""
        if self.rank == 0:
            self._weight_group = None  # the previous membership's group is dropped first
            self._weight_group = WeightGroup(address, port, 0, world_size, timeout_s, epoch, self.device)

    def broadcast_weights(self, bucket_bytes: int, keep: bool = False) -> Iterator:
        """The trainable weights to the group in ``weight_plan`` order: rank 0 yields each bucket's checksum,
        and with ``keep`` then the bucket on the host (the driver's copy for resync). A failed broadcast drops
        the group and raises after rank 0 took part in every gather (no rank is left waiting)."""
        if self.rank == 0 and self._weight_group is None:
            raise RuntimeError("broadcast_weights: learner rank 0 is in no broadcast group")
        error = None
        for tensors, bucket in zip(self._gathered(bucket_bytes, True), self.weight_plan(bucket_bytes), strict=True):
            if self.rank != 0 or error is not None:
                continue
            try:
                total = self._weight_group.send(tensors, bucket)
            except Exception as exc:
                error, self._weight_group = exc, None
                continue
            yield total
            if keep:
                yield [(name, t.detach().to("cpu", copy=True)) for name, t in tensors]
        if error is not None:
            raise error
