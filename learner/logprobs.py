"""Token logprobs (and entropies) of the responses from the model's last R + 1 positions.

    z = rule.apply(logits) (fp32): the sampled distribution's processed logits z / T (policy/sampling.py);
        rule None: the raw model, T = 1 (warm start, parity probe)
    logp_t = z[t, y_t] - lse_t,   lse_t = logsumexp(z[t])
    H_t = lse_t - sum_v p_v z_v,  p = softmax(z[t])

Two ways to the same numbers. ``token_logprobs`` takes the logits [B, R + 1, V] and lets autograd keep
what it needs: with a real vocabulary (V = 151,936) those fp32 copies are the largest thing a learner
step holds. ``head_logprobs`` takes the final hidden states [B, R + 1, H] instead (``hidden_out``: the
model's LM head passes them through) and calls the LM head once more, with its forward replaced by
``HeadLogprobs``: logits, processing, logsumexp and gather per chunk of positions, in place, keeping only
[B, R] numbers; backward recomputes each chunk's logits and applies the closed-form gradient

    dlogp_t / dz_v = [v = y_t] - p_v,     dH_t / dz_v = -p_v (z_v - lse_t + H_t),     dz / dlogits = 1 / T

so at most one chunk's logits (two [tokens, V] fp32 buffers) exist at any time, and each V-sized
element is touched a few times instead of autograd's dozens. The LM head's gradient is summed over the
chunks in an fp32 [V, H] buffer. Going through the LM head module means
ZeRO-3 gathers its weight for the call, forward and backward, as for any layer.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from policy.sampling import SamplingRule, entropy_of


def token_logprobs(logits: Tensor, targets: Tensor, rule: SamplingRule | None = None,
                   with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """logits [B, R + 1, V] (the last R + 1 positions), targets [B, R] -> logp [B, R] (, entropy [B, R])."""
    z = logits[:, :-1].float() if rule is None else rule.apply(logits[:, :-1])
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    return logp, (entropy_of(z, lse) if with_entropy else None)


FLOOR = -1e30  # stands for -inf: exp(FLOOR - lse) is 0 in fp32, and FLOOR x any gradient stays finite


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, rule: SamplingRule | None,
                  first: int) -> Tensor:
    """Processed fp32 logits z [B, c, V] of hidden [B, c, H] at response positions first .., with -inf
    (suppressed stop tokens) raised to FLOOR: p is 0 there either way, and 0 x z stays 0 in the entropy
    and its gradient (0 x -inf would be nan)."""
    z = torch.nn.functional.linear(hidden, weight, bias).float()
    if rule is not None:
        rule.apply_(z, first)
    return z.clamp_(min=FLOOR)


class HeadLogprobs(torch.autograd.Function):
    """(logp, H) [B, R, 2] of hidden [B, R, H] through an LM head (weight [V, H], bias [V] or None)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rule, chunk_tokens, with_entropy):
        B, R = targets.shape
        step = max(1, chunk_tokens // B)
        out = torch.zeros(B, R, 2, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(B, R, dtype=torch.float32, device=hidden.device)
        for j in range(0, R, step):
            z = _chunk_logits(hidden[:, j:j + step], weight, bias, rule, j)
            lse[:, j:j + step] = torch.logsumexp(z, dim=-1)
            out[:, j:j + step, 0] = z.gather(-1, targets[:, j:j + step, None]).squeeze(-1) - lse[:, j:j + step]
            if with_entropy:
                z_dot_p = z.mul_((z - lse[:, j:j + step, None]).exp_()).sum(-1)  # sum_v z_v p_v
                out[:, j:j + step, 1] = lse[:, j:j + step] - z_dot_p
        ctx.save_for_backward(hidden, weight, bias, targets, lse, out)
        ctx.rule, ctx.step = rule, step
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse, out = ctx.saved_tensors
        rule, step = ctx.rule, ctx.step
        scale = 1.0 / rule.temperature if rule is not None else 1.0
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        for j in range(0, targets.shape[1], step):
            h = hidden[:, j:j + step]
            z = _chunk_logits(h, weight, bias, rule, j)
            g_logp, g_entropy = grad[:, j:j + step, 0, None].float(), grad[:, j:j + step, 1, None].float()
            centred = z.sub_(lse[:, j:j + step, None])  # z - lse = log p
            p = centred.exp()
            # dz = -p (g_logp + g_H (z - lse + H)) + g_logp [v = y]
            dz = centred.add_(out[:, j:j + step, 1, None]).mul_(g_entropy).add_(g_logp).mul_(p).neg_()
            dz.scatter_add_(-1, targets[:, j:j + step, None], g_logp).mul_(scale)  # d logits, fp32
            grad_hidden[:, j:j + step] = dz.to(weight.dtype) @ weight
            grad_weight.addmm_(dz.reshape(-1, dz.shape[-1]).T, h.reshape(-1, h.shape[-1]).float())
            if grad_bias is not None:
                grad_bias += dz.sum(dim=(0, 1))
        return (grad_hidden, grad_weight.to(weight.dtype), None if bias is None else grad_bias.to(bias.dtype),
                None, None, None, None)


def head_logprobs(hidden: Tensor, head: nn.Module, targets: Tensor, rule: SamplingRule | None = None,
                  with_entropy: bool = False, chunk_tokens: int = 1024) -> tuple[Tensor, Tensor | None]:
    """``token_logprobs(head(hidden), ...)`` for hidden [B, R + 1, H], without [B, R, V] logits: chunks of
    all B rows x about chunk_tokens / B positions, through one call of the ``head`` module."""
    bias = getattr(head, "bias", None)  # Qwen's LM heads have none
    head.forward = lambda h: HeadLogprobs.apply(h, head.weight, bias, targets, rule, chunk_tokens, with_entropy)
    try:
        out = head(hidden[:, :targets.shape[1]])  # the last position predicts nothing
    finally:
        del head.forward
    return out[..., 0], (out[..., 1] if with_entropy else None)


@contextmanager
def hidden_out(model: nn.Module):
    """Within: ``model``'s LM head returns its input, so the model's ``.logits`` are its final hidden
    states (at the same positions) and no vocabulary-sized tensor is made. Yields the head."""
    head = model.get_output_embeddings()
    head.forward = lambda hidden: hidden  # an instance attribute: shadows the class's forward, hooks still run
    try:
        yield head
    finally:
        del head.forward
