"""Parameter names as HF checkpoints spell them, size-bounded buckets, and safetensors shards.

transformers 5 renames some weights between the module tree and the files ``save_pretrained`` writes
("conversion mapping"). For Qwen2.5-VL the module ``model.visual.*`` is saved as ``visual.*`` and
``model.language_model.*`` as ``model.*`` (``lm_head.*`` unchanged). vLLM's
``reload_weights(is_checkpoint_format=True)`` and ``from_pretrained`` expect the file names, so every
tensor leaving the learner is named with :func:`checkpoint_names`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def checkpoint_names(model: nn.Module) -> dict[str, str]:
    """Module parameter name -> name in the model's safetensors files (what save_pretrained writes)."""
    from transformers.core_model_loading import revert_weight_conversion

    names = {}
    for name, _ in model.named_parameters():
        # Renamings are per key, so reverting a one-entry state dict gives that key's file name.
        (saved,) = revert_weight_conversion(model, {name: torch.empty(0)}).keys()
        names[name] = saved
    return names


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


def shard_name(index: int, total: int) -> str:
    return "model.safetensors" if total == 1 else f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def write_shard(out_dir: Path, index: int, total: int, tensors: list[tuple[str, torch.Tensor]],
                weight_map: dict[str, str]) -> None:
    """Writes one safetensors shard and records its tensors in weight_map (name -> file)."""
    from safetensors.torch import save_file

    name = shard_name(index, total)
    save_file(dict(tensors), str(out_dir / name), metadata={"format": "pt"})
    weight_map.update({k: name for k, _ in tensors})


def write_index(out_dir: Path, total: int, weight_map: dict[str, str], total_bytes: int) -> None:
    """model.safetensors.index.json, needed only when the weights span several shards."""
    if total > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
