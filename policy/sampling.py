"""The distribution GRPO samples from, stated once for both sides: vLLM samples with it
(``SamplingRule.vllm_kwargs``), the learner scores tokens under it (``SamplingRule.apply``).

vLLM's sampling logprobs (``logprobs_mode="processed_logprobs"``) are those of the distribution the
token was drawn from, after its logits processors: the logit bias, min_tokens and the temperature
(vllm/v1/sample/sampler.py). The PPO ratio, the KL term and ``logprob_drift`` compare the learner's
logprobs with those, so the learner applies the same processing to its logits:

    z = logits + bias                 bias = -100 on the vision placeholder tokens (vLLM's clamp):
                                      a random policy can write them, and the learner's forward
                                      would read them as image slots
    z[t, stop] = -inf  for t < m      m = rollout.min_new_tokens: end-of-answer tokens are suppressed
                                      until m tokens were generated (vLLM's min_tokens; stop ids =
                                      the tokenizer's eos and generation_config's eos_token_id)
    logp_t = log_softmax(z_t / T)     T = rollout.temperature

Nucleus (top-p) and top-k truncation are not offered: they would need the same per-token sort of the
whole vocabulary in the learner (config.py refuses ``rollout.top_p``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
BANNED_BIAS = -100.0  # vLLM clamps logit_bias to [-100, 100]


@dataclass(frozen=True)
class SamplingRule:
    temperature: float
    banned_ids: tuple[int, ...]
    stop_ids: tuple[int, ...]
    min_new_tokens: int

    @classmethod
    def of(cls, tokenizer, policy_path: str, temperature: float, min_new_tokens: int) -> "SamplingRule":
        vocab = tokenizer.get_vocab()
        stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        generation = Path(policy_path, "generation_config.json")
        if generation.exists():
            eos = json.loads(generation.read_text()).get("eos_token_id")
            stops |= set([eos] if isinstance(eos, int) else eos or [])
        return cls(temperature, tuple(sorted(vocab[t] for t in VISION_TOKENS if t in vocab)), tuple(sorted(stops)),
                   min_new_tokens)

    def vllm_kwargs(self, max_tokens: int) -> dict:
        """SamplingParams arguments that sample from this distribution (explicit stop ids, so that
        min_tokens suppresses exactly ``stop_ids``)."""
        return {"temperature": self.temperature, "min_tokens": min(self.min_new_tokens, max_tokens),
                "logit_bias": {i: BANNED_BIAS for i in self.banned_ids}, "stop_token_ids": list(self.stop_ids)}

    def apply(self, logits, first_position: int = 0):
        """Processed logits z / T (fp32, a new tensor) for logits [B, R, V] predicting response tokens
        ``first_position`` .. ``first_position + R - 1`` (module docstring); log_softmax gives vLLM's."""
        import torch

        z = logits.float()
        if self.banned_ids:
            bias = torch.zeros(z.shape[-1], dtype=z.dtype, device=z.device)
            bias[list(self.banned_ids)] = BANNED_BIAS
            z = z + bias
        suppressed = max(0, min(self.min_new_tokens - first_position, z.shape[-2]))
        if suppressed and self.stop_ids:
            mask = torch.zeros(z.shape[-2:], dtype=torch.bool, device=z.device)
            mask[:suppressed, list(self.stop_ids)] = True
            z = z.masked_fill(mask, float("-inf"))
        return z / self.temperature if self.temperature != 1.0 else z

    def apply_(self, z, first_position: int = 0):
        """``apply`` in place, on fp32 logits z [B, R, V] outside autograd (learner/logprobs.py)."""
        if self.banned_ids:
            z[..., list(self.banned_ids)] += BANNED_BIAS
        suppressed = max(0, min(self.min_new_tokens - first_position, z.shape[-2]))
        if suppressed and self.stop_ids:
            z[:, :suppressed, list(self.stop_ids)] = float("-inf")
        return z.div_(self.temperature) if self.temperature != 1.0 else z


def entropy_of(z, lse):
    """H = lse - sum_v softmax(z)_v z_v, with -inf logits (stop tokens before min_new_tokens) contributing 0,
    in value and in gradient: they are zeroed before the product (masking the product afterwards would
    still send 0 * -inf = nan into backward, and through learner.entropy_coef into every weight)."""
    import torch

    p = torch.exp(z - lse.unsqueeze(-1))
    return lse - (p * torch.where(torch.isinf(z), torch.zeros_like(z), z)).sum(-1)
