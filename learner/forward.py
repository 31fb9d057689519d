"""A micro-batch through a model (the policy engine or the KL reference): its images' vision
features once each, then the response tokens' logprobs (learner/batch.py) under the sampled
distribution (policy/sampling.py) or the raw model.
"""
from __future__ import annotations

import deepspeed
import torch

from config import Config
from learner.batch import image_features, image_pixels, model_inputs, shared_prompt_logits
from learner.logprobs import head_logprobs, hidden_out, token_logprobs
from policy.sampling import SamplingRule


def hf_model(module):
    """The HF model inside a DeepSpeed engine, or the model itself."""
    return module.module if isinstance(module, deepspeed.DeepSpeedEngine) else module


class Forward:
    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype, rule: SamplingRule):
        self.zero3, self.shared_prompt = cfg.learner.zero_stage == 3, cfg.learner.shared_prompt
        self.chunk_tokens = cfg.learner.logprob_chunk_tokens
        self.device, self.dtype, self.rule = device, dtype, rule

    def features(self, module, batch: dict, cache: dict) -> tuple | None:
        """Vision features of the micro-batch's distinct images under ``module``'s own tower: the G answers
        of a group share one image, so the tower runs once per image, not once per row. A trained tower
        runs per micro-batch with gradients (the rows' gradients add up on their image). A frozen one
        runs once per learner call under ZeRO-2: ``cache`` (one dict per call) keeps its features for the
        later micro-batches and the other forwards. Under ZeRO-3 a forward of the tower gathers its
        partitioned weights, a collective every rank must join equally often: no cache; and a trained
        tower must run inside the engine's forward (ZeRO-3 follows the module order of its forward and
        of the recomputation in backward to gather and release weights), so there None: the pixel
        values go into the model (``logprobs``)."""
        hf = hf_model(module)
        frozen = not any(p.requires_grad for p in hf.model.visual.parameters())
        if self.zero3 and not frozen:
            return None
        if not frozen:
            return image_features(hf, batch, self.device, self.dtype)
        if self.zero3:
            with torch.no_grad():
                return image_features(hf, batch, self.device, self.dtype)
        keys = [(id(hf), k) for k in batch["image_keys"]]
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            sub = {"pixel_values": torch.cat([image_pixels(batch, i) for i in missing]),
                   "unique_grid_thw": batch["unique_grid_thw"][missing]}
            with torch.no_grad():
                cache.update(zip((keys[i] for i in missing), image_features(hf, sub, self.device, self.dtype)))
        return tuple(cache[k] for k in keys)

    def logprobs(self, module, batch: dict, features: tuple | None, with_entropy: bool = False,
                 sampled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token logprobs [B, R] (and entropies) of the micro-batch's responses: under the distribution
        vLLM samples from (``sampled``), else under the raw model at T = 1 (the warm start; the parity
        probe, against vLLM's prompt logprobs). ``features``: ``features(module, ...)``; None: the tower
        runs inside this forward, on each distinct image (shared prompt) or on each row's. With
        learner.logprob_chunk_tokens the model hands out its final hidden states and the logprobs are
        computed from them chunk by chunk (learner/logprobs.py)."""
        hf = hf_model(module)
        targets, rule = batch["response_ids"].to(self.device), self.rule if sampled else None
        if not self.chunk_tokens:
            return token_logprobs(self._outputs(module, hf, batch, features), targets, rule, with_entropy)
        with hidden_out(hf) as head:
            hidden = self._outputs(module, hf, batch, features)
        return head_logprobs(hidden, head, targets, rule, with_entropy, self.chunk_tokens)

    def _outputs(self, module, hf, batch: dict, features: tuple | None) -> torch.Tensor:
        """The model's outputs at the last R + 1 positions: logits, or hidden states inside ``hidden_out``."""
        # transformers' checkpointed layers drop a cache passed to them while training
        checkpointed = hf.training and getattr(hf, "is_gradient_checkpointing", False)
        if self.shared_prompt and not checkpointed:
            return shared_prompt_logits(module, hf, batch, features, self.device, self.dtype)
        return module(**model_inputs(hf, batch, self.device, self.dtype, features)).logits
