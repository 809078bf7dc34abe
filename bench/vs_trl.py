"""
Compare one training step of train.py with one of TRL's GRPOTrainer (trl 1.16.0) on
the same model, prompts and settings: median step time, peak memory, and their ratios.

Each run is a subprocess of this script, so its peak resident memory (VmHWM, the
CPU's counterpart of a GPU's peak allocation) is its own. It is read at the end of
each optimizer step, so a checkpoint written after training does not count. Runs alternate between the
runners for --rounds rounds, and each round starts with a different runner, so a
load change on a shared machine hits both sides.

Runners:
  trl           GRPOTrainer, one optimizer step per generation batch (num_iterations 1,
                gradient_accumulation_steps 1, per_device_train_batch_size = B*G)
  project       train.py --algo grpo --no-log-signals --micro-batch B*G
  project_gcpo  train.py's default run: --algo gcpo with --log-signals (loads the
                encoder), shown for the memory target and left out of the time ratio

    python bench/vs_trl.py --model tiny                     # about 2 minutes
    python bench/vs_trl.py --model default --rounds 2       # SmolLM2-135M, see bench/README.md

Settings set to the same value on both sides: G, B, max new tokens, temperature,
top_k 0, top_p 1, min_p off and repetition penalty 1 (plain sampling), learning
rate (constant schedule), torch AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0),
gradient clipping at norm 1, beta 0 (no reference model), clip epsilon 0.2,
advantages divided by the group's sample std + 1e-4, loss = token mean over the batch
(TRL loss_type "dapo", train.py agg "token_mean"), float32, no gradient checkpointing,
prompts in the same order (TRL's shuffle off), reward = tasks.grade. The optimizer
column shows both sides' fused/foreach options. DIFFERENCES lists the settings that
still differ, and the report prints it.

Step time is measured from the start of sampling to the end of optimizer.step: TRL's
on_step_begin to on_step_end callbacks, and train.py's summed stage timers (time_step).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common
import train

RUNNERS = ("trl", "project", "project_gcpo")

DIFFERENCES = [
    "LM head: TRL 1.16 patches the model with a fused, chunked log-prob head and never builds (N, T, V) logits. "
    "train.py builds the completion logits (logits_to_keep = T) and takes log-softmax and entropy from them.",
    "Sampling RNG streams differ, so the two sides sample different completions. Mean response length is "
    "reported beside each time because step time grows with it.",
    "Model mode: GRPOTrainer trains in train() mode, train.py in eval() mode. The policies used here have no "
    "dropout, so both compute the same function.",
    "Step boundaries: TRL's step includes its dataloader fetch and reward bookkeeping, while train.py's time_step "
    "leaves out its metrics-row write. Both include sampling, reward, forward, backward, clipping and "
    "optimizer.step.",
]


def policy_folder(model, scratch):
    """Return the policy folder both trainers load: the cached default policy, or a tiny one saved to `scratch`."""
    import models

    if model == "default":
        models.load_policy(models.DEFAULT_POLICY, device="cpu")  # converts and caches it on first use
        return str(models.policy_cache_dir())
    folder = os.path.join(scratch, "tiny_policy")
    policy, tokenizer = models.tiny_policy(seed=0)
    policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------
# children: one run each, results written as JSON

def run_project(args, folder, out, gcpo):
    import rollout

    N = args.prompts * args.group_size
    cfg = train.resolve(train.Config(
        algo="gcpo" if gcpo else "grpo", log_signals=gcpo, model=folder,
        encoder="tiny" if args.model == "tiny" else "all-MiniLM-L6-v2",
        steps=args.warmup + args.steps, prompts_per_step=args.prompts, group_size=args.group_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, lr=args.lr, micro_batch=N, beta=0.0, mu=1,
        max_grad_norm=1.0, eval_items=0, save_every=10**9, sample_every=0, seed=args.seed, out=out))
    before = {}
    original = rollout.generate_groups

    def first_sample_marks_memory(*a, **k):
        before.setdefault("rss_gb", common.peak_rss_gb())
        return original(*a, **k)

    rollout.generate_groups = first_sample_marks_memory
    clock = common.StageClock()
    with clock.installed():
        rows = [r for r in common.read_jsonl(train.train(cfg)) if "reward_mean" in r]
    return {"step_s": [r["time_step"] for r in rows][args.warmup:], "parts": clock.steps[args.warmup:],
            "optimizer": clock.optimizer,
            "response_len": [r["response_len"] for r in rows][args.warmup:],
            "peak_rss_gb": clock.peak_rss_gb, "rss_before_training_gb": before["rss_gb"]}


def run_trl(args, folder, out):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import models
    import tasks

    # the prompts of train.py's steps 1..S in its order, so TRL gets the same batches unshuffled
    items = tasks.load_items("arithmetic", None, "train", seed=args.seed)
    ordered = [it for s in range(args.warmup + args.steps)
               for it in train.batch_items(items, s, args.prompts, args.seed)]
    dataset = Dataset.from_list([{"prompt": tasks.build_messages(it, "arithmetic"), "answer": it.answer}
                                 for it in ordered])

    def correctness(prompts, completions, answer, **kwargs):
        return [tasks.grade(c[0]["content"], a)[0] for c, a in zip(completions, answer)]

    clock = common.StageClock()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0, self.rss_before = [], None, None

        def on_train_begin(self, *a, **k):
            self.rss_before = common.peak_rss_gb()

        def on_step_begin(self, *a, **k):
            clock.new_step()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    N = args.prompts * args.group_size
    config = GRPOConfig(
        output_dir=out, max_steps=args.warmup + args.steps, seed=args.seed, use_cpu=True, bf16=False,
        num_generations=args.group_size, per_device_train_batch_size=N, gradient_accumulation_steps=1,
        num_iterations=1, max_completion_length=args.max_new_tokens, temperature=args.temperature, top_k=0, top_p=1.0,
        min_p=None, repetition_penalty=1.0, learning_rate=args.lr, lr_scheduler_type="constant",
        optim=args.trl_optim, weight_decay=0.0, max_grad_norm=1.0, beta=0.0, epsilon=0.2,
        loss_type="dapo", scale_rewards="group", gradient_checkpointing=False, shuffle_dataset=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    policy, tokenizer = models.load_policy(folder, device="cpu", dtype=torch.float32)
    timer = StepTimer()
    trainer = GRPOTrainer(model=policy, reward_funcs=correctness, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    with clock.installed():
        trainer.train()
    logs = [h for h in trainer.state.log_history if "step_time" in h][args.warmup:]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
    settings = {"optimizer": type(optimizer).__name__, "fused": optimizer.defaults.get("fused"),
                "foreach": optimizer.defaults.get("foreach"), "dtype": str(policy.dtype),
                "gradient_checkpointing": policy.is_gradient_checkpointing,
                **{k: getattr(trainer.generation_config, k) for k in
                   ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")}}
    return {"step_s": timer.times[args.warmup:], "parts": clock.steps[args.warmup:], "trl_settings": settings,
            "optimizer": clock.optimizer,
            "trl_step_time_s": [h["step_time"] for h in logs],
            "response_len": [h.get("completions/mean_length") for h in logs],
            "peak_rss_gb": clock.peak_rss_gb, "rss_before_training_gb": timer.rss_before}


def child(args):
    with tempfile.TemporaryDirectory() as scratch:
        folder = policy_folder(args.model, scratch)
        out = os.path.join(scratch, "run")
        if args.child == "trl":
            result = run_trl(args, folder, out)
        else:
            result = run_project(args, folder, out, gcpo=args.child == "project_gcpo")
    with open(args.result_file, "w") as fh:
        json.dump({"runner": args.child, **result}, fh)


# ----------------------------------------------------------------------------
# parent: alternate the runners, then tabulate

def spawn(runner, args):
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, __file__, *sys.argv[1:], "--child", runner, "--result-file", result.name]
        print(f"running {runner}", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{runner} run failed with exit code {done.returncode}:\n{done.stderr[-4000:]}")
        with open(result.name) as fh:
            data = json.load(fh)
    data["process_s"] = time.perf_counter() - t0
    return data


def main(args):
    runs = {runner: [] for runner in args.runners}
    for round_index in range(args.rounds):
        k = round_index % len(args.runners)
        for runner in args.runners[k:] + args.runners[:k]:
            runs[runner].append(spawn(runner, args))

    rows = []
    for runner, results in runs.items():
        steps = [s for r in results for s in r["step_s"]]
        parts = [p for r in results for p in r["parts"]]
        lengths = [x for r in results for x in r["response_len"] if x is not None]
        median_part = {name: common.median([p.get(name, 0.0) for p in parts])
                       for name in ("generate", "backward", "optimizer_step")}
        rest = common.median([s - sum(p.get(n, 0.0) for n in median_part) for s, p in zip(steps, parts)])
        rows.append({"runner": runner, "steps": len(steps), "median_step_s": common.median(steps),
                     "min_step_s": min(steps), "max_step_s": max(steps),
                     **{f"{name}_s": v for name, v in median_part.items()}, "rest_s": rest,
                     "optimizer": results[0]["optimizer"],
                     "mean_response_len": sum(lengths) / len(lengths) if lengths else None,
                     "peak_rss_gb": max(r["peak_rss_gb"] for r in results),
                     "rss_before_training_gb": max(r["rss_before_training_gb"] for r in results)})
    by = {row["runner"]: row for row in rows}
    ratios = {}
    if "trl" in by:
        for runner in ("project", "project_gcpo"):
            if runner in by:
                ratios[runner] = {"step_time_vs_trl": by[runner]["median_step_s"] / by["trl"]["median_step_s"],
                                  "peak_rss_vs_trl": by[runner]["peak_rss_gb"] / by["trl"]["peak_rss_gb"]}
    markdown = (f"## train.py against TRL {trl_version()} GRPOTrainer, {args.model} model\n\n"
                f"B = {args.prompts}, G = {args.group_size}, max new tokens {args.max_new_tokens}, "
                f"temperature {args.temperature}, "
                f"lr {args.lr}, {args.rounds} round(s) of {args.warmup} warm-up + {args.steps} timed steps "
                f"per runner, torch threads {args.threads or 'default'}\n\nmachine: {common.machine()}\n\n"
                + common.markdown_table(rows, ["runner", "steps", "median_step_s", "min_step_s", "max_step_s",
                                               "generate_s", "backward_s", "optimizer_step_s", "rest_s",
                                               "mean_response_len", "rss_before_training_gb", "peak_rss_gb",
                                               "optimizer"])
                + "\n\nrest_s = step - generate - backward - optimizer.step (medians over steps): the forward "
                "pass with its log-prob head, reward, advantages, clipping and each trainer's bookkeeping."
                + "\n\n" + "\n".join(f"- {runner}: step time {r['step_time_vs_trl']:.2f}x TRL's, "
                                     f"peak RSS {r['peak_rss_vs_trl']:.2f}x TRL's" for runner, r in ratios.items())
                + "\n\nSettings that differ:\n" + "\n".join(f"- {d}" for d in DIFFERENCES)
                + (f"\n\nTRL's settings as its trainer held them: {runs['trl'][0]['trl_settings']}"
                   if runs.get("trl") else ""))
    common.write_results(f"vs_trl_{args.model}", markdown,
                         {"machine": common.machine(), "args": vars(args), "rows": rows, "ratios": ratios,
                          "runs": runs, "differences": DIFFERENCES})


def trl_version():
    from importlib.metadata import version

    return version("trl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "default"],
                   help="tiny (a random 2-layer Llama saved to a temp folder) or default (SmolLM2-135M-Instruct)")
    p.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds, each running every runner once")
    p.add_argument("--prompts", type=int, default=2, help="B, prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="G, completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="completion length limit in tokens")
    p.add_argument("--temperature", type=float, default=train.Config.temperature,
                   help="sampling temperature on both sides (default: train.py's)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate, constant on both sides")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--trl-optim", default="adamw_torch",
                   help="TRL's optim. adamw_torch matches train.py's torch.optim.AdamW defaults. Pass "
                        "adamw_torch_fused if train.py builds AdamW with fused=True")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt order and of both trainers")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--child", choices=RUNNERS, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    common.set_threads(arguments.threads)
    child(arguments) if arguments.child else main(arguments)
