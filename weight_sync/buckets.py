"""Names, buckets and byte layouts of synced weights (the contract: weight_sync/__init__.py)."""
from __future__ import annotations

from typing import NamedTuple

import safetensors.torch
import torch
from torch import nn

ALIGN = 64          # bytes: every tensor starts on a cache line (and on any dtype's alignment)
PAGE = 4096         # bytes: buffers are whole pages, so they view as rows of 1024 int32 words
BucketPlan = list[tuple[str, str, list[int]]]  # [(HF name, dtype name, full shape)] in send order


def checkpoint_names(model: nn.Module) -> dict[str, str]:
    """Module parameter name -> name in the model's safetensors files (what save_pretrained writes)."""
    from transformers.core_model_loading import revert_weight_conversion

    names = {}
    for name, _ in model.named_parameters():
        # Renamings are per key, so reverting a one-entry state dict gives that key's file name.
        (saved,) = revert_weight_conversion(model, {name: torch.empty(0)}).keys()
        names[name] = saved
    return names


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's real shape, also when ZeRO-3 has partitioned it (its .data is then empty)."""
    return getattr(p, "ds_shape", p.shape)


def param_bytes(p: torch.Tensor) -> int:
    """Full size of a parameter in bytes, also when ZeRO-3 has partitioned it (then p.numel() == 0)."""
    return getattr(p, "ds_numel", p.numel()) * p.element_size()


def plan_buckets(params: list[tuple[str, nn.Parameter]], bucket_bytes: int) -> list[list[tuple[str, nn.Parameter]]]:
    """Consecutive groups of params of at most bucket_bytes each (a larger param is a bucket on its own)."""
    buckets, current, size = [], [], 0
    for name, p in params:
        nbytes = param_bytes(p)
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append((name, p))
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


class Slot(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def layout(bucket: BucketPlan) -> tuple[list[Slot], int]:
    """Where each tensor of a bucket lies in its flat buffer (64-byte aligned offsets), and the buffer's
    size in bytes (whole 4 KiB pages)."""
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
    """(name, tensor) views into a received buffer (no copy)."""
    return [(s.name, buffer[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)) for s in slots]


def checksum(buffer: torch.Tensor) -> int:
    """Position-sensitive checksum of a page-padded buffer on its own device: per-page int32 sums weighted
    by page index + 1, in wrapping int64 arithmetic, so sender and receivers agree exactly on any device."""
    pages = buffer.view(torch.int32).view(-1, PAGE // 4).sum(dim=1, dtype=torch.int64)
    weights = torch.arange(1, pages.numel() + 1, dtype=torch.int64, device=buffer.device)
    return int((pages * weights).sum())


def to_bytes(bucket: list[tuple[str, torch.Tensor]]) -> bytes:
    """A bucket as a safetensors blob: what crosses into vLLM's own processes, whose RPC carries no tensors."""
    return safetensors.torch.save({name: t.detach().to("cpu").contiguous() for name, t in bucket})


def from_bytes(blob: bytes) -> list[tuple[str, torch.Tensor]]:
    return list(safetensors.torch.load(bytes(blob)).items())
