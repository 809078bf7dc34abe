"""
GCPO's update: group-relative advantages, uncertainty weights that regulate them
per prompt, and the clipped policy-gradient loss.

Pure functions (tensors and numbers in, tensors out), each short enough to copy
into another trainer. Formula labels follow the method description: (1.x) the
group-relative advantage, (3.x) the prompt weight, (4.x) the clipped loss. The
per-prompt uncertainty u comes from uncertainty.py.

    adv = group_advantages(rewards)                       # (B, G)
    w = uncertainty_weight(u, rule="linear", alpha=1.0)   # (B,), no gradient
    adv_hat = regulate_advantages(adv, w)                 # (B, G), each row still sums to 0
    loss, metrics = gcpo_loss(logp, logp_old, adv_hat.flatten(), mask)

Shape legend: B prompts, G responses per prompt, N = B*G responses, T response tokens.

Departures from the GCPO paper (Zhang et al., 2026, known here only from its
abstract) and simplifications. Each choice is an argument:
1. The advantage divides by the sample standard deviation (ddof = 1) plus eps, as
   the original GRPO code does; scale="none" drops the division (Dr. GRPO).
2. The weight rules (linear, exponential, reciprocal) and the optional rescaling to
   mean 1 over groups with reward spread are this project's formulation.
3. The weight multiplies the advantage of every response of the prompt, so each
   group's regulated advantages still sum to zero.
4. The KL penalty to a reference model uses the k3 estimator and is off by default.
"""
import torch


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is true; 0 (not NaN) where the mask is empty."""
    mask = mask.bool()
    x = torch.where(mask, x, torch.zeros_like(x))  # a NaN at a masked position must not leak
    count = mask.sum() if dim is None else mask.sum(dim)
    total = x.sum() if dim is None else x.sum(dim)
    return total / count.clamp_min(1)


# ----------------------------------------------------------------------------
# (1) Group-relative advantages

def group_advantages(rewards, scale="group", eps=1e-4):
    """
    Advantages from rewards: (G,) or (B, G) -> same shape. scale "group" divides by
    the sample std (ddof = 1) plus eps; "none" only centres (Dr. GRPO). A group whose
    rewards are all equal gets exactly 0.
    """
    if rewards.shape[-1] < 2:
        raise ValueError(f"group-relative advantages need G >= 2 responses per prompt, got G = {rewards.shape[-1]}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; fix the reward function before computing advantages")
    if scale not in ("group", "none"):
        raise ValueError(f"unknown advantage scale {scale!r}; use 'group' or 'none'")
    centred = rewards - rewards.mean(dim=-1, keepdim=True)                # (B, G)
    if scale == "group":
        # (1.1) A_i = (r_i - mean r) / (std r + eps), sample std with ddof = 1
        adv = centred / (rewards.std(dim=-1, keepdim=True) + eps)         # (B, G)
    else:
        # (1.2) A_i = r_i - mean r  (Dr. GRPO)
        adv = centred                                                     # (B, G)
    # rounding in the mean can leave ~1e-17 in a group of equal rewards; such a group has no signal
    no_spread = (rewards.amax(dim=-1, keepdim=True) == rewards.amin(dim=-1, keepdim=True))  # (B, 1)
    return torch.where(no_spread, torch.zeros_like(adv), adv)             # (B, G)


def has_reward_spread(rewards):
    """True for each group whose rewards are not all equal: (..., G) -> (...) bool."""
    return rewards.amax(dim=-1) != rewards.amin(dim=-1)


# ----------------------------------------------------------------------------
# (3) Uncertainty weights

def uncertainty_weight(u, rule="linear", alpha=1.0, w_min=0.0, rescale_over=None):
    """
    Per-prompt weight from per-prompt uncertainty u in [0, 1]: (B,) -> (B,), detached.

    rule "linear": max(w_min, 1 - alpha u); "exp": exp(-alpha u); "reciprocal": 1 / (1 + alpha u).
    w_min floors every rule. rescale_over is an optional (B,) bool mask, usually
    has_reward_spread(rewards). The weights are then divided by their mean over those
    groups, so the weighting moves the update between prompts instead of shrinking it.
    """
    u = u.detach()  # the weight is a fixed coefficient of the update, never a path for gradients
    if not torch.isfinite(u).all():
        raise ValueError("uncertainty contains NaN or inf; every signal in uncertainty.py returns finite values, "
                         "so check the inputs given to it")
    # (3.3) weight rules
    if rule == "linear":
        w = 1.0 - alpha * u                                               # (B,)
    elif rule == "exp":
        w = torch.exp(-alpha * u)                                         # (B,)
    elif rule == "reciprocal":
        if (alpha * u <= -1).any():
            raise ValueError("reciprocal weight 1 / (1 + alpha u) needs alpha * u > -1")
        w = 1.0 / (1.0 + alpha * u)                                       # (B,)
    else:
        raise ValueError(f"unknown weight rule {rule!r}; use 'linear', 'exp' or 'reciprocal'")
    w = w.clamp_min(w_min)                                                # (B,)
    if rescale_over is not None:
        # (3.4) w <- w / mean_{q with reward spread} w ; left as is when no group has spread
        # or all their weights are 0 (then there is no update to redistribute)
        active = rescale_over.bool()
        mean_active = w[active].mean() if active.any() else w.new_tensor(0.0)
        if mean_active > 0:
            w = w / mean_active                                           # (B,)
    return w


def regulate_advantages(adv, w):
    """(3.5) Regulated advantage A_hat_i = w(q) * A_i: (B, G), (B,) -> (B, G)."""
    return w.detach().unsqueeze(-1) * adv


# ----------------------------------------------------------------------------
# (4) Clipped GCPO loss

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_sum_constant")


def gcpo_loss(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.2, agg="token_mean",
              logp_ref=None, beta=0.0, max_tokens=None):
    """
    Clipped surrogate loss with optional k3 KL to a reference policy.

    logp, logp_old, mask: (N, T); adv: (N,) per response or (N, T) per token;
    logp_ref: (N, T) or None. agg: "token_mean" (mean over all real tokens of the
    batch), "seq_mean_token_mean" (mean over responses of each response's token mean,
    original GRPO), or "seq_sum_constant" (each response's token sum divided by the
    constant max_tokens, then the mean over responses: Dr. GRPO).
    Returns (loss, metrics) with metrics a dict of detached Python floats.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {agg!r}; use one of {AGGREGATIONS}")
    if agg == "seq_sum_constant" and not max_tokens:
        raise ValueError("agg='seq_sum_constant' needs max_tokens, the constant each response's sum is divided by "
                         "(usually max_new_tokens)")
    if beta > 0 and logp_ref is None:
        raise ValueError("beta > 0 adds a KL penalty to the reference policy, so logp_ref is required; "
                         "pass the reference log-probs or set beta = 0")
    mask = mask.bool()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)                                           # (N, 1)

    # (4.1) ratio = pi_theta / pi_old per token
    log_ratio = logp - logp_old                                           # (N, T)
    ratio = torch.exp(log_ratio)                                          # (N, T)
    # (4.2) surrogate = min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A)
    surr = torch.minimum(ratio * adv,
                         ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)  # (N, T)
    per_token = -surr                                                     # (N, T)
    kl_ref = None
    if logp_ref is not None:
        # (4.3) k3 estimator of KL(pi_theta || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0
        d = logp_ref - logp                                               # (N, T)
        kl_ref = torch.exp(d) - d - 1.0                                   # (N, T)
        if beta > 0:
            per_token = per_token + beta * kl_ref                         # (N, T)

    # (4.4) aggregation over tokens and responses
    if agg == "token_mean":
        loss = masked_mean(per_token, mask)
    elif agg == "seq_mean_token_mean":
        loss = masked_mean(per_token, mask, dim=-1).mean()
    else:
        loss = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1).mean() / max_tokens

    with torch.no_grad():
        adv_t = adv.expand_as(ratio)
        # clipping is active only on the side where it removes gradient
        clip_low = (ratio < 1.0 - eps_low) & (adv_t < 0)
        clip_high = (ratio > 1.0 + eps_high) & (adv_t > 0)
        real = mask.any()
        metrics = {
            "loss": loss.item(),
            "clip_frac_low": masked_mean(clip_low.float(), mask).item(),
            "clip_frac_high": masked_mean(clip_high.float(), mask).item(),
            # k3 estimate of KL(pi_old || pi_theta), the usual "approx_kl" of PPO logs
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "ratio_max": ratio[mask].max().item() if real else 1.0,
            "ratio_min": ratio[mask].min().item() if real else 1.0,
            "tokens": int(mask.sum().item()),
        }
        if kl_ref is not None:
            metrics["kl_ref"] = masked_mean(kl_ref, mask).item()
    return loss, metrics
