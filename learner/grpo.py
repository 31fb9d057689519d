"""GRPO math: group advantages, KL estimators, the clipped policy loss. Pure torch, no model code.

Shapes: ``logp``, ``old_logp``, ``ref_logp``, ``entropy``, ``mask``: [N, T] (one row per sampled
response, T response positions, ``mask`` 1 on real response tokens); ``advantages``: [N].

Global normalisers. The three aggregations are sums over tokens divided by a count. When a batch is
split over R ranks and M micro-batches, pass the count of the WHOLE batch (``num_tokens`` = response
tokens in the batch, ``num_seqs`` = sequences with at least one response token, ``max_len`` = a
constant such as the generation budget) to every call: the partial losses then add up to the loss of
the whole batch, and so do their gradients. Without them the counts of the given tensors are used.
The returned metrics follow the same rule: every metric except ``ratio_max`` is additive over the
pieces of a batch (sum them), ``ratio_max`` is a max.
"""
from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
# Log-ratios are clamped before exp() so that a rare huge difference cannot overflow to inf (whose
# gradient through a clamp is 0 * inf = NaN); exp(20) ~ 5e8 is far past any clip range.
LOG_RATIO_LIMIT = 20.0


def group_advantages(rewards: Tensor, group_size: int, scale: str = "std", eps: float = 1e-6) -> Tensor:
    """Normalise rewards within each group of ``group_size`` contiguous samples.

    scale="std" (GRPO):     A_i = (r_i - mean_g) / (std_g + eps), std_g unbiased (divides by G - 1)
    scale="none" (Dr. GRPO): A_i = r_i - mean_g
    A group whose rewards are all equal gets A = 0 (no signal, no update).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "std":
        centred = centred / (groups.std(dim=1, unbiased=True, keepdim=True) + eps)
    return centred.view(-1)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    k1 = logp - ref_logp
    k2 = 0.5 * (logp - ref_logp)^2
    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1, clamped to [-10, 10]  (unbiased, >= 0)
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        ref_minus_logp = (-log_ratio).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        return (ref_minus_logp.exp() - ref_minus_logp - 1).clamp(-10.0, 10.0)
    raise ValueError(f"kl kind must be k1, k2 or k3, got {kind!r}")


def aggregate(values: Tensor, mask: Tensor, agg: str = "token_mean", *, num_tokens: float | None = None,
              num_seqs: float | None = None, max_len: float | None = None) -> Tensor:
    """Reduce per-token values [N, T] to a scalar; only positions with mask = 1 count.

    token_mean:              sum_{i,t} m*v / num_tokens                  (num_tokens default: sum m)
    seq_mean_token_mean:     sum_i [sum_t m*v / sum_t m] / num_seqs      (original GRPO)
    seq_mean_token_sum_norm: sum_{i,t} m*v / (num_seqs * max_len)        (Dr. GRPO; max_len default T)
    num_seqs defaults to the number of rows with at least one token: fully masked rows (padding,
    empty responses) contribute 0 and are not counted. Counts are floored at 1, so an all-masked
    batch gives 0, never NaN.
    """
    mask = mask.to(values.dtype)
    masked = values * mask
    if agg == "token_mean":
        denom = mask.sum().clamp(min=1) if num_tokens is None else max(float(num_tokens), 1.0)
        return masked.sum() / denom
    seqs = (mask.sum(-1) > 0).sum().clamp(min=1) if num_seqs is None else max(float(num_seqs), 1.0)
    if agg == "seq_mean_token_mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / seqs
    if agg == "seq_mean_token_sum_norm":
        length = values.shape[-1] if max_len is None else max_len
        return masked.sum() / (seqs * max(float(length), 1.0))
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2, agg: str = "token_mean",
                ref_logp: Tensor | None = None, kl_coef: float = 0.0, kl_kind: str = "k3",
                entropy: Tensor | None = None, entropy_coef: float = 0.0, *,
                clip_ratio_c: float | None = None, num_tokens: float | None = None,
                num_seqs: float | None = None, max_len: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO surrogate + KL penalty - entropy bonus, aggregated by ``agg``.

    Per token (A broadcast over the response):
      ratio = exp(logp - old_logp)
      pg    = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
      dual clip (clip_ratio_c = c > 1, only where A < 0): pg = min(pg, -A * c)
      loss_t = pg + kl_coef * kl_penalty(logp, ref_logp, kl_kind) - entropy_coef * entropy
    loss = aggregate(loss_t, mask, agg, num_tokens=..., num_seqs=..., max_len=...)

    Metrics (detached scalars): pg_loss, kl, entropy aggregated like the loss (so
    loss = pg_loss + kl_coef * kl - entropy_coef * entropy); clip_frac (tokens where the clipped
    branch is taken), dual_clip_frac, ratio_mean as token means over ``num_tokens``; ratio_max.
    """
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
    norm = dict(agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    ratio = (logp - old_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT).exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    is_dual_clipped = torch.zeros_like(is_clipped)
    if clip_ratio_c is not None:
        lower_bound = -adv * clip_ratio_c
        is_dual_clipped = (adv < 0) & (pg > lower_bound)
        pg = torch.where(adv < 0, torch.minimum(pg, lower_bound), pg)

    per_token = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_kind)
        per_token = per_token + kl_coef * kl
    ent = torch.zeros_like(logp) if entropy is None else entropy
    if entropy is not None:
        per_token = per_token - entropy_coef * ent
    loss = aggregate(per_token, mask, **norm)

    with torch.no_grad():
        token_mean = dict(agg="token_mean", num_tokens=num_tokens)
        valid = mask > 0
        metrics = {
            "pg_loss": aggregate(pg, mask, **norm),
            "kl": aggregate(kl, mask, **norm),
            "entropy": aggregate(ent, mask, **norm),
            "clip_frac": aggregate(is_clipped.to(logp.dtype), mask, **token_mean),
            "dual_clip_frac": aggregate(is_dual_clipped.to(logp.dtype), mask, **token_mean),
            "ratio_mean": aggregate(ratio, mask, **token_mean),
            "ratio_max": ratio[valid].max() if valid.any() else ratio.new_zeros(()),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
