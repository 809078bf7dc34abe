"""
Train each algorithm for each seed through train.train with the same budget, then
tabulate held-out accuracy in compare.md and compare.json and plot the train reward in
compare.png. A rerun skips finished runs and resumes partial ones from their checkpoint.
eval.py's command line runs it, and flags that compare does not set go to train.py:

    python eval.py compare --out runs/sweep --steps 20 --seeds 0,1,2 --prompts-per-step 4

Departures and simplifications:
1. compare evaluates every arithmetic run on one held-out file, written once, so every
   algorithm and seed sees identical items (train.py would draw them per seed).
"""
import gc
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

import tasks
import train
from eval import UsageError, fmt, write_json


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
