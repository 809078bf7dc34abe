"""
Measure the offline default run: held-out greedy accuracy before and after, wall time,
per-stage time of a step and peak memory.

    python bench/default_run.py                      # python train.py with its defaults
    python bench/default_run.py --steps 2 --data ../data/gsm8k/train.jsonl ...   # flags go to train.py

It runs train.py in a subprocess into a fresh run folder, times the whole command,
then summarises the run's metrics.jsonl into bench/results/<name>.md and .json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("sample", "reward", "embed", "uncertainty", "optimize", "step")


def summarise(metrics_path):
    """Collect the before/after accuracy, the median time per stage and the peak memory of one run."""
    with open(metrics_path) as fh:
        rows = [json.loads(line) for line in fh]
    evals = [r for r in rows if "eval_greedy_acc" in r]
    steps = [r for r in rows if "reward_mean" in r]
    return {
        "steps": len(steps),
        "eval_items": evals[0]["eval_items"] if evals else 0,
        "acc_before": evals[0]["eval_greedy_acc"] if evals else None,
        "acc_after": evals[-1]["eval_greedy_acc"] if len(evals) > 1 else None,
        "reward_first": steps[0]["reward_mean"], "reward_last": steps[-1]["reward_mean"],
        "zero_spread_frac_mean": statistics.mean(r["zero_spread_frac"] for r in steps),
        "unparsed_frac_mean": statistics.mean(r["unparsed_frac"] for r in steps),
        "median_time": {s: statistics.median(r[f"time_{s}"] for r in steps) for s in STAGES},
        "first_step_time": {s: steps[0][f"time_{s}"] for s in STAGES},
        "eval_time": [r["time_eval"] for r in evals],
        "peak_mem_gb": max(r["peak_mem_gb"] for r in steps),
    }


def to_markdown(name, command, wall, s):
    acc = (f"{s['acc_before']:.3f} -> {s['acc_after']:.3f} on {s['eval_items']} held-out items"
           if s["acc_after"] is not None else "not evaluated")
    lines = [f"## {name}", "", f"command: `{command}`", "",
             "| quantity | value |", "|---|---|",
             f"| wall time of the command | {wall:.0f} s |",
             f"| steps | {s['steps']} |",
             f"| greedy accuracy before -> after | {acc} |",
             f"| train reward, first -> last step | {s['reward_first']:.3f} -> {s['reward_last']:.3f} |",
             f"| mean share of zero-spread groups | {s['zero_spread_frac_mean']:.2f} |",
             f"| mean share of unparsable completions | {s['unparsed_frac_mean']:.2f} |",
             f"| evaluation time (each) | {', '.join(f'{t:.0f} s' for t in s['eval_time'])} |",
             f"| peak memory (max RSS) | {s['peak_mem_gb']:.2f} GiB |", "",
             "| stage | median time per step (s) | share | first step (s) |", "|---|---|---|---|"]
    for stage in STAGES:
        med = s["median_time"][stage]
        lines.append(f"| {stage} | {med:.2f} | {med / s['median_time']['step']:.1%} | {s['first_step_time'][stage]:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="default_run", help="name of the result files in bench/results/")
    args, train_args = p.parse_known_args()
    out = os.path.join(ROOT, "runs", f"bench-{args.name}-{int(time.time())}")
    command = [sys.executable, "train.py", *train_args, "--out", out]
    t0 = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    s = summarise(os.path.join(out, "metrics.jsonl"))
    shown = "python train.py " + " ".join(train_args)
    md = to_markdown(args.name, shown.strip(), wall, s)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", f"{args.name}.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(ROOT, "bench", "results", f"{args.name}.json"), "w") as fh:
        json.dump({"command": shown, "wall_s": wall, "run_folder": out, **s}, fh, indent=1)
    print(md)


if __name__ == "__main__":
    main()
