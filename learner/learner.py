"""One learner rank: Qwen2.5-VL policy in a DeepSpeed ZeRO-2/3 engine, GRPO and SFT steps, weight export.

R ranks are R processes (Ray actors in cluster/, plain processes in tests), each building
``Learner(cfg, policy_path, rank, world_size, master_addr, master_port)``. Every public method except
``rng_state``/``set_rng_state`` is collective: all ranks call it at the same time (each with its own
shard of the batch). Ranks may hold shards of different sizes, even empty ones: the number of
micro-batches is agreed over ranks and short ranks run zero-weight padding micro-batches, because
ZeRO reduces (stage 2) and gathers (stage 3) parameters once per forward/backward on every rank.

Normalisation: the driver passes the WHOLE batch's ``num_tokens`` / ``num_seqs`` to every rank. Each
micro-batch loss is its partial sum over that global count (learner.grpo), so the micro-batch losses
of all ranks add up to the whole-batch loss. DeepSpeed averages gradients over ranks, so each rank
back-propagates ``world_size * loss``: mean_r(world_size * grad_r) = sum_r grad_r = whole-batch grad.

Metrics are reduced inside (all-reduce), so every rank returns the same whole-batch numbers.

Reference model (KL): not built when kl_coef == 0. ZeRO-2 keeps a plain frozen copy on every rank
(ZeRO-2 holds the full policy anyway); ZeRO-3 wraps it in a DeepSpeed engine without optimizer so the
reference is partitioned like the policy and gathered layer by layer in its forward. It starts as the
policy at ``policy_path``; after a warm start the driver points it at the warm-started policy
(``set_reference``), the policy GRPO starts from, as in Seg-Zero/TRL/OpenRLHF.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import socket
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks one
import deepspeed  # noqa: E402
from deepspeed.runtime.zero import GatheredParameters  # noqa: E402

from config import Config  # noqa: E402
from learner.batch import (collate, image_features, image_pixels, model_inputs, shared_prompt_logits,  # noqa: E402
                           token_logprobs)
from learner.grpo import policy_loss  # noqa: E402
from learner.phases import PhaseClock  # noqa: E402
from learner.weights import checkpoint_names, param_bytes, plan_buckets, write_index, write_shard  # noqa: E402
from policy.prompt import chat_prompt  # noqa: E402
from rollout.broadcast import WeightGroup  # noqa: E402

log = logging.getLogger(__name__)
EXPORT_SHARD_BYTES = 2 * 1024**3


def deepspeed_config(cfg: Config, bf16: bool, with_optimizer: bool = True) -> dict:
    """The DeepSpeed config of the policy engine (with_optimizer=False: the ZeRO-3 reference)."""
    lc = cfg.learner
    # contiguous_gradients copies every gradient into a flat buffer as backward produces it: on a GPU that
    # avoids fragmenting its memory; on CPU it only costs copies (0.5B policy, fp32: backward 14.8 -> 9.0 s,
    # optimizer step 2.9 -> 1.3 s per GRPO step with it off; README Benchmarks).
    zero = {"stage": lc.zero_stage, "contiguous_gradients": torch.cuda.is_available()}
    if lc.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = lc.zero3_param_persistence_threshold
    ds = {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
    }
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


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: lr_step = lr * min(1, (step + 1) / warmup_steps); step counts optimizer steps from 0."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def lr_factor(step: int, cfg: Config) -> float:
    """The learning rate of optimizer step ``step`` (from 0) as a fraction of the base rate.

    warm-up (learner.warmup_steps) x, with learner.lr_schedule=cosine, a cosine decay over the GRPO
    steps, which follow the train.sft_steps warm-start steps: from 1 at the first GRPO step to
    learner.min_lr_ratio after the last, c(p) = m + (1 - m) (1 + cos(pi p)) / 2, p = GRPO steps done /
    train.steps. It is a function of the step alone, so a resumed job follows the same schedule.
    """
    lc = cfg.learner
    factor = warmup_factor(step, lc.warmup_steps)
    if lc.lr_schedule == "cosine" and step >= cfg.train.sft_steps:
        progress = min(1.0, (step - cfg.train.sft_steps) / max(cfg.train.steps, 1))
        factor *= lc.min_lr_ratio + (1 - lc.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2
    return factor


class _ZeroConfigForHF:
    """What transformers reads from its DeepSpeed config object while loading (is_zero3(), .config).

    transformers' own HfDeepSpeedConfig only adds a hard dependency on `accelerate`, not installed here.
    """

    def __init__(self, config: dict):
        self.config = config

    def is_zero3(self) -> bool:
        return self.config["zero_optimization"]["stage"] == 3


class Learner:
    def __init__(self, cfg: Config, policy_path: str, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500,
                 device_index: Callable[[], int] | None = None):
        """``device_index``: called (in this process) for the CUDA device to use; default rank modulo the
        visible devices. Under Ray the learner group passes the GPU Ray assigned (cluster.placement)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        self.cfg, self.policy_path = cfg, str(policy_path)
        self.rank, self.world_size = rank, world_size
        on_gpu = torch.cuda.is_available()
        local_rank = 0
        if on_gpu:
            local_rank = device_index() if device_index is not None else rank % torch.cuda.device_count()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        if on_gpu:
            torch.cuda.set_device(local_rank)
        self.device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world_size)
        elif dist.get_world_size() != world_size:
            raise RuntimeError(f"torch.distributed already initialised with world size {dist.get_world_size()}")
        if not on_gpu:
            # DeepSpeed's CPU backend would compile a shared-memory all-reduce kernel here (~2.5 min on
            # 2 cores, once per machine) that only tensor-parallel inference uses; training
            # collectives go through gloo. Marking the op incompatible skips the build.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")

        bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and on_gpu)
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        lc = cfg.learner
        self.processor = AutoProcessor.from_pretrained(self.policy_path)
        self.pad_id = self.processor.tokenizer.pad_token_id
        ds_config = deepspeed_config(cfg, bf16)

        def load(path: str):
            # Under ZeRO-3, HfDeepSpeedConfig makes from_pretrained build the model inside zero.Init:
            # each rank only ever materialises its own partition of the weights.
            zero3 = _ZeroConfigForHF(ds_config)  # held here: transformers keeps only a weakref
            if lc.zero_stage == 3:
                set_hf_deepspeed_config(zero3)
            try:
                return AutoModelForImageTextToText.from_pretrained(path, dtype=self.dtype)
            finally:
                unset_hf_deepspeed_config()

        def load_reference(path: str):
            ref = load(path).eval().requires_grad_(False)
            if lc.zero_stage == 3:
                return deepspeed.initialize(model=ref, config=deepspeed_config(cfg, bf16, with_optimizer=False))[0]
            return ref.to(self.device)

        self._load_reference = load_reference
        model = load(self.policy_path)
        if lc.freeze_vision:
            model.model.visual.requires_grad_(False)
        if lc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        trainable = [p for p in model.parameters() if p.requires_grad]
        # nanoGPT's rule: decay matrices and embeddings, not biases and norm gains.
        groups = [{"params": [p for p in trainable if p.dim() >= 2]},
                  {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: lr_factor(step, cfg)))
        self.model = self.engine.module
        self.hf_names = checkpoint_names(self.model)

        self.ref = load_reference(self.policy_path) if lc.kl_coef > 0 else None
        # Padding micro-batches (see module docstring) forward this sample with zero weight.
        size = cfg.model.image_size
        from PIL import Image
        self._filler = {"prompt": chat_prompt("", cfg.reward.rules), "image": Image.new("RGB", (size, size)),
                        "response_ids": [self.pad_id], "logprobs": [0.0], "advantage": 0.0}
        n_train = sum(p.numel() if not hasattr(p, "ds_numel") else p.ds_numel for p in trainable)
        log.info("learner rank %d/%d: ZeRO-%d, %s, %.1fM trainable params, reference=%s", rank, world_size,
                 lc.zero_stage, self.dtype, n_train / 1e6, self.ref is not None)

    # ------------------------------------------------------------------ helpers

    def _all_reduce(self, values: list, op=dist.ReduceOp.SUM) -> list[float]:
        """Floats or 0-d tensors (left on the device until here: one host transfer per call)."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in values]) \
            if values else torch.zeros(0, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=op)
        return t.tolist()

    def _micro_batches(self, samples: list[dict]) -> Iterator[tuple[list[dict], bool]]:
        """(micro-batch, is_real): the same number of micro-batches on every rank, fillers last."""
        mbs = self.cfg.learner.micro_batch_size
        n_local = math.ceil(len(samples) / mbs)
        n = int(self._all_reduce([n_local], dist.ReduceOp.MAX)[0])
        for i in range(n):
            chunk = samples[i * mbs:(i + 1) * mbs]
            yield (chunk, True) if chunk else ([self._filler], False)

    def _features(self, module, batch: dict, cache: dict) -> tuple[torch.Tensor, ...] | None:
        """Vision features of the micro-batch's distinct images under ``module``'s own tower (policy or
        reference): the G answers of a group share one image, so the tower runs once per image, not once
        per row. A trained tower runs per micro-batch with gradients (the rows' gradients add up on their
        image). A frozen one runs once per learner call under ZeRO-2: ``cache`` (one dict per call) keeps
        its features for the later micro-batches and the other forwards. Under ZeRO-3 a forward of the
        tower gathers its partitioned weights, a collective every rank must join equally often: no cache;
        and a trained tower must run inside the engine's forward (ZeRO-3 follows the module order of its
        forward and of the recomputation in backward to gather and release weights), so there None: the
        pixel values go into the model (``_forward``)."""
        hf = module.module if isinstance(module, deepspeed.DeepSpeedEngine) else module
        frozen = not any(p.requires_grad for p in hf.model.visual.parameters())
        if self.cfg.learner.zero_stage == 3:
            if not frozen:
                return None
            with torch.no_grad():
                return image_features(hf, batch, self.device, self.dtype)
        if not frozen:
            return image_features(hf, batch, self.device, self.dtype)
        keys = [(id(hf), k) for k in batch["image_keys"]]
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            sub = {"pixel_values": torch.cat([image_pixels(batch, i) for i in missing]),
                   "unique_grid_thw": batch["unique_grid_thw"][missing]}
            with torch.no_grad():
                cache.update(zip((keys[i] for i in missing), image_features(hf, sub, self.device, self.dtype)))
        return tuple(cache[k] for k in keys)

    def _forward(self, module, batch: dict, features: tuple, with_entropy: bool = False,
                 temperature: float | None = None):
        """Token logprobs under logits / T; T defaults to the rollout temperature (the sampling policy).
        ``features``: the batch's images under ``module``'s vision tower (``_features``); None: the tower
        runs inside this forward, on each distinct image (shared prompt) or on each row's."""
        hf = module.module if isinstance(module, deepspeed.DeepSpeedEngine) else module
        # transformers' checkpointed layers drop a cache passed to them while training
        checkpointed = hf.training and getattr(hf, "is_gradient_checkpointing", False)
        if self.cfg.learner.shared_prompt and not checkpointed:
            logits = shared_prompt_logits(module, hf, batch, features, self.device, self.dtype)
        else:
            logits = module(**model_inputs(batch, self.device, self.dtype, features)).logits
        return token_logprobs(logits, batch["response_ids"].to(self.device),
                              self.cfg.rollout.temperature if temperature is None else temperature, with_entropy)

    def _counts(self, shard: list[dict], num_tokens, num_seqs) -> tuple[float, float]:
        if num_tokens is None or num_seqs is None:
            local = [sum(len(s["response_ids"]) for s in shard), sum(1 for s in shard if len(s["response_ids"]))]
            total = self._all_reduce(local)
            num_tokens = total[0] if num_tokens is None else num_tokens
            num_seqs = total[1] if num_seqs is None else num_seqs
        return float(num_tokens), float(num_seqs)

    @contextlib.contextmanager
    def _update_threads(self, concurrent_rollout: bool):
        """torch threads for an update: cluster.learner_update_threads while nothing else computes (the
        rollout workers wait for this update), else the rank's usual cluster.learner.torch_threads."""
        usual, update = torch.get_num_threads(), self.cfg.cluster.learner_update_threads
        if update and not concurrent_rollout and not torch.cuda.is_available():
            torch.set_num_threads(update)
        try:
            yield
        finally:
            torch.set_num_threads(usual)

    def _finish_step(self, sums: dict, maxes: dict, clock: PhaseClock) -> dict[str, float]:
        """One optimizer step, then whole-batch metrics (same on every rank): sums and maxima over the
        ranks, and the seconds of each phase of the step as time/learner/<phase>, the slowest rank's (the
        others wait for it in the collectives). One host transfer per reduction."""
        lr = self.scheduler.get_last_lr()[0]
        with clock("optimizer"):
            self.engine.step()
        maxes = {**maxes, **{f"time/learner/{phase}": s for phase, s in clock.seconds().items()}}
        keys = sorted(sums)
        metrics = dict(zip(keys, self._all_reduce([sums[k] for k in keys])))
        mkeys = sorted(maxes)
        metrics.update(zip(mkeys, self._all_reduce([maxes[k] for k in mkeys], dist.ReduceOp.MAX)))
        grad_norm = self.engine.get_global_grad_norm()
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = lr
        return metrics

    # ------------------------------------------------------------------ training

    def train_step(self, shard: list[dict], num_tokens: int | None = None, num_seqs: int | None = None) -> dict[str, float]:
        """One GRPO update on this rank's shard; num_tokens/num_seqs count the WHOLE batch (all ranks).

        shard: dicts with prompt, image, response_ids, logprobs (vLLM, one per token), advantage.
        Exactly one optimizer update per rollout batch, so the "old" policy of the PPO ratio is the
        current one: old_logp = logp.detach() from the same forward (ratio = 1, gradient A * grad logp,
        as GRPO with one update per batch). None counts are computed by an all-reduce.
        Returns whole-batch metrics: loss, pg_loss, kl, entropy, clip_frac, dual_clip_frac, ratio_mean,
        ratio_max, grad_norm (before clipping), lr (used by this step), tokens, seqs, trained_seqs (the
        sequences all ranks actually trained, summed: the driver checks it), logprob_drift
        = mean over response tokens of |learner logprob before the update - vLLM sampling logprob|,
        and the seconds of each phase (``learner.phases``) as time/learner/<phase>: collate (processor,
        padding), vision (vision towers), reference (reference forward), forward, loss, backward,
        optimizer (the slowest rank's).
        """
        lc = self.cfg.learner
        with self._update_threads(concurrent_rollout=self.cfg.rollout.off_policy):
            num_tokens, num_seqs = self._counts(shard, num_tokens, num_seqs)
            self.engine.train()
            clock, encoded, features = PhaseClock(self.device), {}, {}
            sums: dict = defaultdict(float)
            maxes: dict = {"ratio_max": 0.0}
            for chunk, real in self._micro_batches(shard):
                with clock("collate"):
                    batch = collate(self.processor, chunk, self.pad_id, encoded)
                    sampled = torch.zeros(batch["response_mask"].shape)
                    for i, s in enumerate(chunk if real else []):
                        n = min(len(s["logprobs"]), sampled.shape[1])
                        sampled[i, :n] = torch.as_tensor(list(s["logprobs"][:n]), dtype=sampled.dtype)
                    mask = batch["response_mask"].to(self.device) * float(real)
                    sampled = sampled.to(self.device)
                    adv = torch.tensor([float(s["advantage"]) for s in chunk], device=self.device) * float(real)
                ref_logp = None
                if self.ref is not None:
                    with clock("vision"):
                        ref_images = self._features(self.ref, batch, features)
                    with clock("reference"), torch.no_grad():
                        ref_logp, _ = self._forward(self.ref, batch, ref_images)
                with clock("vision"):
                    images = self._features(self.engine, batch, features)
                with clock("forward"):
                    logp, entropy = self._forward(self.engine, batch, images, with_entropy=True)
                with clock("loss"):
                    if lc.entropy_coef == 0:
                        entropy = entropy.detach()  # metric only: free its graph now
                    # On-policy the sampling policy is the current one (ratio 1); one-step off-policy rollouts
                    # came from the previous weights, so the ratio is taken against their sampling logprobs.
                    old_logp = sampled if self.cfg.rollout.off_policy else logp.detach()
                    loss, m = policy_loss(
                        logp, old_logp, adv, mask, clip_low=lc.clip_low, clip_high=lc.clip_high, agg=lc.loss_agg,
                        ref_logp=ref_logp, kl_coef=lc.kl_coef, kl_kind=lc.kl_kind, entropy=entropy,
                        entropy_coef=lc.entropy_coef, clip_ratio_c=lc.clip_ratio_c, num_tokens=num_tokens,
                        num_seqs=num_seqs, max_len=self.cfg.rollout.max_new_tokens)
                with clock("backward"):
                    self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                with clock("loss"):  # metrics stay on the device until _finish_step
                    sums["loss"] = sums["loss"] + loss.detach()
                    sums["trained_seqs"] += len(chunk) if real else 0
                    for k, v in m.items():
                        if k == "ratio_max":
                            maxes[k] = torch.maximum(torch.as_tensor(maxes[k], device=self.device), v.detach())
                        else:
                            sums[k] = sums[k] + v.detach()
                    sums["drift_sum"] = sums["drift_sum"] + ((logp.detach() - sampled).abs() * mask).sum()
            metrics = self._finish_step(sums, maxes, clock)
        metrics["logprob_drift"] = metrics.pop("drift_sum", 0.0) / max(num_tokens, 1.0)
        metrics.update(tokens=num_tokens, seqs=num_seqs)
        return metrics

    def sft_step(self, shard: list[dict], num_tokens: int | None = None) -> dict[str, float]:
        """Supervised warm start: loss = sum over response tokens of -log p / num_tokens (whole batch).

        p = softmax(logits) at temperature 1: the warm start fits the model itself; the rollout
        temperature is how GRPO then samples from it.

        shard: dicts with prompt, image, response_ids. Same engine, optimizer and LR schedule as GRPO.
        Returns loss, grad_norm, lr, tokens and the phase seconds (time/learner/*, as train_step).
        """
        with self._update_threads(concurrent_rollout=False):
            num_tokens, _ = self._counts(shard, num_tokens, 0)
            self.engine.train()
            clock, encoded, features = PhaseClock(self.device), {}, {}
            sums: dict = defaultdict(float)
            for chunk, real in self._micro_batches(shard):
                with clock("collate"):
                    batch = collate(self.processor, chunk, self.pad_id, encoded)
                    mask = batch["response_mask"].to(self.device) * float(real)
                with clock("vision"):
                    images = self._features(self.engine, batch, features)
                with clock("forward"):
                    logp, _ = self._forward(self.engine, batch, images, temperature=1.0)
                with clock("loss"):
                    loss = -(logp * mask).sum() / max(num_tokens, 1.0)
                with clock("backward"):
                    self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                sums["loss"] = sums["loss"] + loss.detach()
            metrics = self._finish_step(sums, {}, clock)
        metrics["tokens"] = num_tokens
        return metrics

    @torch.no_grad()
    def logprobs(self, seqs: list[dict], temperature: float | None = None) -> list[list[float]]:
        """Per-token logprobs of each seq's response_ids under the current policy (no grad), at
        logits / temperature (default: the rollout temperature; parity checks against vLLM's prompt
        logprobs, which are unscaled, pass 1.0)."""
        self.engine.eval()
        out, encoded, features = [], {}, {}
        for chunk, real in self._micro_batches(seqs):
            batch = collate(self.processor, chunk, self.pad_id, encoded)
            logp, _ = self._forward(self.engine, batch, self._features(self.engine, batch, features),
                                    temperature=temperature)
            if real:
                out += [logp[i, :len(s["response_ids"])].tolist() for i, s in enumerate(chunk)]
        return out

    # ------------------------------------------------------------------ weights out

    def _synced_params(self, trainable_only: bool) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad or not trainable_only]

    def weight_plan(self, bucket_bytes: int, trainable_only: bool = True) -> list[list[tuple[str, str, list[int]]]]:
        """The buckets ``weight_buckets`` and ``broadcast_weights`` send, as lists of (HF checkpoint name,
        dtype name, full shape), without gathering anything: what a receiver must know before a
        broadcast (rollout/broadcast.py). Local, not collective."""
        return [[(self.hf_names[n], str(p.dtype).removeprefix("torch."), list(getattr(p, "ds_shape", p.shape)))
                 for n, p in bucket] for bucket in plan_buckets(self._synced_params(trainable_only), bucket_bytes)]

    def _gathered_buckets(self, bucket_bytes: int, trainable_only: bool) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Per bucket of ``weight_plan``, (HF name, full parameter) on rank 0 ([] on other ranks), valid until
        the next item: under ZeRO-3 the bucket is gathered around the yield and released after it, on every
        rank (collective), so no rank ever holds more than one bucket of gathered weights."""
        for bucket in plan_buckets(self._synced_params(trainable_only), bucket_bytes):
            if self.cfg.learner.zero_stage == 3:
                with GatheredParameters([p for _, p in bucket], modifier_rank=None):
                    yield [(self.hf_names[n], p.data) for n, p in bucket] if self.rank == 0 else []
            else:
                yield [(self.hf_names[n], p.data) for n, p in bucket] if self.rank == 0 else []

    def weight_buckets(self, bucket_bytes: int, trainable_only: bool = True,
                       device: str | torch.device = "cpu") -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Yields lists of (HF checkpoint name, tensor) of about bucket_bytes each, in module order.

        trainable_only: skip frozen parameters (the vision tower with learner.freeze_vision).
        Tensors are detached, contiguous copies on ``device`` (CPU by default). Under ZeRO-3 each
        bucket's parameters are gathered, copied and released before the next bucket (never the whole
        model at once); this is collective, so every rank must iterate the generator concurrently.
        Only rank 0 receives tensors; other ranks get one empty list per bucket.
        """
        for bucket in self._gathered_buckets(bucket_bytes, trainable_only):
            yield [(name, t.detach().to(device, copy=True).contiguous()) for name, t in bucket]

    # ------------------------------------------------------------------ weight broadcast (rollout/broadcast.py)

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
        """Sends the trainable weights to the broadcast group, bucket by bucket (``weight_plan`` order).
        Collective over the learner ranks (ZeRO-3 gathers each bucket on all of them); rank 0 sends.

        Rank 0 yields each bucket's checksum, and with ``keep`` then the bucket itself as (name, tensor)
        on the host (the driver keeps those to resync a restarted worker without this learner); other
        ranks yield nothing. A failed broadcast (a member hung or died) drops the group and raises.
        """
        group = getattr(self, "_weight_group", None)
        if self.rank == 0 and group is None:
            raise RuntimeError("broadcast_weights: learner rank 0 is in no broadcast group")
        plan, error = self.weight_plan(bucket_bytes), None
        for tensors, bucket in zip(self._gathered_buckets(bucket_bytes, True), plan, strict=True):
            if self.rank != 0 or error is not None:
                continue  # after a failure rank 0 still takes part in every gather: no rank is left waiting
            try:
                total = group.send(tensors, bucket)
            except Exception as exc:
                error, self._weight_group = exc, None
                continue
            yield total
            if keep:
                yield [(name, t.detach().to("cpu", copy=True).contiguous()) for name, t in tensors]
        if error is not None:
            raise error

    def export_hf(self, out_dir: str | Path) -> None:
        """Writes an HF directory (safetensors shards, config, processor/tokenizer) of the current policy.

        Collective (ZeRO-3 gathers the weights shard by shard); rank 0 writes.
        """
        from transformers import AutoConfig, GenerationConfig

        out = Path(out_dir)
        params = list(self.model.named_parameters())
        total = len(plan_buckets(params, EXPORT_SHARD_BYTES))
        weight_map: dict[str, str] = {}
        for i, tensors in enumerate(self.weight_buckets(EXPORT_SHARD_BYTES, trainable_only=False)):
            if self.rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                write_shard(out, i, total, tensors, weight_map)
        if self.rank == 0:
            write_index(out, total, weight_map, sum(param_bytes(p) for _, p in params))
            config = AutoConfig.from_pretrained(self.policy_path)
            config.dtype = self.dtype
            config.save_pretrained(out)
            self.processor.save_pretrained(out)
            try:
                GenerationConfig.from_pretrained(self.policy_path).save_pretrained(out)
            except OSError:
                pass  # the policy has no generation_config.json
        if self.world_size > 1:
            dist.barrier()

    def set_reference(self, policy_dir: str | Path) -> None:
        """Makes the HF policy at policy_dir (``export_hf`` of the warm start) the KL reference. Without
        it GRPO's KL would pull the warm-started policy back towards the random weights it started from.
        No-op when kl_coef == 0."""
        if self.ref is not None:
            self.ref = None  # free the old copy first
            self.ref = self._load_reference(str(policy_dir))

    def set_lr(self, lr: float) -> None:
        """Sets the base learning rate (the warm-up schedule still applies): the warm start uses
        train.sft_lr, GRPO learner.lr, on the same engine and optimizer."""
        self.scheduler.base_lrs = [lr for _ in self.scheduler.base_lrs]
        factors = [f(self.scheduler.last_epoch) for f in self.scheduler.lr_lambdas]
        for group, factor in zip(self.optimizer.param_groups, factors):
            group["lr"] = lr * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, ckpt_dir: str | Path, client_state: dict | None = None) -> None:
        """DeepSpeed checkpoint (weights, optimizer, LR schedule; partitioned per rank) + client_state."""
        self.engine.save_checkpoint(str(ckpt_dir), client_state=dict(client_state or {}))

    def load_checkpoint(self, ckpt_dir: str | Path) -> dict:
        """Restores what save_checkpoint wrote (its latest tag) and returns its client_state."""
        path, client_state = self.engine.load_checkpoint(str(ckpt_dir))
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {ckpt_dir}")
        return client_state or {}

    @staticmethod
    def rng_state() -> dict:
        """Python, NumPy and torch (CPU, CUDA) generator states, for client_state."""
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def set_rng_state(state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
