"""The current policy as a Hugging Face directory (safetensors shards, config, processor, generation
config) that vLLM, transformers, evaluate.py and infer.py load like any checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from weight_sync.buckets import param_bytes, plan_buckets
from weight_sync.sender import WeightSender

SHARD_BYTES = 2 * 1024**3


def shard_name(index: int, total: int) -> str:
    return "model.safetensors" if total == 1 else f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def export_hf(sender: WeightSender, processor, policy_path: str, dtype: torch.dtype, out_dir: str | Path) -> None:
    """Every weight (frozen ones too) under its checkpoint name, in shards of SHARD_BYTES, with the
    index when there are several; config and processor copied from ``policy_path`` (dtype updated).
    Collective (ZeRO-3 gathers the weights shard by shard); rank 0 writes."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    out = Path(out_dir)
    params = sender.synced_params(trainable_only=False)
    total = len(plan_buckets(params, SHARD_BYTES))
    weight_map: dict[str, str] = {}
    for i, tensors in enumerate(sender.weight_buckets(SHARD_BYTES, trainable_only=False)):
        if sender.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_file(dict(tensors), str(out / shard_name(i, total)), metadata={"format": "pt"})
            weight_map.update({k: shard_name(i, total) for k, _ in tensors})
    if sender.rank == 0:
        if total > 1:
            index = {"metadata": {"total_size": sum(param_bytes(p) for _, p in params)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = AutoConfig.from_pretrained(policy_path)
        config.dtype = dtype
        config.save_pretrained(out)
        processor.save_pretrained(out)
        try:
            GenerationConfig.from_pretrained(policy_path).save_pretrained(out)
        except OSError:
            pass  # the policy has no generation_config.json
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
