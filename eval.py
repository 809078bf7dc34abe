"""
Evaluate a policy and measure the method's central claim: does an uncertainty
signal track how noisy the group's policy-gradient estimate is?

    python eval.py accuracy --run runs/x --k 8                 # greedy, mean@k, maj@k, pass@k with 95% intervals
    python eval.py accuracy --model tiny --n 20 --k 4          # any model id or folder, or a random tiny model
    python eval.py diagnose --out results/diagnostic --prompts 64 --group-size 8
    python eval.py compare --out runs/sweep --steps 20 --seeds 0,1,2 --prompts-per-step 4

`accuracy` samples n >= k responses per held-out item. `diagnose` samples one group
per training prompt, computes every signal of uncertainty.py and two measured
gradient quantities, and correlates them (Spearman). `compare` trains each algorithm
for each seed through train.train and tabulates held-out accuracy. Sampling flags
default to train.py's Config, so the measurements describe the distribution the policy
trains on. train.py imports greedy_accuracy from here.

Gradient quantities of one group (diagnose), over a named parameter subset theta_S:
    (5.1) score direction  s_i = d/d theta_S sum_t log pi(o_i,t | q, o_i,<t), at the sampling temperature
    (5.2) score dispersion D = 1 - mean_{i<j} cos(s_i, s_j), in [0, 2], defined for every group
          (a zero s_i has cosine 0 to every s_j)
    (5.3) relative gradient noise, only for groups whose rewards are not all equal:
          noise = (1/G) sum_i |v_i - g|^2 / |g|^2, with v_i = A_i s_i and g = mean_i v_i
          g is the group's GRPO gradient estimate (sum_i A_i = 0), and A comes from
          gcpo.group_advantages. The ratio does not depend on the scale of A. Its
          standard-error form, noise / G, ranks the groups alike because G is fixed.
The default subset is the last decoder layer's MLP down-projection weight (SmolLM2-135M:
576 x 1536 = 884,736 numbers), the last matrix before the final norm and the output head.
The output head is the tied input embedding (28M numbers in SmolLM2), too large to keep
one gradient per response on a CPU. --params NAME takes every parameter whose name contains NAME.

Shape legend: B prompts, G responses per prompt, N = B*G, T response tokens, D embedding
size, S parameters in the subset.

Departures and simplifications:
1. s_i sums over the response's tokens (the textbook score function). The training loss
   averages over tokens instead, which reweights responses by length, so the diagnostic
   measures the estimator, not the exact loss.
2. Gradients cover a parameter subset only, to fit a CPU. A subset's gradient noise
   need not rank groups like the full gradient's would.
3. mean@k averages all n sampled responses, because each estimates the same per-sample
   accuracy. maj@k votes over the first k, and pass@k uses all n (unbiased estimator).
4. maj@k grades the winning cluster by the reward of its first member. Clusters come
   from tasks.cluster_by_answer, and a tie goes to the cluster that appears first.
5. compare evaluates every arithmetic run on one held-out file, written once, so every
   algorithm and seed sees identical items (train.py would draw them per seed).
"""
import argparse
import gc
import json
import math
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from tqdm import tqdm

import gcpo
import rollout
import tasks
import uncertainty as unc
from models import DEFAULT_ENCODER, DEFAULT_POLICY, load_encoder, load_policy, pick_device, tiny_encoder, tiny_policy

N_BOOTSTRAP = 1000  # resamples behind every 95% interval


class UsageError(ValueError):
    """Invalid input from the command line, which the entry point prints without a traceback."""


def greedy_scores(model, tokenizer, items, task, max_new_tokens, batch_size=64):
    """Grade each item's greedy completion: a list of 0.0 / 1.0, one per item."""
    scores = []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        prompts = rollout.render_prompts(tokenizer, [tasks.build_messages(it, task) for it in chunk])
        with torch.no_grad():
            ro = rollout.generate_groups(model, tokenizer, prompts, 1, max_new_tokens, temperature=0.0, score=False)
        scores += [tasks.grade(text, it.answer)[0] for text, it in zip(ro.texts, chunk)]
    return scores


def greedy_accuracy(model, tokenizer, items, task, max_new_tokens, batch_size=64):
    """Share of items whose greedy completion is graded correct."""
    return sum(greedy_scores(model, tokenizer, items, task, max_new_tokens, batch_size)) / max(len(items), 1)


def load_model(model_name, run_dir=None, seed=0):
    """Load a policy in eval mode from a model id or folder, 'tiny', or a train.py run folder's checkpoint."""
    if run_dir:
        checkpoint = Path(run_dir) / "checkpoint"
        if not (checkpoint / "config.json").is_file():
            raise UsageError(f"no checkpoint found at {checkpoint}: train.py writes OUT/checkpoint every "
                             "--save-every steps and after the last step, so pass a run that reached one")
        model_name = str(checkpoint)
    if model_name == "tiny":
        model, tokenizer = tiny_policy(seed=seed, device=pick_device())
    else:
        model, tokenizer = load_policy(model_name)
    return model.eval(), tokenizer


def load_task_items(task, data, split, n, seed):
    """tasks.load_items with its input errors turned into UsageError, so the CLI prints them plainly."""
    try:
        return tasks.load_items(task, data or None, split, n=n, seed=seed)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise UsageError(str(error)) from error


def write_json(path, obj):
    """Write JSON with allow_nan=False, so a NaN raises here instead of reaching a reader."""
    Path(path).write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")


def fmt(x, digits=3):
    if x is None:
        return "n/a"
    return f"{round(x, digits) + 0.0:.{digits}f}"  # + 0.0 prints a rounded -0.0 as 0.0


# ----------------------------------------------------------------------------
# accuracy: greedy, mean@k, maj@k, pass@k

def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k = {k}, n = {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c = {c}, n = {n}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): no huge binomials, no overflow
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_correct(texts, graded):
    """Return the maj@k score of one item: the reward of the answer most responses agree on.

    Unparsable answers cast no vote, so they never win.
    """
    cluster_ids = tasks.cluster_by_answer(texts)  # equivalent answers share an id, numbered by first appearance
    votes = Counter(cid for cid, (_, parsed) in zip(cluster_ids, graded) if parsed)
    if not votes:
        return 0.0
    winner = min(votes, key=lambda cid: (-votes[cid], cid))  # most votes, then earliest cluster
    return graded[cluster_ids.index(winner)][0]


def bootstrap_mean_interval(values, seed=0):
    """95% percentile interval of the mean, resampling the values (items) with replacement."""
    x = np.asarray(values, dtype=np.float64)                              # (n,)
    idx = np.random.default_rng(seed).integers(0, len(x), (N_BOOTSTRAP, len(x)))
    lo, hi = np.percentile(x[idx].mean(axis=1), [2.5, 97.5])
    return [float(lo), float(hi)]


def run_accuracy(args):
    """Sample n >= k responses per held-out item, then write greedy, mean@k, maj@k and pass@k with intervals."""
    if args.k < 1:
        raise UsageError(f"--k must be >= 1, got {args.k}")
    if args.n_samples is not None and args.n_samples < 1:
        raise UsageError(f"--n-samples must be >= 1, got {args.n_samples}")
    n_samples = args.n_samples or args.k
    if args.k > n_samples:
        raise UsageError(f"--k {args.k} is larger than the {n_samples} samples drawn per item (--n-samples); "
                         f"pass --n-samples >= {args.k}")
    if args.temperature <= 0:
        raise UsageError("--temperature must be > 0: mean@k, maj@k and pass@k need sampled responses")
    items = load_task_items(args.task, args.data, "test", args.n, args.seed)
    model, tokenizer = load_model(args.model, args.run, args.seed)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    scores = {"greedy": greedy_scores(model, tokenizer, items, args.task, args.max_new_tokens),
              f"mean@{args.k}": [], f"maj@{args.k}": [], f"pass@{args.k}": []}
    per_call = max(1, 64 // n_samples)  # about 64 sequences per generate call
    for s in tqdm(range(0, len(items), per_call), desc="sample", unit="batch", file=sys.stderr):
        chunk = items[s:s + per_call]
        prompts = rollout.render_prompts(tokenizer, [tasks.build_messages(it, args.task) for it in chunk])
        ro = rollout.generate_groups(model, tokenizer, prompts, n_samples, args.max_new_tokens,
                                     args.temperature, score=False)
        for j, item in enumerate(chunk):
            texts = ro.texts[j * n_samples:(j + 1) * n_samples]
            graded = [tasks.grade(text, item.answer) for text in texts]
            correct = sum(reward for reward, _ in graded)
            scores[f"mean@{args.k}"].append(correct / n_samples)
            scores[f"maj@{args.k}"].append(majority_correct(texts[:args.k], graded[:args.k]))
            scores[f"pass@{args.k}"].append(pass_at_k(n_samples, int(correct), args.k))

    result = {"model": args.run or args.model, "task": args.task, "data": args.data, "items": len(items),
              "k": args.k, "n_samples": n_samples, "temperature": args.temperature,
              "max_new_tokens": args.max_new_tokens, "seed": args.seed, "time_s": time.perf_counter() - t0,
              "metrics": {name: {"value": float(np.mean(v)), "ci95": bootstrap_mean_interval(v, args.seed),
                                 "items": len(v)} for name, v in scores.items()}}
    lines = [f"Accuracy of {result['model']} on {args.task} ({len(items)} items, {n_samples} samples per item "
             f"at temperature {args.temperature}, max {args.max_new_tokens} new tokens)", "",
             "| metric | value | 95% CI | items |", "|---|---|---|---|"]
    for name, m in result["metrics"].items():
        lines.append(f"| {name} | {m['value']:.3f} | [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] | {m['items']} |")
    table = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "accuracy.json", result)
        (Path(args.out) / "accuracy.md").write_text(table)
    else:
        print(json.dumps(result, indent=1, allow_nan=False))
    print(table)
    return result


# ----------------------------------------------------------------------------
# diagnose: uncertainty signals against measured gradient quantities

DEFAULT_PARAMS = "last-mlp-down"  # stands for "the last decoder layer's mlp.down_proj.weight"


def select_params(model, name):
    """Return (names, tensors) of the parameter subset, and stop every other parameter from requiring grad."""
    named = dict(model.named_parameters())
    if name == DEFAULT_PARAMS:
        # named_parameters lists the layers in order, so the last match is the last layer
        chosen = [n for n in named if n.endswith("mlp.down_proj.weight")][-1:]
        requirement = "ends with 'mlp.down_proj.weight' (a Llama-style MLP)"
    else:
        chosen = [n for n in named if name in n]
        requirement = f"contains {name!r}"
    if not chosen:
        raise UsageError(f"no parameter name {requirement}; pass --params with part of a name such as "
                         f"{list(named)[-3:]}")
    model.requires_grad_(False)  # backward then stops at the subset instead of reaching the embeddings
    for n in chosen:
        named[n].requires_grad_(True)
    return chosen, [named[n] for n in chosen]


def score_directions(model, params, ro, rows, temperature):
    """
    (5.1) s_i over the subset for the given rows of a rollout, one response at a time: (G, S) float64.

    The same forward passes fill ro.logp and ro.entropy at those rows, which the
    signals need, so no separate scoring pass is spent.
    """
    directions = []
    for i in rows:
        length = int(ro.completion_mask[i].sum())
        keep = ro.prompt_mask[i].bool()  # drop left padding: positions count real tokens, so logits are unchanged
        with torch.enable_grad():
            logp, entropy = rollout.completion_logprobs(
                model, ro.prompt_ids[i:i + 1, keep], ro.prompt_mask[i:i + 1, keep],
                ro.completion_ids[i:i + 1, :length], ro.completion_mask[i:i + 1, :length], temperature,
                with_entropy=True)                                                           # (1, T_i) each
            grads = torch.autograd.grad(logp.sum(), params)
        ro.logp[i, :length] = logp[0].detach()
        ro.entropy[i, :length] = entropy[0]
        directions.append(torch.cat([g.flatten() for g in grads]).double().cpu())            # (S,)
    return torch.stack(directions)                                                           # (G, S)


def score_dispersion(s):
    """(5.2) D = 1 - mean pairwise cosine of the score directions: (G, S) -> float."""
    unit = s / s.norm(dim=1, keepdim=True).clamp_min(1e-300)                                 # (G, S)
    cos = unit @ unit.T                                                                      # (G, G)
    i, j = torch.triu_indices(len(s), len(s), offset=1)
    return float(1.0 - cos[i, j].mean())


def relative_gradient_noise(s, adv):
    """(5.3) (1/G) sum_i |A_i s_i - g|^2 / |g|^2 with g = mean_i A_i s_i, or None when g = 0."""
    v = adv.double().unsqueeze(1) * s                                                        # (G, S)
    g = v.mean(dim=0)                                                                        # (S,)
    g_sq = float(g.dot(g))
    if g_sq == 0.0:
        return None
    return float(((v - g) ** 2).sum(dim=1).mean()) / g_sq


def group_signals(ro, rewards, cluster_ids, emb, tau, vocab_size, extra_taus=()):
    """Compute every per-prompt signal of uncertainty.py for B groups: name -> B floats."""
    B, G = rewards.shape
    mask = ro.completion_mask.float().cpu().view(B, G, -1)                                   # (B, G, T)
    logp = ro.logp.cpu().view(B, G, -1)                                                      # (B, G, T)
    entropy = ro.entropy.cpu().view(B, G, -1)                                                # (B, G, T)
    K = unc.embedding_kernel(emb.view(B, G, -1).double(), tau=tau)                           # (B, G, G)
    semantic = unc.semantic_uncertainty(cluster_ids)                                         # (B,)
    kappa_semantic = unc.reward_explained_share(unc.cluster_kernel(cluster_ids), rewards)    # (B,)
    signals = {
        "token_entropy": unc.token_uncertainty(entropy, mask, vocab_size),
        "predictive_entropy": unc.predictive_uncertainty(logp, mask),
        "semantic_entropy": semantic,
        # summed sequence log-probabilities, as train.py passes them (logp is 0 at masked positions)
        "semantic_entropy_likelihood": unc.semantic_uncertainty(cluster_ids, logp.sum(-1)),
        "semantic_calibrated": unc.calibrate(semantic, kappa_semantic),
        "geometric_entropy": unc.geometric_uncertainty(K),
        "kernel_dispersion": unc.kernel_dispersion(K),
        "kappa": unc.reward_explained_share(K, rewards.double()),
        "gcpo_calibrated": unc.calibrated_uncertainty(K, rewards.double()),
        # not an uncertainty signal: how much the rewards vary, as a reference row
        "reward_variance": rewards.var(dim=-1, unbiased=False),
    }
    for other in extra_taus:  # how the geometric signals depend on the kernel bandwidth
        K_other = unc.embedding_kernel(emb.view(B, G, -1).double(), tau=other)                # (B, G, G)
        signals[f"geometric_entropy_tau{other:g}"] = unc.geometric_uncertainty(K_other)
        signals[f"gcpo_calibrated_tau{other:g}"] = unc.calibrated_uncertainty(K_other, rewards.double())
    return {name: [float(x) for x in value] for name, value in signals.items()}


def spearman(x, y):
    """Spearman's rho over the last axis, with average ranks for ties, and NaN where either side is constant."""
    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx = rx - rx.mean(axis=-1, keepdims=True)
    ry = ry - ry.mean(axis=-1, keepdims=True)
    denom = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(-1) / denom, np.nan)


def spearman_with_interval(x, y, seed=0):
    """Return rho, a bootstrap 95% interval (resampling groups) and a note. rho is None when undefined."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    out = {"rho": None, "ci95": None, "groups": len(x), "note": ""}
    if len(x) < 3:
        out["note"] = f"only {len(x)} groups; Spearman needs at least 3"
        return out
    rho = float(spearman(x, y))
    if math.isnan(rho):
        out["note"] = "undefined: the signal or the gradient quantity is constant over these groups"
        return out
    idx = np.random.default_rng(seed).integers(0, len(x), (N_BOOTSTRAP, len(x)))
    boot = spearman(x[idx], y[idx])
    boot = boot[~np.isnan(boot)]  # a constant resample has no rank correlation
    out["rho"] = rho
    if len(boot) == 0:
        out["note"] = "no interval: every resample is constant"
        return out
    out["ci95"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    if len(boot) < N_BOOTSTRAP:
        out["note"] = f"interval from the {len(boot)} of {N_BOOTSTRAP} resamples that are not constant"
    return out


QUANTITIES = {"score_dispersion": "score dispersion", "gradient_noise": "relative gradient noise"}


def run_diagnose(args):
    """Sample one group per training prompt, measure signals and gradient quantities, write their correlations."""
    if args.group_size < 2:
        raise UsageError(f"--group-size must be >= 2 for advantages and pairwise cosines, got {args.group_size}")
    if args.temperature <= 0:
        raise UsageError("--temperature must be > 0: the signals and the scores need the sampling distribution")
    try:
        extra_taus = [float(t) for t in args.tau_sweep.split(",") if t]
    except ValueError as error:
        raise UsageError(f"--tau-sweep must be comma-separated numbers, got {args.tau_sweep!r}") from error
    if min([args.tau, *extra_taus]) <= 0:
        raise UsageError(f"kernel bandwidths must be > 0, got --tau {args.tau} and --tau-sweep {args.tau_sweep!r}")
    items = load_task_items(args.task, args.data, "train", args.prompts, args.seed)
    model, tokenizer = load_model(args.model, args.run, args.seed)
    encoder = tiny_encoder() if args.encoder == "tiny" else load_encoder(args.encoder or DEFAULT_ENCODER)
    param_names, params = select_params(model, args.params)
    n_params = sum(p.numel() for p in params)
    print(f"score directions over {param_names} ({n_params:,} parameters)", file=sys.stderr)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    G, rows = args.group_size, []
    per_call = max(1, 64 // G)
    bar = tqdm(total=len(items), desc="diagnose", unit="group", file=sys.stderr)
    for s in range(0, len(items), per_call):
        chunk = items[s:s + per_call]
        B = len(chunk)
        prompts = rollout.render_prompts(tokenizer, [tasks.build_messages(it, args.task) for it in chunk])
        with torch.no_grad():
            ro = rollout.generate_groups(model, tokenizer, prompts, G, args.max_new_tokens, args.temperature,
                                         score=False)  # score_directions fills logp and entropy
            ro.logp = torch.zeros(ro.completion_ids.shape, device=model.device)                # (N, T)
            ro.entropy = torch.zeros(ro.completion_ids.shape, device=model.device)             # (N, T)
            emb = encoder.encode(ro.texts, convert_to_tensor=True).float().cpu()             # (N, D)
        graded = [tasks.grade(text, chunk[i // G].answer) for i, text in enumerate(ro.texts)]
        rewards = torch.tensor([r for r, _ in graded]).view(B, G)                            # (B, G)
        adv = gcpo.group_advantages(rewards)                                                 # (B, G)
        spread = gcpo.has_reward_spread(rewards)                                             # (B,)
        measured = []
        for b in range(B):
            s_dirs = score_directions(model, params, ro, range(b * G, (b + 1) * G), args.temperature)  # (G, S)
            measured.append({"score_dispersion": score_dispersion(s_dirs),
                             "gradient_noise": relative_gradient_noise(s_dirs, adv[b]) if spread[b] else None})
            bar.update(1)
        cluster_ids = torch.tensor([tasks.cluster_by_answer(ro.texts[b * G:(b + 1) * G]) for b in range(B)])
        signals = group_signals(ro, rewards, cluster_ids, emb, args.tau, model.config.vocab_size, extra_taus)
        for b, item in enumerate(chunk):
            rows.append({"question": item.question, "answer": item.answer, "level": item.level,
                         "reward_mean": float(rewards[b].mean()), "reward_spread": bool(spread[b]),
                         "clusters": len(set(cluster_ids[b].tolist())),
                         "response_len": float(ro.completion_mask[b * G:(b + 1) * G].sum(-1).mean()),
                         "truncated_share": float(ro.truncated[b * G:(b + 1) * G].float().mean()),
                         "sample": ro.texts[b * G], **measured[b],
                         **{name: values[b] for name, values in signals.items()}})
    bar.close()

    signal_names = list(signals)
    correlations = {}
    for quantity in QUANTITIES:
        used = [r for r in rows if r[quantity] is not None]
        correlations[quantity] = {name: spearman_with_interval([r[name] for r in used], [r[quantity] for r in used],
                                                               args.seed) for name in signal_names}
    spread_of = {}  # population std (ddof = 0) over the groups where the value is defined
    for name in signal_names + list(QUANTITIES):
        values = [r[name] for r in rows if r[name] is not None]
        if values:
            spread_of[name] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                               "min": float(np.min(values)), "max": float(np.max(values))}
    summary = {"model": args.run or args.model, "encoder": args.encoder, "task": args.task, "groups": len(rows),
               "group_size": G, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "tau": args.tau, "tau_sweep": extra_taus, "seed": args.seed,
               "params": param_names, "params_size": n_params,
               "zero_spread_share": 1.0 - float(np.mean([r["reward_spread"] for r in rows])),
               "reward_mean": float(np.mean([r["reward_mean"] for r in rows])),
               "truncated_share": float(np.mean([r["truncated_share"] for r in rows])),
               "time_s": time.perf_counter() - t0, "spread": spread_of, "spearman": correlations}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "diagnostic.json", {"summary": summary, "groups": rows})
    (out / "diagnostic.md").write_text(diagnostic_markdown(summary, signal_names))
    plot_diagnostic(out / "diagnostic.png", rows, signal_names, correlations)
    print(diagnostic_markdown(summary, signal_names))
    return summary


def diagnostic_markdown(summary, signal_names):
    """Format the Spearman table with intervals and group counts, then the spread of each signal."""
    lines = [f"Diagnostic: {summary['groups']} groups of G = {summary['group_size']} from {summary['model']} on "
             f"{summary['task']} (max {summary['max_new_tokens']} new tokens, temperature {summary['temperature']}, "
             f"tau {summary['tau']}). Score directions over {', '.join(summary['params'])} "
             f"({summary['params_size']:,} parameters). Mean reward {summary['reward_mean']:.3f}, responses cut "
             f"at the token limit {summary['truncated_share']:.0%}. Groups with all rewards equal: "
             f"{summary['zero_spread_share']:.0%}, and relative gradient noise is defined only for the others.", "",
             "| signal | " + " | ".join(f"rho with {label} [95% CI] (groups)" for label in QUANTITIES.values()) + " |",
             "|---|" + "---|" * len(QUANTITIES)]
    notes = []
    for name in signal_names:
        cells = []
        for quantity in QUANTITIES:
            c = summary["spearman"][quantity][name]
            if c["rho"] is None:
                cells.append(f"null ({c['groups']})")
                notes.append(f"{name} vs {QUANTITIES[quantity]}: {c['note']}")
            else:
                interval = "n/a" if c["ci95"] is None else f"{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}"
                cells.append(f"{c['rho']:+.3f} [{interval}] ({c['groups']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {note}" for note in notes]
    lines += ["", "| value over groups | mean | std | min | max |", "|---|---|---|---|---|"]
    for name, s in summary["spread"].items():
        cells = " | ".join(f"{s[key] + 0.0:.4g}" for key in ("mean", "std", "min", "max"))  # + 0.0 turns -0.0 into 0.0
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_diagnostic(path, rows, signal_names, correlations):
    """Plot one panel per signal and gradient quantity, with groups as points and rho in the title."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    ncols = 5
    nrows = math.ceil(len(signal_names) / ncols)
    fig, axes = plt.subplots(2 * nrows, ncols, figsize=(3.2 * ncols, 2.8 * 2 * nrows), squeeze=False)
    for q_index, (quantity, label) in enumerate(QUANTITIES.items()):
        used = [r for r in rows if r[quantity] is not None]
        for k, name in enumerate(signal_names):
            ax = axes[q_index * nrows + k // ncols, k % ncols]
            ax.scatter([r[name] for r in used], [r[quantity] for r in used], s=10, alpha=0.7)
            if quantity == "gradient_noise" and used:
                ax.set_yscale("log")  # the noise ratio spans orders of magnitude
            rho = correlations[quantity][name]["rho"]
            ax.set_title(f"{name}\nrho = {fmt(rho, 2)} ({len(used)} groups)", fontsize=8)
            ax.set_xlabel(name, fontsize=7)
            ax.set_ylabel(label, fontsize=7)
            ax.tick_params(labelsize=6)
        for k in range(len(signal_names), nrows * ncols):
            axes[q_index * nrows + k // ncols, k % ncols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------
# compare: the same training budget for each algorithm and seed

ALGOS = {  # name -> train.py flags
    "grpo": ["--algo", "grpo"],
    "seed_grpo": ["--algo", "seed_grpo"],
    "gcpo": ["--algo", "gcpo"],
    "geo_nocal": ["--algo", "gcpo", "--calibration", "none"],          # geometric entropy, no calibration
    "sem_cal": ["--algo", "seed_grpo", "--calibration", "reward"],     # semantic entropy, calibrated
}
COMPARE_OWNS = ("--out", "--seed", "--steps", "--algo", "--signal", "--calibration", "--resume", "--no-resume")


def read_rows(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_status(run_dir, steps):
    """'done' (final eval row present), 'partial' (resumable checkpoint), 'stale' (no checkpoint) or 'new'."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return "new"
    rows = read_rows(metrics)
    trained = max((r["step"] for r in rows if "reward_mean" in r), default=0)
    if trained > steps:
        raise UsageError(f"{run_dir} has already trained {trained} steps, more than --steps {steps}; "
                         "raise --steps or choose another --out")
    if any(r["step"] == steps and "eval_greedy_acc" in r for r in rows):
        return "done"
    return "partial" if (run_dir / "checkpoint" / "trainer_state.pt").exists() else "stale"


def summarize_run(rows, steps):
    """Collect start and final held-out accuracy, mean reward over the last quarter of steps, mean step time."""
    evals = {r["step"]: r["eval_greedy_acc"] for r in rows if "eval_greedy_acc" in r}
    train_rows = sorted((r for r in rows if "reward_mean" in r), key=lambda r: r["step"])
    last = train_rows[-max(1, len(train_rows) // 4):]
    start, final = evals.get(0), evals[steps]
    return {"start_acc": start, "final_acc": final, "gain": None if start is None else final - start,
            "final_reward": float(np.mean([r["reward_mean"] for r in last])),
            "step_time": float(np.mean([r["time_step"] for r in train_rows])),
            "reward_curve": [r["reward_mean"] for r in train_rows]}


def mean_std(values):
    """Return the mean and sample std over seeds, skipping None. std is None for fewer than two values."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def run_compare(args, train_flags):
    """Train every algorithm for every seed (resuming a partial sweep), then tabulate and plot the runs."""
    import train  # imported here, because train.py itself imports this module for greedy_accuracy

    algos = [a for a in args.algos.split(",") if a]
    unknown = [a for a in algos if a not in ALGOS]
    if unknown or not algos:
        raise UsageError(f"unknown --algos {unknown}; choose from {','.join(ALGOS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError as error:
        raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from error
    # a prefix counts too, because argparse accepts abbreviated flags
    owned = [flag for flag in train_flags
             if flag.startswith("--") and any(o.startswith(flag.split("=")[0]) for o in COMPARE_OWNS)]
    if owned:
        raise UsageError(f"compare sets {owned} itself for each run; remove them from the train.py flags")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # One held-out file for every run, because train.py draws arithmetic test items per seed.
    probe = train.parse_args(train_flags + ["--out", str(out / "probe"), "--steps", str(args.steps)])
    if probe.eval_items < 1:
        raise UsageError("compare reports held-out accuracy, so --eval-items must be >= 1")
    if not probe.eval_data:
        if probe.data:
            raise UsageError("with --data, pass --eval-data too: compare needs held-out items for every run")
        if probe.task == "arithmetic":
            heldout = out / "heldout.jsonl"
            if not heldout.exists():
                items = tasks.load_items("arithmetic", split="test", n=probe.eval_items, seed=0)
                heldout.write_text("".join(json.dumps({"question": it.question, "answer": it.answer}) + "\n"
                                           for it in items))
            elif len(read_rows(heldout)) != probe.eval_items:
                raise UsageError(f"{heldout} contains {len(read_rows(heldout))} items but --eval-items is "
                                 f"{probe.eval_items}; keep --eval-items or choose another --out")
            train_flags = train_flags + ["--eval-data", str(heldout)]

    runs = [(algo, seed) for algo in algos for seed in seeds]
    for algo, seed in tqdm(runs, desc="compare", unit="run", file=sys.stderr):
        run_dir = out / f"{algo}-seed{seed}"
        status = run_status(run_dir, args.steps)
        tqdm.write(f"compare | {run_dir.name} | {status}", file=sys.stderr)
        if status == "done":
            continue
        if status == "stale":  # metrics without a checkpoint cannot be resumed, and train.py will not overwrite them
            tqdm.write(f"compare | {run_dir.name} | no checkpoint to resume, so the run starts over", file=sys.stderr)
            shutil.rmtree(run_dir)
        # NOTE: --resume keeps the flags given now, so changing train flags between sweeps mixes settings in one run.
        argv = train_flags + ALGOS[algo] + ["--seed", str(seed), "--steps", str(args.steps), "--out", str(run_dir)]
        train.train(train.parse_args(argv + (["--resume"] if status == "partial" else [])))
        gc.collect()  # free the finished run's model and optimizer before the next one loads

    per_run = {f"{a}-seed{s}": summarize_run(read_rows(out / f"{a}-seed{s}" / "metrics.jsonl"), args.steps)
               for a, s in runs}
    table = {}
    for algo in algos:
        runs_of = [per_run[f"{algo}-seed{s}"] for s in seeds]
        table[algo] = {key: mean_std([r[key] for r in runs_of])
                       for key in ("final_acc", "gain", "start_acc", "final_reward", "step_time")}
        table[algo]["reward_curve"] = np.mean([r["reward_curve"] for r in runs_of], axis=0).tolist()
    settings = {"steps": args.steps, "seeds": seeds, "algos": {a: ALGOS[a] for a in algos},
                "train_flags": train_flags, "prompts_per_step": probe.prompts_per_step,
                "group_size": probe.group_size, "max_new_tokens": probe.max_new_tokens,
                "temperature": probe.temperature, "lr": probe.lr,
                "eval_items": probe.eval_items, "model": probe.model, "encoder": probe.encoder, "task": probe.task}
    write_json(out / "compare.json", {"settings": settings, "summary": table, "runs": per_run})
    markdown = compare_markdown(settings, table)
    (out / "compare.md").write_text(markdown)
    plot_compare(out / "compare.png", table, settings)
    print(markdown)
    return table


def compare_markdown(settings, table):
    def cell(pair, digits=3):
        mean, std = pair
        return fmt(mean, digits) + ("" if std is None else f" +- {fmt(std, digits)}")

    lines = [f"{settings['model']} on {settings['task']}: {settings['steps']} steps of B = "
             f"{settings['prompts_per_step']} prompts x G = {settings['group_size']} responses, max "
             f"{settings['max_new_tokens']} new tokens at temperature {settings['temperature']}, lr {settings['lr']}, "
             f"seeds {settings['seeds']}. Held-out: "
             f"greedy accuracy on {settings['eval_items']} items, the same for every run. Mean +- sample std "
             f"over seeds. Final train reward: mean reward of the last {max(1, settings['steps'] // 4)} step(s), "
             "a quarter of the run.", "",
             "| algo | final held-out acc | gain over start | start acc | final train reward | step time (s) |",
             "|---|---|---|---|---|---|"]
    for algo, t in table.items():
        lines.append(f"| {algo} | {cell(t['final_acc'])} | {cell(t['gain'])} | {cell(t['start_acc'])} | "
                     f"{cell(t['final_reward'])} | {cell(t['step_time'], 1)} |")
    return "\n".join(lines) + "\n"


def plot_compare(path, table, settings):
    """Plot the train reward per step, mean over seeds, one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, t in table.items():
        ax.plot(range(1, len(t["reward_curve"]) + 1), t["reward_curve"], marker="o", markersize=3, label=algo)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(f"train reward (mean over {len(settings['seeds'])} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------
# command line

def build_parser():
    from train import Config  # imported here, because train.py itself imports this module for greedy_accuracy

    trained = Config()  # sampling defaults follow training, so the measurements describe the trained distribution
    parser = argparse.ArgumentParser(description="Evaluate policies and measure uncertainty signals")
    commands = parser.add_subparsers(dest="command", required=True)

    def policy_flags(p):
        source = p.add_mutually_exclusive_group()
        source.add_argument("--model", default=DEFAULT_POLICY, help="policy: hub id, local folder, or 'tiny'")
        source.add_argument("--run", help="train.py run folder, whose RUN/checkpoint is loaded")
        p.add_argument("--task", default="arithmetic", choices=tasks.TASKS, help="prompt template and data source")
        p.add_argument("--data", help="local JSONL file with question and answer fields")
        p.add_argument("--max-new-tokens", type=int, default=trained.max_new_tokens,
                       help="response length limit in tokens (default: train.py's)")
        p.add_argument("--temperature", type=float, default=trained.temperature,
                       help="sampling temperature, > 0 (default: train.py's)")
        p.add_argument("--seed", type=int, default=0, help="seed for items, sampling and bootstrap")

    acc = commands.add_parser("accuracy", allow_abbrev=False, help="greedy, mean@k, maj@k and pass@k")
    policy_flags(acc)
    acc.add_argument("--n", type=int, default=100, help="held-out items to evaluate (first N)")
    acc.add_argument("--k", type=int, default=8, help="k of mean@k, maj@k and pass@k")
    acc.add_argument("--n-samples", type=int, help="responses sampled per item, >= k (default k)")
    acc.add_argument("--out", help="folder for accuracy.json and accuracy.md (default: print to stdout)")

    diag = commands.add_parser("diagnose", allow_abbrev=False, help="uncertainty signals vs gradient quantities")
    policy_flags(diag)
    diag.add_argument("--out", required=True, help="folder for diagnostic.json, .md and .png")
    diag.add_argument("--prompts", type=int, default=64, help="training prompts, one group each")
    diag.add_argument("--encoder", default=DEFAULT_ENCODER, help="sentence encoder: id, folder, or 'tiny'")
    diag.add_argument("--group-size", type=int, default=trained.group_size,
                      help="G, responses per prompt (default: train.py's)")
    diag.add_argument("--tau", type=float, default=trained.tau, help="RBF kernel bandwidth on the sphere")
    diag.add_argument("--tau-sweep", default="0.1,0.25,1", help="further bandwidths at which the geometric "
                      "entropy and GCPO's signal are also reported (comma-separated, empty for none)")
    diag.add_argument("--params", default=DEFAULT_PARAMS,
                      help=f"parameters of the score directions: every name containing this string. "
                           f"{DEFAULT_PARAMS!r} is the last decoder layer's mlp.down_proj.weight")

    comp = commands.add_parser("compare", allow_abbrev=False,
                               help="train each algorithm and seed, then tabulate (other flags go to train.py)")
    comp.add_argument("--out", required=True, help="sweep folder, with each run in OUT/<algo>-seed<k>")
    comp.add_argument("--algos", default=",".join(ALGOS), help=f"comma-separated subset of {','.join(ALGOS)}")
    comp.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    comp.add_argument("--steps", type=int, default=trained.steps, help="training steps of every run")
    return parser


def main(argv=None):
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "compare":
        return run_compare(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_accuracy(args) if args.command == "accuracy" else run_diagnose(args)


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"eval.py: error: {error}")
