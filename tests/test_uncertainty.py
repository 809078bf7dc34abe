"""Tests of uncertainty.py: the facts of the method, hand-worked values and random properties."""
import contextlib
import io
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from uncertainty import (calibrate, calibrated_uncertainty, center_embeddings, cluster_by_similarity,
                         cluster_kernel, embedding_kernel, geometric_uncertainty, kernel_dispersion,
                         mean_token_entropy, predictive_entropy, predictive_uncertainty,
                         reward_explained_share, semantic_entropy, semantic_uncertainty, token_entropy,
                         token_uncertainty, von_neumann_entropy)

LOG2, LOG4 = math.log(2), math.log(4)


def binary_entropy(p):
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def two_clusters(cos_between):
    """Four unit embeddings: two copies of a, two copies of b, with cos(a, b) = cos_between."""
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([cos_between, math.sqrt(max(0.0, 1 - cos_between ** 2))], dtype=torch.float64)
    return torch.stack([a, a, b, b])


# ---------------------------------------------------------------- token and predictive entropy

def test_token_entropy_uniform_is_log_v():
    assert token_entropy(torch.zeros(3, 8)).tolist() == pytest.approx([math.log(8)] * 3, abs=1e-6)


def test_token_entropy_hand_value_with_temperature():
    # logits [log 3, 0] at temperature 1 -> p = [0.75, 0.25]; at temperature 2 -> p ~ [sqrt3, 1] / (sqrt3 + 1)
    logits = torch.tensor([math.log(3.0), 0.0])
    assert token_entropy(logits).item() == pytest.approx(binary_entropy(0.75), abs=1e-6)
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    assert token_entropy(logits, temperature=2.0).item() == pytest.approx(binary_entropy(p), abs=1e-6)


def test_token_entropy_bf16_computed_in_float32():
    h = token_entropy(torch.tensor([[math.log(3.0), 0.0]], dtype=torch.bfloat16))
    assert h.dtype == torch.float32
    assert h.item() == pytest.approx(binary_entropy(0.75), abs=1e-2)  # bf16 rounds log 3 itself


def test_token_entropy_extreme_logits_finite():
    logits = torch.tensor([[1e4, -1e4, float("-inf")], [0.0, float("-inf"), float("-inf")]])
    h = token_entropy(logits)
    assert torch.isfinite(h).all()
    assert h.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_token_entropy_rejects_zero_temperature():
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(torch.zeros(2), temperature=0.0)


def test_mean_token_entropy_masks_and_empty_is_zero():
    ent = torch.tensor([[1.0, 2.0, 9.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert mean_token_entropy(ent, mask).tolist() == [1.5, 0.0]


def test_predictive_entropy_is_length_normalised_nll():
    logp = torch.tensor([[-1.0, -3.0, -100.0]])
    assert predictive_entropy(logp, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)


# ---------------------------------------------------------------- semantic entropy

def test_semantic_entropy_discrete_hand_value():
    # clusters of sizes 2, 1, 1: -(0.5 log 0.5 + 2 * 0.25 log 0.25) = 1.5 log 2
    assert semantic_entropy(torch.tensor([7, 7, 3, 5])).item() == pytest.approx(1.5 * LOG2, abs=1e-6)
    assert semantic_entropy(torch.tensor([1, 1, 1, 1])).item() == pytest.approx(0.0, abs=1e-7)


def test_semantic_entropy_likelihood_weighted_hand_value():
    # sequence probabilities 0.4, 0.2, 0.2, 0.2 (unnormalised scale cancels); clusters {0,1} and {2,3}
    seq_logp = torch.log(torch.tensor([0.4, 0.2, 0.2, 0.2])) - 50.0
    h = semantic_entropy(torch.tensor([0, 0, 1, 1]), seq_logp=seq_logp)
    assert h.item() == pytest.approx(binary_entropy(0.6), abs=1e-6)


def test_semantic_entropy_batched_matches_loop():
    ids = torch.tensor([[0, 0, 1, 2], [4, 4, 4, 4], [1, 2, 3, 4]])
    seq = torch.randn(3, 4)
    batched = semantic_entropy(ids, seq)
    for b in range(3):
        assert batched[b].item() == pytest.approx(semantic_entropy(ids[b], seq[b]).item(), abs=1e-6)


def test_semantic_entropy_zero_probability_cluster_finite():
    seq_logp = torch.tensor([0.0, float("-inf"), -1.0, -1.0])
    h = semantic_entropy(torch.tensor([0, 1, 2, 2]), seq_logp)
    assert math.isfinite(h.item())


def test_cluster_by_similarity_groups_paraphrases():
    emb = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    assert cluster_by_similarity(emb, threshold=0.9).tolist() == [0, 0, 2, 3]


# ---------------------------------------------------------------- geometric entropy: the facts

def test_identical_responses_give_zero_geometric_entropy():
    emb = torch.tensor([[0.3, -1.2, 2.0]]).repeat(5, 1)
    K = embedding_kernel(emb)
    assert von_neumann_entropy(K).item() == pytest.approx(0.0, abs=1e-5)
    assert kernel_dispersion(K).item() == pytest.approx(0.0, abs=1e-6)


def test_identity_kernel_gives_log_g():
    for G in (2, 3, 8):
        assert von_neumann_entropy(torch.eye(G)).item() == pytest.approx(math.log(G), abs=1e-6)


def test_single_response_entropy_is_zero():
    assert von_neumann_entropy(torch.ones(1, 1)).item() == 0.0
    assert geometric_uncertainty(torch.ones(1, 1)).item() == 0.0


def test_cluster_kernel_reproduces_semantic_entropy():
    for ids in ([0, 0, 1, 1], [0, 1, 2, 3], [5, 5, 5, 2, 9, 2], [3, 3, 3]):
        ids = torch.tensor(ids)
        assert von_neumann_entropy(cluster_kernel(ids)).item() == pytest.approx(
            semantic_entropy(ids).item(), abs=1e-6)


def test_kernel_hand_value_and_unit_diagonal():
    K = embedding_kernel(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), tau=0.5)
    # cos = 0 -> exp((0 - 1) / 0.5) = e^-2; embeddings need not be unit-norm
    assert K[0, 1].item() == pytest.approx(math.exp(-2.0), abs=1e-7)
    assert K.diagonal().tolist() == pytest.approx([1.0, 1.0])


def test_two_cluster_entropy_closed_form():
    # K = [[J, aJ], [aJ, J]] has eigenvalues 2(1 + a), 2(1 - a), 0, 0, so H = h((1 + a) / 2)
    for cos_between in (0.9, 0.0, -1.0):
        a = math.exp((cos_between - 1) / 0.5)
        K = embedding_kernel(two_clusters(cos_between), tau=0.5)
        assert von_neumann_entropy(K).item() == pytest.approx(binary_entropy((1 + a) / 2), abs=1e-9)


def test_zero_embedding_is_clear_error():
    with pytest.raises(ValueError, match="all zeros"):
        embedding_kernel(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_cosine_kernel_warns():
    with pytest.warns(UserWarning, match="sign"):
        K = embedding_kernel(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), kind="cosine")
    assert K[0, 1].item() == pytest.approx(-1.0)


def test_centering_removes_shared_direction():
    emb = torch.tensor([[1.0, 0.1], [1.0, -0.1]])
    centred = center_embeddings(emb, torch.tensor([1.0, 0.0]))
    assert torch.allclose(centred, torch.tensor([[0.0, 0.1], [0.0, -0.1]]))
    assert embedding_kernel(centred)[0, 1].item() == pytest.approx(math.exp(-4.0), abs=1e-7)


# ---------------------------------------------------------------- calibration

def test_kappa_one_when_rewards_split_by_cluster():
    K = embedding_kernel(two_clusters(0.0), tau=0.5)
    assert reward_explained_share(K, torch.tensor([1.0, 1.0, 0.0, 0.0])).item() == pytest.approx(1.0, abs=1e-9)


def test_kappa_zero_when_rewards_split_inside_clusters():
    K = embedding_kernel(two_clusters(0.0), tau=0.5)
    assert reward_explained_share(K, torch.tensor([1.0, 0.0, 1.0, 0.0])).item() == pytest.approx(0.0, abs=1e-9)


def test_kappa_zero_without_variation():
    K = embedding_kernel(two_clusters(0.0))
    assert reward_explained_share(K, torch.ones(4)).item() == 0.0
    same = embedding_kernel(torch.ones(4, 3))
    assert reward_explained_share(same, torch.tensor([1.0, 0.0, 0.0, 1.0])).item() == 0.0


def test_kappa_equals_between_reward_share_for_binary_rewards():
    # kappa = B / T with B = p (1 - p) MMD^2(correct, incorrect), MMD^2 from the kernel means
    torch.manual_seed(3)
    K = embedding_kernel(torch.randn(6, 5, dtype=torch.float64), tau=0.7)
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    c, w = r.bool(), ~r.bool()
    mmd2 = K[c][:, c].mean() + K[w][:, w].mean() - 2 * K[c][:, w].mean()
    p = r.mean()
    expected = p * (1 - p) * mmd2 / kernel_dispersion(K)
    assert reward_explained_share(K, r).item() == pytest.approx(expected.item(), abs=1e-9)


def test_calibrated_uncertainty_hand_values():
    K = embedding_kernel(two_clusters(0.0), tau=0.5)
    h = geometric_uncertainty(K).item()
    assert calibrated_uncertainty(K, torch.tensor([1.0, 1.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-9)
    assert calibrated_uncertainty(K, torch.tensor([1.0, 0.0, 1.0, 0.0])).item() == pytest.approx(h, abs=1e-9)
    assert calibrate(torch.tensor(0.8), torch.tensor(0.25)).item() == pytest.approx(0.6)


def test_normalised_baselines_hand_values():
    ent = torch.full((1, 2, 3), math.log(16) / 2)
    assert token_uncertainty(ent, torch.ones(1, 2, 3), vocab_size=16).item() == pytest.approx(0.5)
    logp = torch.full((1, 2, 3), -math.log(2))
    assert predictive_uncertainty(logp, torch.ones(1, 2, 3)).item() == pytest.approx(0.5)
    assert semantic_uncertainty(torch.tensor([[0, 0, 1, 1]])).item() == pytest.approx(0.5)


# ---------------------------------------------------------------- the README's worked example

def test_readme_worked_example_runs_and_prints_claimed_values():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- worked-example:start -->\s*```python\n(.*?)```", readme, re.S).group(1)
    claimed = re.search(r"# (semantic .*)\n", block).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(block, {})
    assert out.getvalue().strip() == claimed
    h_far = binary_entropy((1 + math.exp(-4)) / 2) / LOG4
    assert f"geometric far {h_far:.3f}" in claimed


# ---------------------------------------------------------------- random properties

@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 3), G=st.integers(2, 8), D=st.integers(1, 6), seed=st.integers(0, 10_000),
       tau=st.floats(0.02, 5.0), dup=st.booleans(), equal=st.booleans(), f64=st.booleans())
def test_random_groups_signals_in_range(B, G, D, seed, tau, dup, equal, f64):
    dtype = torch.float64 if f64 else torch.float32
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, G, D, generator=g, dtype=dtype) + 1e-3
    if dup:
        emb[:, 1:] = emb[:, :1]  # a group of identical responses
    rewards = torch.ones(B, G) if equal else torch.randint(0, 2, (B, G), generator=g).float()
    K = embedding_kernel(emb, tau=tau)
    kappa = reward_explained_share(K, rewards.to(dtype))
    u = calibrated_uncertainty(K, rewards.to(dtype))
    h = geometric_uncertainty(K)
    for x in (K, kappa, u, h):
        assert torch.isfinite(x).all()
    assert ((kappa >= 0) & (kappa <= 1)).all()
    assert ((h >= 0) & (h <= 1)).all()
    assert ((u >= 0) & (u <= h + 1e-6)).all()
    ids = torch.randint(0, G, (B, G), generator=g)
    se = semantic_uncertainty(ids, torch.randn(B, G, generator=g) * 100)
    assert torch.isfinite(se).all()
    assert ((se >= 0) & (se <= 1)).all()


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-3, 1e5), seed=st.integers(0, 1000), temp=st.floats(0.05, 4.0))
def test_random_logits_entropy_in_range(scale, seed, temp):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(seed)) * scale
    h = token_entropy(logits, temperature=temp)
    assert torch.isfinite(h).all()
    assert ((h >= -1e-6) & (h <= math.log(50) + 1e-5)).all()
