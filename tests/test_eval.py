"""Tests of eval.py: pass@k and maj@k by hand, gradient quantities, the subcommands on tiny models, bad input."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

import diagnostic
import eval as evaluation
import models
import tasks

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--max-new-tokens", "8"]


def fake_grade(text, reference):
    """Deterministic reward that varies inside a group, so a tiny random model still has mixed-reward groups."""
    return float(len(text) % 2), True


def load_strict_json(path):
    """Parse JSON and fail on NaN or Infinity, which json.loads would otherwise accept."""
    def reject(constant):
        raise AssertionError(f"{path} contains {constant}")
    return json.loads(Path(path).read_text(), parse_constant=reject)


# ----------------------------------------------------------------------------
# pass@k and maj@k

@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 2, 1 - 3 / 10),    # 1 - C(3,2)/C(5,2) = 0.7
    (4, 0, 4, 0.0),           # n = k, no correct sample
    (4, 1, 4, 1.0),           # n = k, one correct sample is always drawn
    (10, 0, 3, 0.0),          # c = 0
    (10, 3, 1, 0.3),          # k = 1 is the share of correct samples
    (8, 8, 8, 1.0),
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomial_form():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert evaluation.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_finite():
    value = evaluation.pass_at_k(2000, 3, 1000)  # C(2000, 1000) overflows a float
    assert 0.0 < value < 1.0


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        evaluation.pass_at_k(4, 1, 5)


def majority(texts, reference):
    return evaluation.majority_correct(texts, [tasks.grade(t, reference) for t in texts])


def test_majority_counts_equivalent_answers_as_one():
    texts = ["The answer is \\boxed{1/2}.", "So \\boxed{0.5}", "\\boxed{3}"]
    assert majority(texts, "0.5") == 1.0   # 1/2 and 0.5 form one cluster with two votes
    assert majority(texts, "3") == 0.0


def test_majority_ignores_unparsable_answers():
    texts = ["I am not sure.", "no idea at all", "\\boxed{3}"]  # three clusters of one; only one can vote
    assert majority(texts, "3") == 1.0
    assert majority(["nothing", "still nothing"], "3") == 0.0


def test_majority_tie_goes_to_first_cluster():
    texts = ["\\boxed{4}", "\\boxed{3}", "\\boxed{3}", "\\boxed{4}"]
    assert majority(texts, "4") == 1.0
    assert majority(texts, "3") == 0.0


# ----------------------------------------------------------------------------
# gradient quantities and Spearman

def test_score_dispersion_hand_values():
    same = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert diagnostic.score_dispersion(same) == pytest.approx(0.0)
    assert diagnostic.score_dispersion(orthogonal) == pytest.approx(1.0)
    assert diagnostic.score_dispersion(opposite) == pytest.approx(2.0)


def test_gradient_noise_hand_value():
    s = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    # v = [[2, 0], [0, 0]], g = [1, 0], |v_i - g|^2 = 1 and 1, so noise = 1 / |g|^2 = 1
    assert diagnostic.relative_gradient_noise(s, torch.tensor([1.0, 1.0])) == pytest.approx(1.0)
    # v = [[2, 0], [0, 0]] scaled by 3: the ratio does not depend on the advantage scale
    assert diagnostic.relative_gradient_noise(s, torch.tensor([3.0, 3.0])) == pytest.approx(1.0)


def test_gradient_noise_undefined_when_mean_is_zero():
    s = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    assert diagnostic.relative_gradient_noise(s, torch.tensor([1.0, -1.0])) is None


def test_score_directions_match_batched_forward(tiny_lm):
    import rollout

    model, tokenizer = tiny_lm
    prompts = rollout.render_prompts(tokenizer, [[{"role": "user", "content": "What is 2 + 3?"}]])
    torch.manual_seed(0)
    ro = rollout.generate_groups(model, tokenizer, prompts, 3, 8)
    batched_logp, batched_entropy = ro.logp.clone(), ro.entropy.clone()
    names, params = diagnostic.select_params(model, diagnostic.DEFAULT_PARAMS)
    ro.logp.zero_()
    ro.entropy.zero_()
    s = diagnostic.score_directions(model, params, ro, range(3), 1.0)
    assert torch.allclose(ro.logp, batched_logp, atol=1e-5)
    assert torch.allclose(ro.entropy, batched_entropy, atol=1e-5)
    # s_1 against the gradient of response 1's summed log-prob taken from the batched, padded forward
    logp, _ = rollout.completion_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids,
                                          ro.completion_mask, 1.0)
    (grad,) = torch.autograd.grad(logp[1].sum(), params)
    assert torch.allclose(s[1].float(), grad.flatten(), atol=1e-5)
    assert names == ["model.layers.1.mlp.down_proj.weight"]


def test_spearman_with_ties_matches_scipy():
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0])
    y = np.array([2.0, 1.0, 4.0, 4.0, 6.0, 3.0])
    assert float(diagnostic.spearman(x, y)) == pytest.approx(scipy.stats.spearmanr(x, y).statistic)


def test_spearman_of_constant_signal_is_null_with_note():
    out = diagnostic.spearman_with_interval([0.5, 0.5, 0.5, 0.5], [1.0, 2.0, 3.0, 4.0])
    assert out["rho"] is None
    assert out["ci95"] is None
    assert "constant" in out["note"]


def test_spearman_interval_contains_rho():
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    out = diagnostic.spearman_with_interval(x, x + rng.normal(size=30))
    assert out["ci95"][0] <= out["rho"] <= out["ci95"][1]
    assert out["groups"] == 30


# ----------------------------------------------------------------------------
# subcommands on tiny models

def test_accuracy_on_run_checkpoint_writes_json_and_table(tmp_path):
    model, tokenizer = models.tiny_policy(seed=0)
    model.save_pretrained(tmp_path / "run" / "checkpoint")
    tokenizer.save_pretrained(tmp_path / "run" / "checkpoint")
    result = evaluation.main(["accuracy", "--run", str(tmp_path / "run"), "--n", "3", "--k", "2",
                              "--n-samples", "3", "--max-new-tokens", "8", "--out", str(tmp_path / "acc")])
    assert set(result["metrics"]) == {"greedy", "mean@2", "maj@2", "pass@2"}
    saved = load_strict_json(tmp_path / "acc" / "accuracy.json")
    for metric in saved["metrics"].values():
        assert metric["items"] == 3
        assert metric["ci95"][0] <= metric["value"] <= metric["ci95"][1]
    assert "| pass@2 |" in (tmp_path / "acc" / "accuracy.md").read_text()


def test_diagnose_tiny_writes_finite_results(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation.tasks, "grade", fake_grade)
    out = tmp_path / "diag"
    summary = evaluation.main(["diagnose", *TINY, "--encoder", "tiny", "--out", str(out),
                               "--prompts", "6", "--group-size", "4"])
    for name in ("diagnostic.json", "diagnostic.md", "diagnostic.png"):
        assert (out / name).stat().st_size > 0
    saved = load_strict_json(out / "diagnostic.json")
    assert len(saved["groups"]) == 6
    assert summary["params_size"] == 64 * 128  # tiny Llama: hidden 64 x intermediate 128
    assert summary["params"] == ["model.layers.1.mlp.down_proj.weight"]
    for quantity, table in saved["summary"]["spearman"].items():
        for signal, c in table.items():
            if c["rho"] is None:
                assert c["note"], (quantity, signal)
            else:
                assert -1.0 <= c["rho"] <= 1.0
    mixed = [g for g in saved["groups"] if g["reward_spread"]]
    assert mixed, "the fake reward should give some groups mixed rewards"
    assert all(g["gradient_noise"] >= 0 for g in mixed)
    assert all(g["gradient_noise"] is None for g in saved["groups"] if not g["reward_spread"])
    assert 0.0 <= saved["summary"]["zero_spread_share"] <= 1.0


def test_diagnose_unknown_params_is_clear_error(tmp_path):
    with pytest.raises(evaluation.UsageError, match="no parameter name contains 'nonexistent'; pass --params"):
        evaluation.main(["diagnose", *TINY, "--encoder", "tiny", "--out", str(tmp_path), "--prompts", "1",
                         "--params", "nonexistent"])


# ----------------------------------------------------------------------------
# bad input

def test_run_without_checkpoint_is_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(evaluation.UsageError, match=r"no checkpoint found at .*run/checkpoint.*--save-every"):
        evaluation.main(["accuracy", "--run", str(tmp_path / "run"), "--n", "2", "--k", "2"])


def test_k_larger_than_samples_is_clear_error():
    with pytest.raises(evaluation.UsageError, match="--k 8 is larger than the 4 samples"):
        evaluation.main(["accuracy", *TINY, "--k", "8", "--n-samples", "4"])


def test_empty_data_file_is_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(evaluation.UsageError, match="is empty"):
        evaluation.main(["accuracy", *TINY, "--data", str(tmp_path / "empty.jsonl")])


def test_command_line_error_has_no_traceback(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    done = subprocess.run([sys.executable, "eval.py", "accuracy", "--model", "tiny", "--data",
                           str(tmp_path / "empty.jsonl")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "eval.py: error: data file" in done.stderr
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------
# compare

COMPARE = ["compare", "--algos", "grpo,sem_cal", "--seeds", "0", *TINY, "--encoder", "tiny",
           "--prompts-per-step", "2", "--group-size", "2", "--micro-batch", "4", "--eval-items", "3"]


def test_compare_smoke_then_skip_and_resume(tmp_path, monkeypatch):
    import train

    out = str(tmp_path / "sweep")
    table = evaluation.main([*COMPARE, "--out", out, "--steps", "1"])
    assert set(table) == {"grpo", "sem_cal"}
    for name in ("compare.md", "compare.json", "compare.png", "heldout.jsonl"):
        assert (tmp_path / "sweep" / name).stat().st_size > 0
    saved = load_strict_json(tmp_path / "sweep" / "compare.json")
    assert set(saved["runs"]) == {"grpo-seed0", "sem_cal-seed0"}

    # a rerun with the same steps trains nothing
    calls = []
    real_train = train.train
    monkeypatch.setattr(train, "train", lambda cfg: calls.append(cfg) or real_train(cfg))
    evaluation.main([*COMPARE, "--out", out, "--steps", "1"])
    assert calls == []

    # more steps continue each finished run from its checkpoint
    evaluation.main([*COMPARE, "--out", out, "--steps", "2"])
    assert [cfg.resume for cfg in calls] == [True, True]
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "grpo-seed0" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2]
    assert any(r["step"] == 2 and "eval_greedy_acc" in r for r in rows)


def test_compare_rejects_flags_it_sets(tmp_path):
    with pytest.raises(evaluation.UsageError, match="compare sets"):
        evaluation.main([*COMPARE, "--out", str(tmp_path), "--calibration", "none"])
