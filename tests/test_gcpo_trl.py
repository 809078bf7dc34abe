"""Tests of the TRL integration: the pure weight function, and one real GRPOTrainer step on a tiny model."""
import math

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from gcpo import group_advantages, has_reward_spread, regulate_advantages, uncertainty_weight  # noqa: E402
from gcpo_trl import (  # noqa: E402
    GCPOConfig,
    GCPOTrainer,
    completion_text,
    group_weights_for_trl,
)
from models import tiny_encoder, tiny_policy  # noqa: E402
from uncertainty import (  # noqa: E402
    calibrate,
    calibrated_uncertainty,
    cluster_kernel,
    embedding_kernel,
    geometric_uncertainty,
    reward_explained_share,
    semantic_uncertainty,
)

G = 4


def char_histogram(texts):
    """Deterministic stand-in encoder: counts of characters by code point mod 16, plus 1 so no row is zero."""
    rows = []
    for text in texts:
        counts = [1.0] * 16
        for ch in text:
            counts[ord(ch) % 16] += 1.0
        rows.append(counts)
    return torch.tensor(rows)                                             # (n, 16)


def random_batch(B=3, D=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (B * G,), generator=generator).float()  # (N,)
    emb = torch.randn(B * G, D, generator=generator)                      # (N, D)
    return rewards, emb


# ----------------------------------------------------------------------------
# Pure functions

def test_group_weights_match_uncertainty_functions():
    _, emb = random_batch(B=5)
    rewards = torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1])  # group 0 has no spread
    config = GCPOConfig(signal="geometric", calibration="reward", tau=0.3, weight_rule="exp", alpha=2.0, rescale=True)
    weights, metrics = group_weights_for_trl(rewards, G, config, emb=emb)

    r = rewards.view(-1, G)
    u = calibrated_uncertainty(embedding_kernel(emb.view(-1, G, 5), tau=0.3), r)
    w = uncertainty_weight(u, rule="exp", alpha=2.0, rescale_over=has_reward_spread(r))
    torch.testing.assert_close(weights, w.repeat_interleave(G))
    assert metrics["zero_spread_frac"] == pytest.approx(0.2)
    assert metrics["weight_mean"] == pytest.approx(w.mean().item())
    assert metrics["uncertainty_mean"] == pytest.approx(u.mean().item())
    assert "kappa_mean" in metrics


def test_group_weights_uncalibrated_semantic_is_seed_grpo():
    rewards, _ = random_batch(B=2)
    cluster_ids = torch.tensor([0, 0, 1, 1, 0, 1, 2, 3])
    config = GCPOConfig(signal="semantic", calibration="none", alpha=1.0, rescale=False)
    weights, metrics = group_weights_for_trl(rewards, G, config, cluster_ids=cluster_ids)

    u = semantic_uncertainty(cluster_ids.view(-1, G))                     # log 2 / log 4 and 1
    torch.testing.assert_close(weights, (1.0 - u).repeat_interleave(G))
    assert "kappa_mean" not in metrics
    assert metrics["semantic_uncertainty_mean"] == pytest.approx(0.75)


def test_group_weights_slice_per_process_like_trl():
    # 3 groups of 4 over 2 processes with 6 completions each: the middle group straddles them
    rewards, emb = random_batch(B=3)
    config = GCPOConfig(signal="geometric", rescale=True)
    full, full_metrics = group_weights_for_trl(rewards, G, config, emb=emb)
    parts = [group_weights_for_trl(rewards, G, config, emb=emb, process_index=rank, local_size=6)
             for rank in (0, 1)]

    torch.testing.assert_close(torch.cat([parts[0][0], parts[1][0]]), full)
    assert parts[0][0][4] == parts[1][0][0]  # both halves of the straddling group get one weight
    assert parts[0][1] == full_metrics == parts[1][1]


def test_group_weights_reject_slice_outside_batch():
    rewards, emb = random_batch(B=2)
    with pytest.raises(ValueError, match="outside"):
        group_weights_for_trl(rewards, G, GCPOConfig(), emb=emb, process_index=2, local_size=4)


def test_group_weights_unscorable_counts_as_group_mean():
    rewards, emb = random_batch(B=2)
    rewards[:G] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    with_nan = rewards.clone()
    with_nan[3] = math.nan
    filled = rewards.clone()
    filled[3] = 1.0 / 3.0
    weights_nan, _ = group_weights_for_trl(with_nan, G, GCPOConfig(rescale=True), emb=emb)
    weights_filled, _ = group_weights_for_trl(filled, G, GCPOConfig(rescale=True), emb=emb)
    torch.testing.assert_close(weights_nan, weights_filled)


def test_group_weights_reject_partial_group():
    rewards, emb = random_batch(B=2)
    with pytest.raises(ValueError, match="num_generations"):
        group_weights_for_trl(rewards[:7], G, GCPOConfig(), emb=emb[:7])


@pytest.mark.parametrize("field, value", [("signal", "entropy"), ("calibration", "kl"), ("weight_rule", "step"),
                                          ("tau", 0.0), ("alpha", -1.0), ("w_min", 1.5)])
def test_config_rejects_invalid_value(field, value):
    with pytest.raises(ValueError, match=field):
        GCPOConfig(**{field: value})


def test_completion_text_of_string_and_chat():
    assert completion_text("x = 4") == "x = 4"
    assert completion_text([{"role": "assistant", "content": "x = 4"}]) == "x = 4"


def test_sentence_transformer_encoder_embeds_texts():
    from gcpo_trl import embed_texts

    emb = embed_texts(tiny_encoder(seed=0), ["2 + 2 = 4", "five"])
    assert emb.shape == (2, 32)
    assert geometric_uncertainty(embedding_kernel(emb.unsqueeze(0))).item() > 0


# ----------------------------------------------------------------------------
# One real GRPOTrainer step

QUESTIONS = ["What is 2 + 3?", "What is 7 * 6?", "Say the same thing."]


def lowercase_share(prompts, completions, **kwargs):
    """Reward the share of lowercase letters, and a constant 0.5 on the last question, so its group has no spread."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        text = completion_text(completion)
        if prompt[-1]["content"] == QUESTIONS[-1]:
            rewards.append(0.5)
        else:
            rewards.append(sum(ch.islower() for ch in text) / max(len(text), 1))
    return rewards


class RecordingTrainer(GCPOTrainer):
    """GCPOTrainer that keeps the texts, rewards and advantages of every scored batch, and what the loss saw."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.texts, self.rewards, self.advantages, self.loss_advantages = [], [], [], []

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.texts += [completion_text(c) for c in completions]
        self.rewards.append(rewards_per_func[:, 0].clone())
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.advantages.append(output["advantages"].clone())
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.loss_advantages.append(inputs["advantages"].detach().clone())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def train_one_step(tmp_path, gcpo, **trainer_kwargs):
    model, tokenizer = tiny_policy(seed=0)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS])
    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=len(QUESTIONS) * G,
        num_generations=G, max_completion_length=8, learning_rate=1e-3, logging_steps=1,
        report_to="none", save_strategy="no", bf16=False, use_cpu=True, gradient_checkpointing=False,
        seed=0, disable_tqdm=True,
    )
    trainer = RecordingTrainer(model=model, reward_funcs=lowercase_share, args=args, train_dataset=dataset,
                               processing_class=tokenizer, gcpo=gcpo, **trainer_kwargs)
    trainer.train()
    return trainer


def test_trainer_step_uses_regulated_advantages(tmp_path):
    gcpo = GCPOConfig(signal="geometric", calibration="reward", tau=0.5, weight_rule="linear", alpha=1.0, rescale=True)
    trainer = train_one_step(tmp_path, gcpo, encoder=char_histogram)

    rewards = trainer.rewards[0].view(-1, G)                              # (B, G)
    emb = char_histogram(trainer.texts).view(-1, G, 16)                   # (B, G, D)
    u = calibrated_uncertainty(embedding_kernel(emb, tau=0.5), rewards)
    w = uncertainty_weight(u, rule="linear", alpha=1.0, rescale_over=has_reward_spread(rewards))
    expected = regulate_advantages(group_advantages(rewards), w).flatten()
    assert has_reward_spread(rewards).tolist().count(False) == 1
    assert not torch.allclose(w, torch.ones_like(w))  # the weighting does change something
    torch.testing.assert_close(trainer.advantages[0], expected, rtol=1e-5, atol=1e-6)
    # the loss receives the same values, shuffled into micro-batches
    used = torch.cat(trainer.loss_advantages)
    torch.testing.assert_close(used.sort().values, expected.sort().values, rtol=1e-5, atol=1e-6)

    logged = trainer.state.log_history[0]
    for name in ("weight_mean", "weight_std", "uncertainty_mean", "kappa_mean", "zero_spread_frac"):
        assert f"gcpo/{name}" in logged
    assert logged["gcpo/zero_spread_frac"] == pytest.approx(1 / 3)


def first_char_parity(texts):
    """Stand-in meaning clusters: the parity of each text's first character (0 for an empty text)."""
    return [ord(text[0]) % 2 if text else 0 for text in texts]


def test_trainer_step_semantic_with_cluster_fn(tmp_path):
    gcpo = GCPOConfig(signal="semantic", calibration="reward", weight_rule="exp", alpha=2.0, rescale=False)
    trainer = train_one_step(tmp_path, gcpo, cluster_fn=first_char_parity)

    rewards = trainer.rewards[0].view(-1, G)                              # (B, G)
    cluster_ids = torch.tensor(first_char_parity(trainer.texts)).view(-1, G)  # (B, G)
    u = calibrate(semantic_uncertainty(cluster_ids), reward_explained_share(cluster_kernel(cluster_ids), rewards))
    w = uncertainty_weight(u, rule="exp", alpha=2.0)
    expected = regulate_advantages(group_advantages(rewards), w).flatten()
    torch.testing.assert_close(trainer.advantages[0], expected, rtol=1e-5, atol=1e-6)
    assert "gcpo/semantic_uncertainty_mean" in trainer.state.log_history[0]


def test_trainer_step_signal_none_is_plain_grpo(tmp_path):
    trainer = train_one_step(tmp_path, GCPOConfig(signal="none"))

    rewards = trainer.rewards[0].view(-1, G)                              # (B, G)
    torch.testing.assert_close(trainer.advantages[0], group_advantages(rewards).flatten(), rtol=1e-5, atol=1e-6)
    assert not any(name.startswith("gcpo/") for name in trainer.state.log_history[0])


def test_trainer_semantic_needs_cluster_fn():
    with pytest.raises(ValueError, match="cluster_fn"):
        GCPOTrainer(model=None, gcpo=GCPOConfig(signal="semantic"))


def test_trainer_rejects_encoder_load_under_zero3(monkeypatch):
    import transformers.integrations
    from types import SimpleNamespace

    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    trainer = SimpleNamespace(gcpo=GCPOConfig(), accelerator=SimpleNamespace(device="cpu"))
    with pytest.raises(ValueError, match="ZeRO-3"):
        GCPOTrainer._load_encoder(trainer)
