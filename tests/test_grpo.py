"""learner.grpo against direct, loop-by-loop computations (plain Python floats) on random tensors."""
import math

import pytest
import torch

from learner.grpo import aggregate, group_advantages, kl_penalty, policy_loss


def _rand_batch(n=6, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.5
    ent = torch.rand(n, t, generator=g, dtype=torch.float64) * 2
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[1] = 0  # a fully masked row (an empty response)
    mask = (torch.arange(t)[None] < lengths[:, None]).double()
    return logp, old, ref, ent, adv, mask


# ---------------------------------------------------------------- advantages

def test_group_advantages_std_matches_loop():
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0, 5.0, 5.0, 1.0, 0.0, 0.5])
    got = group_advantages(rewards, group_size=3)
    for start in range(0, 9, 3):
        group = rewards[start:start + 3].tolist()
        mean = sum(group) / 3
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 2)  # unbiased
        for i, r in enumerate(group):
            assert got[start + i].item() == pytest.approx((r - mean) / (std + 1e-6), rel=1e-5)


def test_group_advantages_none_is_centred_reward():
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0])
    assert torch.allclose(group_advantages(rewards, 2, scale="none"), torch.tensor([0.5, -0.5, 0.5, -0.5]))


def test_all_equal_rewards_give_zero_advantage():
    rewards = torch.tensor([2.5] * 4 + [0.0] * 4)
    for scale in ("std", "none"):
        adv = group_advantages(rewards, 4, scale=scale)
        assert torch.equal(adv, torch.zeros(8))


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 2, scale="max")


# ---------------------------------------------------------------- KL

def test_kl_estimators_match_formulas():
    logp, _, ref, *_ = _rand_batch()
    for kind in ("k1", "k2", "k3"):
        got = kl_penalty(logp, ref, kind)
        for (a, b), g in zip(zip(logp.flatten().tolist(), ref.flatten().tolist()), got.flatten().tolist()):
            want = {"k1": a - b, "k2": 0.5 * (a - b) ** 2, "k3": math.exp(b - a) - (b - a) - 1}[kind]
            assert g == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_k3_is_clamped_and_finite_with_finite_gradient():
    logp = torch.tensor([0.0, -50.0, -200.0], requires_grad=True)
    ref = torch.tensor([0.0, 0.0, 0.0])
    kl = kl_penalty(logp, ref, "k3")
    assert kl[0].item() == 0.0 and kl[1].item() == 10.0 and kl[2].item() == 10.0
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_kl_unknown_kind_raises():
    with pytest.raises(ValueError):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")


# ---------------------------------------------------------------- aggregation

def _loop_aggregate(values, mask, agg, max_len=None):
    rows = [[v for v, m in zip(vr, mr) if m] for vr, mr in zip(values.tolist(), mask.tolist())]
    nonempty = [r for r in rows if r]
    if agg == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if agg == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in nonempty) / len(nonempty)
    return sum(sum(r) for r in rows) / (len(nonempty) * (max_len or values.shape[1]))


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregate_matches_loop(agg):
    logp, *_, mask = _rand_batch()
    assert aggregate(logp, mask, agg).item() == pytest.approx(_loop_aggregate(logp, mask, agg), rel=1e-12)
    assert aggregate(logp, mask, agg, max_len=100).item() == pytest.approx(
        _loop_aggregate(logp, mask, agg, max_len=100), rel=1e-12)


def test_aggregate_all_masked_is_zero_not_nan():
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        assert aggregate(torch.ones(2, 3), torch.zeros(2, 3), agg).item() == 0.0


# ---------------------------------------------------------------- policy loss

def _loop_policy_loss(logp, old, adv, mask, clip_low, clip_high, agg, ref=None, kl_coef=0.0, ent=None,
                      ent_coef=0.0, c=None):
    per_token = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        a = adv[i].item()
        for t in range(logp.shape[1]):
            r = math.exp(logp[i, t].item() - old[i, t].item())
            pg = max(-a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high))
            if c is not None and a < 0:
                pg = min(pg, -a * c)
            if ref is not None:
                x = ref[i, t].item() - logp[i, t].item()
                pg += kl_coef * (math.exp(x) - x - 1)
            if ent is not None:
                pg -= ent_coef * ent[i, t].item()
            per_token[i, t] = pg
    return _loop_aggregate(per_token, mask, agg)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_policy_loss_matches_loop(agg, dual):
    logp, old, ref, ent, adv, mask = _rand_batch(seed=1)
    logp = logp.clone().requires_grad_(True)
    loss, m = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg=agg, ref_logp=ref,
                          kl_coef=0.05, kl_kind="k3", entropy=ent, entropy_coef=0.01, clip_ratio_c=dual)
    want = _loop_policy_loss(logp.detach(), old, adv, mask, 0.2, 0.28, agg, ref, 0.05, ent, 0.01, dual)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert loss.item() == pytest.approx((m["pg_loss"] + 0.05 * m["kl"] - 0.01 * m["entropy"]).item(), rel=1e-10)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[mask == 0] == 0).all()  # padding gets no gradient


def test_clip_boundaries_and_clip_frac():
    # One sequence, A = +1, ratios straddling 1 + clip_high = 1.2 and 1 - clip_low = 0.8.
    ratios = torch.tensor([[0.5, 0.9, 1.0, 1.1, 1.19, 1.21, 2.0]], dtype=torch.float64)
    old = torch.zeros_like(ratios)
    logp = ratios.log().requires_grad_(True)
    mask = torch.ones_like(ratios)
    loss, m = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    # A > 0: clipped above 1.2 (no gradient there); below 0.8 the unclipped branch stays (gradient flows).
    assert m["clip_frac"].item() == pytest.approx(2 / 7)
    grad_nonzero = (logp.grad != 0).flatten().tolist()
    assert grad_nonzero == [True, True, True, True, True, False, False]
    assert loss.item() == pytest.approx(-(0.5 + 0.9 + 1.0 + 1.1 + 1.19 + 1.2 + 1.2) / 7, rel=1e-9)
    assert m["ratio_max"].item() == pytest.approx(2.0)
    assert m["ratio_mean"].item() == pytest.approx(ratios.mean().item())

    # A < 0: clipped below 0.8; above 1 + clip_high the unclipped (larger) loss stays.
    logp2 = ratios.log().requires_grad_(True)
    loss, m = policy_loss(logp2, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    assert m["clip_frac"].item() == pytest.approx(1 / 7)
    assert (logp2.grad != 0).flatten().tolist() == [False, True, True, True, True, True, True]


def test_separate_clip_high():
    ratios = torch.tensor([[1.25, 1.3]], dtype=torch.float64)
    loss, m = policy_loss(ratios.log(), torch.zeros_like(ratios), torch.tensor([1.0]), torch.ones_like(ratios),
                          clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-(1.25 + 1.28) / 2)
    assert m["clip_frac"].item() == pytest.approx(0.5)


def test_dual_clip_bounds_negative_advantage_loss():
    ratios = torch.tensor([[1.5, 5.0, 10.0]], dtype=torch.float64)
    logp = ratios.log().requires_grad_(True)
    loss, m = policy_loss(logp, torch.zeros_like(ratios), torch.tensor([-2.0]), torch.ones_like(ratios),
                          clip_ratio_c=3.0)
    # -A * ratio = 3, 10, 20 -> capped at -A * c = 6 for the last two.
    assert loss.item() == pytest.approx((3.0 + 6.0 + 6.0) / 3)
    assert m["dual_clip_frac"].item() == pytest.approx(2 / 3)
    loss.backward()
    assert (logp.grad != 0).flatten().tolist() == [True, False, False]
    # Positive advantages are untouched by the dual clip.
    loss_pos, _ = policy_loss(ratios.log(), torch.zeros_like(ratios), torch.tensor([2.0]), torch.ones_like(ratios),
                              clip_ratio_c=3.0)
    assert loss_pos.item() == pytest.approx(-2.0 * 1.2)
    with pytest.raises(ValueError):
        policy_loss(ratios.log(), torch.zeros_like(ratios), torch.tensor([1.0]), torch.ones_like(ratios),
                    clip_ratio_c=1.0)


def test_zero_advantage_without_kl_gives_zero_loss_and_gradient():
    logp, old, *_, mask = _rand_batch()
    logp = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, old, torch.zeros(logp.shape[0], dtype=logp.dtype), mask)
    loss.backward()
    assert loss.item() == 0.0 and (logp.grad == 0).all()


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_split_over_micro_batches_equals_whole_batch(agg):
    """R ranks x M micro-batches with global normalisers == one call on the whole batch (value and grad)."""
    logp, old, ref, ent, adv, mask = _rand_batch(n=8, t=9, seed=3)
    kwargs = dict(agg=agg, kl_coef=0.1, entropy_coef=0.01, clip_high=0.3)
    whole_logp = logp.clone().requires_grad_(True)
    whole, whole_m = policy_loss(whole_logp, old, adv, mask, ref_logp=ref, entropy=ent, max_len=9, **kwargs)
    whole.backward()

    num_tokens, num_seqs = mask.sum().item(), (mask.sum(-1) > 0).sum().item()
    split_logp = logp.clone().requires_grad_(True)
    total, metric_sums = 0.0, {}
    for rows in ([0, 1, 2], [3], [4, 5], [6, 7]):  # uneven pieces, one holding the empty row
        # Each piece is trimmed to its own max length, as a padded micro-batch would be.
        t = max(int(mask[rows].sum(-1).max().item()), 1)
        sl = (rows, slice(0, t))
        loss, m = policy_loss(split_logp[sl], old[sl], adv[rows], mask[sl], ref_logp=ref[sl], entropy=ent[sl],
                              num_tokens=num_tokens, num_seqs=num_seqs, max_len=9, **kwargs)
        loss.backward()
        total += loss.item()
        for k, v in m.items():
            metric_sums[k] = (max(metric_sums.get(k, 0.0), v.item()) if k == "ratio_max"
                              else metric_sums.get(k, 0.0) + v.item())
    assert total == pytest.approx(whole.item(), rel=1e-12)
    assert torch.allclose(split_logp.grad, whole_logp.grad, rtol=1e-12, atol=1e-15)
    for k, v in whole_m.items():
        assert metric_sums[k] == pytest.approx(v.item(), rel=1e-12), k
