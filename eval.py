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
trains on. train.py imports greedy_accuracy from here. diagnostic.py holds the
diagnose code and sweep.py the compare code, while this file holds accuracy, the helpers
they share and the command line.

Departures and simplifications:
1. mean@k averages all n sampled responses, because each estimates the same per-sample
   accuracy. maj@k votes over the first k, and pass@k uses all n (unbiased estimator).
2. maj@k grades the winning cluster by the reward of its first member. Clusters come
   from tasks.cluster_by_answer, and a tie goes to the cluster that appears first.
"""
import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import rollout
import tasks
from models import DEFAULT_ENCODER, DEFAULT_POLICY, load_policy, pick_device, tiny_policy

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
# command line

def build_parser():
    # imported here, because train.py, diagnostic.py and sweep.py import this module
    from diagnostic import DEFAULT_PARAMS
    from sweep import ALGOS
    from train import Config

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
        from sweep import run_compare

        return run_compare(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "accuracy":
        return run_accuracy(args)
    from diagnostic import run_diagnose

    return run_diagnose(args)


if __name__ == "__main__":
    # diagnostic.py and sweep.py run `from eval import UsageError`. Registering this script as `eval`
    # keeps them from loading a second copy, whose UsageError the except clause below would miss.
    sys.modules.setdefault("eval", sys.modules[__name__])
    try:
        main()
    except UsageError as error:
        sys.exit(f"eval.py: error: {error}")
