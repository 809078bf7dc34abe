"""Tests of gcpo.py: hand-worked numbers, invariants and randomized properties."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gcpo import (group_advantages, gcpo_loss, has_reward_spread, masked_mean,
                  regulate_advantages, uncertainty_weight)


def hand_group():
    """
    The 4-response group worked by hand in test_hand_worked_group.

    rewards r = [1, 0, 0, 0]: mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5,
    so with eps = 0 the advantages are A = [1.5, -0.5, -0.5, -0.5].
    Uncertainty u = 0.5 with the linear rule and alpha = 1 gives w = 0.5 and
    A_hat = [0.75, -0.25, -0.25, -0.25].
    Per-token log-ratios (logp_old = 0), T = 2, mask as shown (masked logp = 5.0, finite junk):
      response 1: ratios [1.5, 1.0], mask [1, 1]  -> surrogates min(1.125, 0.9) = 0.9 and 0.75
      response 2: ratio  [0.5, -],  mask [1, 0]   -> min(-0.125, 0.8 * -0.25 = -0.2) = -0.2
      response 3: ratios [1.0, 2.0], mask [1, 1]  -> -0.25 and min(-0.5, -0.3) = -0.5
      response 4: mask [0, 0]                     -> nothing
    Per-token losses (-surrogate) over the 5 real tokens: -0.9, -0.75, 0.2, 0.25, 0.5, sum -0.7.
      token_mean          = -0.7 / 5                                      = -0.14
      seq_mean_token_mean = (-0.825 + 0.2 + 0.375 + 0) / 4                = -0.0625
      seq_sum_constant    = (-1.65 + 0.2 + 0.75 + 0) / 4 / max_tokens(2)  = -0.0875
    Clipping: token 1 of response 1 (ratio 1.5 > 1.2, A > 0) clips high, token 1 of response 2
    (ratio 0.5 < 0.8, A < 0) clips low: 1/5 each. Mean ratio (1.5 + 1 + 0.5 + 1 + 2) / 5 = 1.2.
    """
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    logp = torch.tensor([[math.log(1.5), 0.0], [math.log(0.5), 5.0],
                         [0.0, math.log(2.0)], [5.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]])
    return rewards, logp, mask


def test_hand_worked_group():
    rewards, logp, mask = hand_group()
    adv = group_advantages(rewards, eps=0.0)
    assert torch.allclose(adv, torch.tensor([[1.5, -0.5, -0.5, -0.5]]))
    w = uncertainty_weight(torch.tensor([0.5]), rule="linear", alpha=1.0)
    assert torch.allclose(w, torch.tensor([0.5]))
    adv_hat = regulate_advantages(adv, w).flatten()
    assert torch.allclose(adv_hat, torch.tensor([0.75, -0.25, -0.25, -0.25]))

    logp_old = torch.zeros_like(logp)
    loss, m = gcpo_loss(logp, logp_old, adv_hat, mask)
    assert loss.item() == pytest.approx(-0.14, abs=1e-6)
    assert m["clip_frac_low"] == pytest.approx(0.2)
    assert m["clip_frac_high"] == pytest.approx(0.2)
    assert m["ratio_mean"] == pytest.approx(1.2, abs=1e-6)
    assert m["ratio_max"] == pytest.approx(2.0, abs=1e-6)
    assert m["tokens"] == 5

    loss_seq, _ = gcpo_loss(logp, logp_old, adv_hat, mask, agg="seq_mean_token_mean")
    assert loss_seq.item() == pytest.approx(-0.0625, abs=1e-6)
    loss_const, _ = gcpo_loss(logp, logp_old, adv_hat, mask, agg="seq_sum_constant", max_tokens=2)
    assert loss_const.item() == pytest.approx(-0.0875, abs=1e-6)


def test_advantage_default_eps_value():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # 0.75 / (0.5 + 1e-4) and -0.25 / (0.5 + 1e-4)
    assert adv[0].item() == pytest.approx(0.75 / 0.5001, rel=1e-6)
    assert adv[1].item() == pytest.approx(-0.25 / 0.5001, rel=1e-6)


def test_advantage_dr_grpo_only_centres():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), scale="none")
    assert torch.allclose(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25]]))


def test_advantage_equal_rewards_exactly_zero():
    # 0.1 * 3 / 3 != 0.1 in floating point, so a plain (r - mean) / (std + eps) leaks ~1e-13
    adv = group_advantages(torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0]], dtype=torch.float64))
    assert (adv == 0).all()


def test_advantage_rejects_single_response():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.tensor([[1.0]]))


def test_advantage_rejects_nan_reward():
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]))


def test_weight_rules_values():
    u = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(uncertainty_weight(u, "linear", alpha=1.0), torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(uncertainty_weight(u, "linear", alpha=1.0, w_min=0.2), torch.tensor([1.0, 0.5, 0.2]))
    assert torch.allclose(uncertainty_weight(u, "exp", alpha=2.0),
                          torch.tensor([1.0, math.exp(-1.0), math.exp(-2.0)]))
    assert torch.allclose(uncertainty_weight(u, "reciprocal", alpha=1.0), torch.tensor([1.0, 1 / 1.5, 0.5]))


def test_weight_rescaled_to_mean_one_over_groups_with_spread():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    spread = has_reward_spread(rewards)
    assert spread.tolist() == [True, False, True]
    w = uncertainty_weight(torch.tensor([0.2, 0.9, 0.6]), "linear", rescale_over=spread)
    # raw [0.8, 0.1, 0.4]; mean over spread groups (0.8 + 0.4) / 2 = 0.6
    assert torch.allclose(w, torch.tensor([0.8 / 0.6, 0.1 / 0.6, 0.4 / 0.6]))


def test_weight_rescale_keeps_all_zero_weights():
    w = uncertainty_weight(torch.tensor([1.0, 1.0]), "linear", rescale_over=torch.tensor([True, True]))
    assert (w == 0).all()


def test_weight_rejects_unknown_rule():
    with pytest.raises(ValueError, match="unknown weight rule"):
        uncertainty_weight(torch.tensor([0.1]), rule="cosine")


def test_weight_carries_no_gradient():
    u = torch.tensor([0.3, 0.7], requires_grad=True)
    w = uncertainty_weight(u)
    assert not w.requires_grad
    adv = torch.tensor([[1.0, -1.0], [0.5, -0.5]], requires_grad=True)
    regulate_advantages(adv, w).sum().backward()
    assert u.grad is None


def test_regulated_advantages_sum_to_zero():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [0.0, 0.3, 0.9, 0.1, 0.0]])
    adv_hat = regulate_advantages(group_advantages(rewards), torch.tensor([0.3, 1.7]))
    assert torch.allclose(adv_hat.sum(dim=-1), torch.zeros(2), atol=1e-6)


def test_signal_off_equals_grpo_exactly():
    torch.manual_seed(0)
    rewards = torch.randint(0, 2, (3, 4)).float()
    logp = torch.randn(12, 5)
    logp_old = logp + 0.1 * torch.randn(12, 5)
    mask = torch.rand(12, 5) > 0.3
    adv = group_advantages(rewards)
    spread = has_reward_spread(rewards)
    w = uncertainty_weight(torch.zeros(3), "linear", rescale_over=spread)
    loss_gcpo, _ = gcpo_loss(logp, logp_old, regulate_advantages(adv, w).flatten(), mask)
    loss_grpo, _ = gcpo_loss(logp, logp_old, adv.flatten(), mask)
    assert torch.equal(loss_gcpo, loss_grpo)


def test_masked_tokens_get_zero_gradient():
    _, logp, mask = hand_group()
    logp = logp.clone().requires_grad_(True)
    loss, _ = gcpo_loss(logp, torch.zeros_like(logp), torch.tensor([0.75, -0.25, -0.25, -0.25]), mask)
    loss.backward()
    assert (logp.grad[mask == 0] == 0).all()
    assert (logp.grad[mask == 1] != 0).any()


def test_on_policy_ratio_is_one_and_gradient_is_policy_gradient():
    torch.manual_seed(1)
    logp = torch.randn(4, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    adv = torch.tensor([0.75, -0.25, -0.25, -0.25])
    loss, m = gcpo_loss(logp, logp.detach(), adv, mask)
    assert m["ratio_mean"] == 1.0
    loss.backward()
    # plain policy gradient of -mean_t A_i log pi over the 6 real tokens
    expected = -adv.unsqueeze(-1) * mask / mask.sum()
    assert torch.allclose(logp.grad, expected)


def test_kl_term_uses_k3_estimator():
    logp = torch.tensor([[0.0, 0.0]])
    logp_ref = torch.tensor([[math.log(2.0), 0.0]])
    mask = torch.ones(1, 2)
    loss, m = gcpo_loss(logp, logp, torch.zeros(1), mask, logp_ref=logp_ref, beta=0.5)
    # k3 per token: exp(d) - d - 1 with d = log 2 -> 1 - log 2; second token 0; mean (1 - log 2) / 2
    assert m["kl_ref"] == pytest.approx((1 - math.log(2)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * (1 - math.log(2)) / 2, abs=1e-6)


def test_kl_without_reference_is_error():
    with pytest.raises(ValueError, match="logp_ref is required"):
        gcpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), beta=0.1)


def test_seq_sum_constant_needs_max_tokens():
    with pytest.raises(ValueError, match="max_tokens"):
        gcpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), agg="seq_sum_constant")


def test_empty_mask_gives_zero_loss_not_nan():
    loss, m = gcpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    assert loss.item() == 0.0
    assert m["tokens"] == 0
    assert masked_mean(torch.tensor([float("nan")]), torch.tensor([False])).item() == 0.0


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 3), G=st.integers(2, 6), T=st.integers(1, 5),
       equal=st.booleans(), seed=st.integers(0, 10_000), scale=st.sampled_from(["group", "none"]),
       agg=st.sampled_from(["token_mean", "seq_mean_token_mean", "seq_sum_constant"]))
def test_random_groups_stay_finite(B, G, T, equal, seed, scale, agg):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.full((B, G), 0.7) if equal else torch.randint(0, 2, (B, G), generator=g).float()
    adv = group_advantages(rewards, scale=scale)
    assert torch.isfinite(adv).all()
    assert torch.allclose(adv.sum(-1), torch.zeros(B), atol=1e-5)
    w = uncertainty_weight(torch.rand(B, generator=g), rule="exp", alpha=3.0,
                           rescale_over=has_reward_spread(rewards))
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    logp = -20 * torch.rand(B * G, T, generator=g)          # log-probs down to -20
    logp_old = -20 * torch.rand(B * G, T, generator=g)      # ratios up to e^20
    mask = torch.rand(B * G, T, generator=g) > 0.4
    loss, m = gcpo_loss(logp, logp_old, regulate_advantages(adv, w).flatten(), mask, agg=agg,
                        max_tokens=T, logp_ref=logp_old, beta=0.01)
    assert math.isfinite(loss.item())
    assert all(math.isfinite(v) for v in m.values())
    assert 0.0 <= m["clip_frac_low"] <= 1.0
    assert 0.0 <= m["clip_frac_high"] <= 1.0
