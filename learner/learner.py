"""One learner rank: the policy in a DeepSpeed ZeRO-2/3 engine, GRPO and warm-start updates, logprobs,
checkpoints, and the weights going out (export, sync).

R ranks are R processes (Ray actors in cluster/, plain processes in tests), each building
``Learner(cfg, policy_path, rank, world_size, master_addr, master_port)``. Every public method is
collective: all ranks call it at the same time (each with its own shard of the batch). Ranks may hold
shards of different sizes, even empty ones: the number of micro-batches is agreed over ranks and short
ranks run zero-weight padding micro-batches, because ZeRO reduces (stage 2) and gathers (stage 3)
parameters once per forward/backward on every rank.

Normalisation: the driver passes the WHOLE batch's ``num_tokens`` / ``num_seqs`` to every rank
(trajectory.LearnerBatch). Each micro-batch loss is its partial sum over that global count
(learner.grpo), so the micro-batch losses of all ranks add up to the whole-batch loss. DeepSpeed
averages gradients over ranks, so each rank back-propagates ``world_size * loss``:
mean_r(world_size * grad_r) = sum_r grad_r = whole-batch grad.

Metrics are reduced inside (all-reduce), so every rank returns the same whole-batch numbers.

Reference model (KL): not built when kl_coef == 0 (learner/engine.py ``reference_model``). It starts as
the policy at ``policy_path``; after a warm start the driver points it at the warm-started policy
(``set_reference``), the policy GRPO starts from, as in Seg-Zero/TRL/OpenRLHF.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from config import Config
from learner.batch import collate
from learner.engine import init_distributed, learning_rate, policy_engine, reference_model
from learner.export import export_hf
from learner.forward import Forward
from learner.grpo import policy_loss
from learner.phases import PhaseClock
from policy.prompt import chat_prompt
from policy.sampling import SamplingRule
from trajectory import LearnerBatch, LearnerSequence
from weight_sync.sender import WeightSender

log = logging.getLogger(__name__)


class Learner(WeightSender):
    """The weights leave through ``weight_sync.sender.WeightSender``'s methods (sync) and ``export_hf``."""

    def __init__(self, cfg: Config, policy_path: str, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500,
                 device_index: Callable[[], int] | None = None):
        """``device_index``: called (in this process) for the CUDA device to use; default rank modulo the
        visible devices. Under Ray the learner group passes the GPU Ray assigned (cluster.placement)."""
        from PIL import Image
        from transformers import AutoProcessor

        self.cfg, self.policy_path = cfg, str(policy_path)
        self.rank, self.world_size = rank, world_size
        self.device = init_distributed(rank, world_size, master_addr, master_port, device_index)
        bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and self.device.type == "cuda")
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.processor = AutoProcessor.from_pretrained(self.policy_path)
        self.pad_id = self.processor.tokenizer.pad_token_id
        self.engine, self.optimizer = policy_engine(cfg, self.policy_path, self.dtype)
        self.model = self.engine.module
        r = cfg.rollout
        self.forward = Forward(cfg, self.device, self.dtype,
                               SamplingRule.of(self.processor.tokenizer, self.policy_path, r.temperature,
                                               r.min_new_tokens))
        self.ref = reference_model(cfg, self.policy_path, self.dtype, self.device) if cfg.learner.kl_coef > 0 else None
        # Padding micro-batches (see module docstring) forward this sequence with zero weight.
        size = cfg.model.image_size
        self._filler = LearnerSequence(chat_prompt("", cfg.reward.rules, cfg.reward.coordinates),
                                       Image.new("RGB", (size, size)), [self.pad_id])
        n_train = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if p.requires_grad)
        log.info("learner rank %d/%d: ZeRO-%d, %s, %.1fM trainable params, reference=%s", rank, world_size,
                 cfg.learner.zero_stage, self.dtype, n_train / 1e6, self.ref is not None)

    # ------------------------------------------------------------------ helpers

    def _all_reduce(self, values: list, op=dist.ReduceOp.SUM) -> list[float]:
        """Floats or 0-d tensors (left on the device until here: one host transfer per call)."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in values]) \
            if values else torch.zeros(0, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=op)
        return t.tolist()

    def _micro_batches(self, samples: list[LearnerSequence]) -> Iterator[tuple[list[LearnerSequence], bool]]:
        """(micro-batch, is_real): the same number of micro-batches on every rank, fillers last."""
        mbs = self.cfg.learner.micro_batch_size
        n = int(self._all_reduce([math.ceil(len(samples) / mbs)], dist.ReduceOp.MAX)[0])
        for i in range(n):
            chunk = samples[i * mbs:(i + 1) * mbs]
            yield (chunk, True) if chunk else ([self._filler], False)

    def _counts(self, batch: LearnerBatch) -> tuple[float, float]:
        """The whole batch's (loss tokens, sequences): as given, else summed over every rank's shard."""
        tokens, seqs = batch.num_tokens, batch.num_seqs
        if tokens is None or seqs is None:
            total = self._all_reduce(list(batch.totals()))
            tokens = total[0] if tokens is None else tokens
            seqs = total[1] if seqs is None else seqs
        return float(tokens), float(seqs)

    @contextlib.contextmanager
    def _update_threads(self, concurrent_rollout: bool):
        """torch threads for an update: cluster.learner_update_threads while nothing else computes (the
        rollout workers wait for this update), else the rank's usual cluster.learner.torch_threads."""
        usual, update = torch.get_num_threads(), self.cfg.cluster.learner_update_threads
        if update and not concurrent_rollout and self.device.type == "cpu":
            torch.set_num_threads(update)
        try:
            yield
        finally:
            torch.set_num_threads(usual)

    def _finish_step(self, sums: dict, maxes: dict, clock: PhaseClock, position: int) -> dict[str, float]:
        """One optimizer step at the schedule's ``position`` (learner/engine.py ``learning_rate``), then
        whole-batch metrics (same on every rank): sums and maxima over the ranks, and the seconds of each
        phase of the step as time/learner/<phase>, the slowest rank's (the others wait for it in the
        collectives). One host transfer per reduction."""
        lr = learning_rate(position, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with clock("optimizer"):
            self.engine.step()
        maxes = {**maxes, **{f"time/learner/{phase}": s for phase, s in clock.seconds().items()}}
        keys, mkeys = sorted(sums), sorted(maxes)
        metrics = dict(zip(keys, self._all_reduce([sums[k] for k in keys])))
        metrics.update(zip(mkeys, self._all_reduce([maxes[k] for k in mkeys], dist.ReduceOp.MAX)))
        grad_norm = self.engine.get_global_grad_norm()
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = lr
        return metrics

    # ------------------------------------------------------------------ training

    def _grpo_inputs(self, chunk: list[LearnerSequence], real: bool, encoded: dict, version: int) -> dict:
        """A collated micro-batch plus what the loss needs on the device: the sampler's logprobs
        ("sampled"), the loss mask (0 on padding micro-batches), the advantages, and which rows were
        sampled with the learner's current weights ("current": the drift check's rows)."""
        batch = collate(self.processor, chunk, self.pad_id, encoded)
        sampled = torch.zeros(batch["response_mask"].shape)
        for i, s in enumerate(chunk if real else []):
            n = min(len(s.logprobs), sampled.shape[1])
            sampled[i, :n] = torch.as_tensor(list(s.logprobs[:n]), dtype=sampled.dtype)
        batch["sampled"] = sampled.to(self.device)
        batch["mask"] = batch["response_mask"].to(self.device) * float(real)
        batch["adv"] = torch.tensor([float(s.advantage) for s in chunk], device=self.device) * float(real)
        batch["current"] = torch.tensor([float(s.weight_version == version) for s in chunk], device=self.device)
        return batch

    def train_step(self, batch: LearnerBatch) -> dict[str, float]:
        """One GRPO update on this rank's shard (``batch.num_tokens``/``num_seqs`` count the WHOLE batch).

        Exactly one optimizer update per rollout batch, so on-policy the "old" policy of the PPO ratio
        is the current one: old_logp = logp.detach() from the same forward (ratio = 1, gradient
        A * grad logp, as GRPO with one update per batch); one-step off-policy it is the sampler's
        logprobs. Returns whole-batch metrics: loss, pg_loss, kl, entropy, clip_frac, dual_clip_frac,
        ratio_mean, ratio_max, grad_norm (before clipping), lr (used by this step), tokens, seqs,
        trained_seqs, logprob_drift = mean over response tokens of |learner logprob before the update
        - vLLM sampling logprob| (off-policy it includes the last update), logprob_drift_current and
        tokens_current: the same over the tokens sampled with the learner's current weights (``batch.
        version``), where the two distributions must agree, and the seconds of each phase
        (``learner.phases``) as time/learner/<phase>: collate, vision, reference, forward, loss,
        backward, optimizer (the slowest rank's).
        """
        with self._update_threads(concurrent_rollout=self.cfg.rollout.off_policy):
            num_tokens, num_seqs = self._counts(batch)
            self.engine.train()
            clock, encoded, features = PhaseClock(self.device), {}, {}
            sums: dict = defaultdict(float)
            maxes: dict = {"ratio_max": 0.0}
            for chunk, real in self._micro_batches(batch.sequences):
                with clock("collate"):
                    mb = self._grpo_inputs(chunk, real, encoded, batch.version)
                ref_logp = None
                if self.ref is not None:
                    with clock("vision"):
                        ref_images = self.forward.features(self.ref, mb, features)
                    with clock("reference"), torch.no_grad():
                        ref_logp, _ = self.forward.logprobs(self.ref, mb, ref_images)
                with clock("vision"):
                    images = self.forward.features(self.engine, mb, features)
                with clock("forward"):
                    logp, entropy = self.forward.logprobs(self.engine, mb, images, with_entropy=True)
                with clock("loss"):
                    loss, m = self._grpo_loss(logp, entropy, ref_logp, mb, num_tokens, num_seqs)
                with clock("backward"):
                    self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                with clock("loss"):  # metrics stay on the device until _finish_step
                    self._add_metrics(sums, maxes, loss, m, logp, mb, len(chunk) if real else 0)
            metrics = self._finish_step(sums, maxes, clock, batch.position)
        metrics["logprob_drift"] = metrics.pop("drift_sum", 0.0) / max(num_tokens, 1.0)
        metrics["logprob_drift_current"] = metrics.pop("drift_current_sum", 0.0) / max(metrics["tokens_current"], 1.0)
        metrics.update(tokens=num_tokens, seqs=num_seqs)
        return metrics

    def _grpo_loss(self, logp, entropy, ref_logp, mb: dict, num_tokens: float, num_seqs: float):
        lc = self.cfg.learner
        if lc.entropy_coef == 0:
            entropy = entropy.detach()  # metric only: free its graph now
        old_logp = mb["sampled"] if self.cfg.rollout.off_policy else logp.detach()
        return policy_loss(logp, old_logp, mb["adv"], mb["mask"], clip_low=lc.clip_low, clip_high=lc.clip_high,
                           agg=lc.loss_agg, ref_logp=ref_logp, kl_coef=lc.kl_coef, kl_kind=lc.kl_kind,
                           entropy=entropy, entropy_coef=lc.entropy_coef, clip_ratio_c=lc.clip_ratio_c,
                           num_tokens=num_tokens, num_seqs=num_seqs, max_len=self.cfg.rollout.max_new_tokens)

    def _add_metrics(self, sums: dict, maxes: dict, loss, m: dict, logp, mb: dict, trained: int) -> None:
        sums["loss"] = sums["loss"] + loss.detach()
        sums["trained_seqs"] += trained
        for k, v in m.items():
            if k == "ratio_max":
                maxes[k] = torch.maximum(torch.as_tensor(maxes[k], device=self.device), v.detach())
            else:
                sums[k] = sums[k] + v.detach()
        drift = (logp.detach() - mb["sampled"]).abs() * mb["mask"]
        current = mb["mask"] * mb["current"].unsqueeze(-1)
        sums["drift_sum"] = sums["drift_sum"] + drift.sum()
        sums["drift_current_sum"] = sums["drift_current_sum"] + (drift * current).sum()
        sums["tokens_current"] = sums["tokens_current"] + current.sum()

    def sft_step(self, batch: LearnerBatch) -> dict[str, float]:
        """Supervised warm start: loss = sum over response tokens of -log p / num_tokens (whole batch).

        p = softmax(logits) at temperature 1: the warm start fits the model itself; the rollout
        temperature is how GRPO then samples from it. Same engine and optimizer as GRPO; the learning
        rate is the schedule's at ``batch.position``. Returns loss, grad_norm, lr, tokens and the phase
        seconds (time/learner/*, as train_step).
        """
        with self._update_threads(concurrent_rollout=False):
            num_tokens, _ = self._counts(batch)
            self.engine.train()
            clock, encoded, features = PhaseClock(self.device), {}, {}
            sums: dict = defaultdict(float)
            for chunk, real in self._micro_batches(batch.sequences):
                with clock("collate"):
                    mb = collate(self.processor, chunk, self.pad_id, encoded)
                    mask = mb["response_mask"].to(self.device) * float(real)
                with clock("vision"):
                    images = self.forward.features(self.engine, mb, features)
                with clock("forward"):
                    logp, _ = self.forward.logprobs(self.engine, mb, images, sampled=False)
                with clock("loss"):
                    loss = -(logp * mask).sum() / max(num_tokens, 1.0)
                with clock("backward"):
                    self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                sums["loss"] = sums["loss"] + loss.detach()
            metrics = self._finish_step(sums, {}, clock, batch.position)
        metrics["tokens"] = num_tokens
        return metrics

    @torch.no_grad()
    def logprobs(self, seqs: list[LearnerSequence], sampled: bool = True) -> list[list[float]]:
        """Per-token logprobs of each sequence's response under the current policy (no grad): under the
        distribution vLLM samples from (``sampled``), else the raw model at T = 1 (the parity probe,
        against vLLM's prompt logprobs)."""
        self.engine.eval()
        out, encoded, features = [], {}, {}
        for chunk, real in self._micro_batches(seqs):
            batch = collate(self.processor, chunk, self.pad_id, encoded)
            logp, _ = self.forward.logprobs(self.engine, batch, self.forward.features(self.engine, batch, features),
                                            sampled=sampled)
            if real:
                out += [logp[i, :len(s.response_ids)].tolist() for i, s in enumerate(chunk)]
        return out

    def set_reference(self, policy_dir: str | Path) -> None:
        """Makes the HF policy at policy_dir (``export_hf`` of the warm start) the KL reference. Without
        it GRPO's KL would pull the warm-started policy back towards the random weights it started from.
        No-op when kl_coef == 0."""
        if self.ref is not None:
            self.ref = None  # free the old copy first
            self.ref = reference_model(self.cfg, str(policy_dir), self.dtype, self.device)

    # ------------------------------------------------------------------ weights out

    def export_hf(self, out_dir: str | Path) -> None:
        """An HF directory of the current policy (learner/export.py); rank 0 writes."""
        export_hf(self, self.processor, self.policy_path, self.dtype, out_dir)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, ckpt_dir: str | Path, client_state: dict | None = None) -> None:
        """DeepSpeed checkpoint (weights, optimizer; partitioned per rank) + client_state. The learning
        rate needs no state: it is a function of the step (``learning_rate``)."""
        self.engine.save_checkpoint(str(ckpt_dir), client_state=dict(client_state or {}))

    def load_checkpoint(self, ckpt_dir: str | Path) -> dict:
        """Restores what save_checkpoint wrote (its latest tag) and returns its client_state."""
        path, client_state = self.engine.load_checkpoint(str(ckpt_dir))
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {ckpt_dir}")
        return client_state or {}
