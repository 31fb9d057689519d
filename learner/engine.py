"""A learner rank's set-up: torch.distributed, the policy and reference models in DeepSpeed engines
(ZeRO-2/3), the optimizer's parameter groups and the learning-rate schedule.

Under ZeRO-3, transformers builds the model inside ``zero.Init`` (HfDeepSpeedConfig): each rank only
ever materialises its own partition of the weights, and a parameter's ``.data`` is then empty; its
real shape is ``ds_shape`` (weight_sync.buckets.full_shape), which every shape-based choice reads.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import deepspeed  # learner/__init__.py has set DS_ACCELERATOR
import torch
import torch.distributed as dist

from config import Config
from weight_sync.buckets import full_shape


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int,
                     device_index: Callable[[], int] | None) -> torch.device:
    """Joins the learner ranks' process group (NCCL on GPU, gloo on CPU); returns this rank's device.
    ``device_index``: called for the CUDA device to use; default rank modulo the visible devices."""
    on_gpu = torch.cuda.is_available()
    local_rank = 0
    if on_gpu:
        local_rank = device_index() if device_index is not None else rank % torch.cuda.device_count()
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world_size)
    elif dist.get_world_size() != world_size:
        raise RuntimeError(f"torch.distributed already initialised with world size {dist.get_world_size()}")
    if not on_gpu:
        # DeepSpeed's CPU backend would compile a shared-memory all-reduce kernel here (~2.5 min on 2 cores,
        # once per machine) that only tensor-parallel inference uses; training collectives go through gloo.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    return torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")


def deepspeed_config(cfg: Config, bf16: bool, with_optimizer: bool = True) -> dict:
    """The DeepSpeed config of the policy engine (with_optimizer=False: the ZeRO-3 reference)."""
    lc = cfg.learner
    # contiguous_gradients copies every gradient into a flat buffer as backward produces it: on a GPU that
    # avoids fragmenting its memory; on CPU it only costs copies (0.5B policy, fp32: backward 14.8 -> 9.0 s,
    # optimizer step 2.9 -> 1.3 s per GRPO step with it off; docs/results.md).
    zero = {"stage": lc.zero_stage, "contiguous_gradients": torch.cuda.is_available()}
    if lc.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = lc.zero3_param_persistence_threshold
    ds = {"train_micro_batch_size_per_gpu": lc.micro_batch_size, "gradient_accumulation_steps": 1,
          "zero_optimization": zero, "bf16": {"enabled": bf16}, "steps_per_print": 2**31 - 1}
    if bf16 and with_optimizer:
        # bf16 compute, fp32 gradients: accumulated over micro-batches in fp32 buffers and reduced across
        # ranks in fp32 (DeepSpeed's default for bf16 is bf16 for both), as Seg-Zero's fp32-master
        # training does. tests/test_learner_precision.py measures the difference.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    if with_optimizer:
        ds.update({
            # We own the accumulation boundary: any number of backward() calls, then one step().
            "managed_gradient_accumulation": False,
            "gradient_clipping": lc.grad_clip,
            # torch's AdamW with its fused kernel (one vectorised pass over the flat ZeRO partition, CPU and
            # GPU; on CPU the default is a chain of whole-tensor ops: 0.5B policy, optimizer phase 7.8 ->
            # 2.9 s). No DeepSpeed op compilation on any machine.
            "optimizer": {"type": "AdamW", "params": {"lr": lc.lr, "weight_decay": lc.weight_decay,
                                                      "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True,
                                                      "fused": True}},
        })
    return ds


def learning_rate(position: int, cfg: Config) -> float:
    """The learning rate of the update at schedule position ``position``: warm-start step k is position
    k - 1, GRPO step s is position train.sft_steps + s - 1, whether or not earlier steps updated (a
    step that dynamic sampling skipped still moves the schedule), so the rate is a function of the
    step alone and a resumed job follows the same schedule.

    base = train.sft_lr for the warm start, learner.lr for GRPO
    x linear warm-up: min(1, (position + 1) / learner.warmup_steps)
    x learner.lr_schedule=cosine (GRPO only): m + (1 - m) (1 + cos(pi p)) / 2, p = (s - 1) / train.steps,
      m = learner.min_lr_ratio (from 1 at the first GRPO step towards m after the last)
    """
    lc, sft = cfg.learner, cfg.train.sft_steps
    rate = cfg.train.sft_lr if position < sft else lc.lr
    if lc.warmup_steps > 0:
        rate *= min(1.0, (position + 1) / lc.warmup_steps)
    if lc.lr_schedule == "cosine" and position >= sft:
        progress = min(1.0, (position - sft) / max(cfg.train.steps, 1))
        rate *= lc.min_lr_ratio + (1 - lc.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2
    return rate


class _ZeroConfigForHF:
    """What transformers reads from its DeepSpeed config object while loading (is_zero3(), .config).

    transformers' own HfDeepSpeedConfig only adds a hard dependency on `accelerate`, not installed here.
    """

    def __init__(self, config: dict):
        self.config = config

    def is_zero3(self) -> bool:
        return self.config["zero_optimization"]["stage"] == 3


def load_model(path: str, ds_config: dict, dtype: torch.dtype):
    """The HF model at ``path``; under ZeRO-3 built inside zero.Init (partitioned from the start)."""
    from transformers import AutoModelForImageTextToText
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    zero3 = _ZeroConfigForHF(ds_config)  # held here: transformers keeps only a weakref
    if zero3.is_zero3():
        set_hf_deepspeed_config(zero3)
    try:
        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    finally:
        unset_hf_deepspeed_config()


def decay_groups(model: torch.nn.Module) -> list[dict]:
    """The optimizer's parameter groups, nanoGPT's rule: weight decay on matrices and embeddings, not
    on biases and norm gains; by each parameter's real shape (ZeRO-3 partitions have dim 1)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if len(full_shape(p)) >= 2]},
            {"params": [p for p in trainable if len(full_shape(p)) < 2], "weight_decay": 0.0}]


def policy_engine(cfg: Config, path: str, dtype: torch.dtype):
    """(DeepSpeed engine, optimizer) of the trained policy at ``path``."""
    lc = cfg.learner
    ds_config = deepspeed_config(cfg, dtype == torch.bfloat16)
    model = load_model(path, ds_config, dtype)
    if lc.freeze_vision:
        model.model.visual.requires_grad_(False)
    if lc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=decay_groups(model), config=ds_config)
    return engine, optimizer


def reference_model(cfg: Config, path: str, dtype: torch.dtype, device: torch.device):
    """The frozen KL reference at ``path``: a plain copy under ZeRO-2 (which holds the full policy on
    every rank anyway), a DeepSpeed engine without optimizer under ZeRO-3 (partitioned like the policy,
    gathered layer by layer in its forward)."""
    ds_config = deepspeed_config(cfg, dtype == torch.bfloat16, with_optimizer=False)
    ref = load_model(path, ds_config, dtype).eval().requires_grad_(False)
    if cfg.learner.zero_stage == 3:
        return deepspeed.initialize(model=ref, config=ds_config)[0]
    return ref.to(device)
