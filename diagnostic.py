"""
Measure whether an uncertainty signal tracks how noisy the group's policy-gradient
estimate is, which is the method's central claim. `diagnose` samples one group per training prompt,
computes every signal of uncertainty.py and two measured gradient quantities, and
correlates them (Spearman) with bootstrap 95% intervals. eval.py's command line runs it:

    python eval.py diagnose --out results/diagnostic --prompts 64 --group-size 8

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
"""
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from tqdm import tqdm

import gcpo
import rollout
import tasks
import uncertainty as unc
from eval import N_BOOTSTRAP, UsageError, fmt, load_model, load_task_items, write_json
from models import DEFAULT_ENCODER, load_encoder, tiny_encoder


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
