"""
Time each stage of one train.py step, for GRPO and GCPO at several group sizes,
and time GCPO's uncertainty functions alone on synthetic inputs.

Part "loop" runs train.train itself for a warm-up step plus --steps timed steps
per (model, algo, G) and reports the median of each stage. train.py's own timers
(the time_* fields of metrics.jsonl) give sample, reward, embed, uncertainty and
optimize. Sub-timers inside them come from common.StageClock, which wraps what
the loop calls without changing train.py (its docstring defines each one). This
script also derives fwd_logp = logprobs_grad - fwd_model, sample_other and
optimize_other (what is left of each train.py timer), and the shares of the step.
Part "synthetic" times the uncertainty functions on random embeddings for
G in {4, ..., 64}, and the sentence-encoder pass on texts of 32, 128 and 512 tokens.

    python bench/step_breakdown.py --models tiny                      # about 1 minute
    python bench/step_breakdown.py --models default --part loop       # SmolLM2-135M, see bench/README.md
    python bench/step_breakdown.py --part synthetic
    python bench/step_breakdown.py --models default --groups 8 --algos gcpo --profile   # cProfile one run

Simplifications:
1. GRPO runs with --no-log-signals so it loads no encoder. GCPO keeps train.py's
   default --log-signals, so its uncertainty stage also clusters answers for the
   semantic-entropy log. The "semantic" column shows that part.
2. Shares are of the summed stage timers (time_step), which leave out the
   per-step JSONL write and the checkpoint written after the last step.
"""
import argparse
import contextlib
import cProfile
import io
import math
import pstats
import tempfile
import time

import common  # first: it sets the offline switches before transformers is imported
import torch

import models
import train
import uncertainty as unc
from gcpo import uncertainty_weight


def run_loop(model, algo, G, args):
    """Run train.train for warm-up + timed steps, and return one dict of stage seconds per timed step."""
    N = args.prompts * G
    with tempfile.TemporaryDirectory() as out:
        cfg = train.resolve(train.Config(
            algo=algo, model="tiny" if model == "tiny" else models.DEFAULT_POLICY,
            encoder="tiny" if model == "tiny" else models.DEFAULT_ENCODER,
            steps=args.warmup + args.steps, prompts_per_step=args.prompts, group_size=G,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            micro_batch=math.gcd(args.micro_batch, N), eval_items=0, save_every=10**9, sample_every=0,
            log_signals=algo != "grpo", out=out))
        clock = common.StageClock()
        with clock.installed(), contextlib.redirect_stdout(io.StringIO()):
            path = train.train(cfg)
        rows = [row for row in common.read_jsonl(path) if "reward_mean" in row]
    if len(rows) != len(clock.steps):
        raise RuntimeError(f"found {len(rows)} metric rows but {len(clock.steps)} sampled batches, so the "
                           "sub-timers do not line up with train.py's steps. Check whether train.py now "
                           "calls rollout.generate_groups more than once per step")
    steps = []
    for row, sub in list(zip(rows, clock.steps))[args.warmup:]:
        s = {k[len("time_"):]: v for k, v in row.items() if k.startswith("time_")}
        s.update({name: sub.get(name, 0.0) for name in common.SUB_TIMERS})
        s["fwd_logp"] = s.pop("logprobs_grad") - s["fwd_model"]
        s["sample_other"] = s["sample"] - s["generate"] - s["score"]
        s["optimize_other"] = s["optimize"] - s["fwd_model"] - s["fwd_logp"] - s["backward"] - s["optimizer_step"]
        model_work = s["generate"] + s["fwd_model"] + s["backward"]
        s["gcpo_pct"] = 100 * (s["embed"] + s["uncertainty"]) / s["step"]
        s["gcpo_without_semantic_pct"] = 100 * (s["embed"] + s["uncertainty"] - s["semantic"]) / s["step"]
        s["outside_model_pct"] = 100 * (1.0 - model_work / s["step"])
        s["outside_model_and_optimizer_pct"] = 100 * (1.0 - (model_work + s["optimizer_step"]) / s["step"])
        s["response_len"] = row["response_len"]
        steps.append(s)
    return steps


def summarize(model, algo, G, args, steps):
    """Median over the timed steps of each column, times in milliseconds."""
    medians = {key: common.median([s[key] for s in steps]) for key in steps[0]}
    in_ms = {key: value if key == "response_len" or key.endswith("_pct") else 1e3 * value
             for key, value in medians.items()}
    return {"model": model, "algo": algo, "G": G, "N": args.prompts * G, "steps": len(steps), **in_ms}


LOOP_COLUMNS = ["algo", "G", "N", "response_len", "generate", "sample_other", "score", "reward", "embed",
                "uncertainty", "semantic", "fwd_model", "fwd_logp", "backward", "optimizer_step", "optimize_other",
                "step", "gcpo_pct", "gcpo_without_semantic_pct", "outside_model_pct",
                "outside_model_and_optimizer_pct"]


def loop_part(args):
    for model in args.models:
        results, per_step = [], []
        for G in args.groups:
            for algo in args.algos:
                print(f"{model} {algo} G={G}: {args.warmup} warm-up + {args.steps} timed steps", flush=True)
                if args.profile:
                    profile_run(model, algo, G, args)
                    continue
                steps = run_loop(model, algo, G, args)
                per_step.append({"algo": algo, "G": G, "steps": steps})
                results.append(summarize(model, algo, G, args, steps))
        if args.profile:
            continue
        header = (f"## Stage times of one train.py step, {model} model (median milliseconds over {args.steps} steps "
                  f"after {args.warmup} warm-up; B = {args.prompts}, max new tokens {args.max_new_tokens}, "
                  f"temperature {args.temperature})\n\n"
                  f"machine: {common.machine()}\n\n")
        common.write_results(f"step_breakdown_{model}", header + common.markdown_table(results, LOOP_COLUMNS, 1),
                             {"machine": common.machine(), "args": vars(args), "results": results,
                              "per_step_seconds": per_step})


def profile_run(model, algo, G, args):
    """cProfile one run_loop call and write the top functions by own time to bench/results."""
    profiler = cProfile.Profile()
    profiler.runcall(run_loop, model, algo, G, args)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    path = common.RESULTS / f"profile_{model}_{algo}_G{G}.txt"
    path.write_text(text.getvalue())
    print(f"wrote {path}")


# ----------------------------------------------------------------------------
# synthetic inputs: the uncertainty functions and the encoder alone

def time_call(function, repeats):
    """Median seconds of `repeats` calls, after one untimed call."""
    function()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        function()
        times.append(time.perf_counter() - t0)
    return common.median(times)


def gcpo_signal(emb, rewards):
    """GCPO's per-step work after embedding: kernel, H_geo, kappa, U and the prompt weights, as train.py does it."""
    K = unc.embedding_kernel(emb, tau=0.5)                                   # (B, G, G)
    u = unc.calibrate(unc.geometric_uncertainty(K), unc.reward_explained_share(K, rewards))  # (B,)
    unc.kernel_dispersion(K)                                                 # (B,), logged
    return uncertainty_weight(u, rescale_over=rewards.amax(-1) != rewards.amin(-1))          # (B,)


def synthetic_texts(tokenizer, n, length):
    """n distinct arithmetic-like texts of exactly `length` tokens of `tokenizer` before truncation."""
    texts = []
    for i in range(n):
        words = " ".join(f"step {k}: {i + k} + {2 * k + 1} = {i + 3 * k + 1}." for k in range(length))
        ids = tokenizer(words, add_special_tokens=False, verbose=False).input_ids[:length]
        texts.append(tokenizer.decode(ids))
    return texts


def synthetic_part(args):
    torch.manual_seed(0)
    B, D = args.prompts_synthetic, 384
    kernel_rows = []
    for G in (4, 8, 16, 32, 64):
        emb = torch.randn(B, G, D, dtype=torch.float64)                     # (B, G, D)
        rewards = (torch.rand(B, G) < 0.5).double()                          # (B, G)
        texts = [f"The answer is $\\boxed{{{i % 5}}}$." for i in range(G)]   # 5 distinct answers per group
        kernel_rows.append({
            "G": G, "B": B,
            "gcpo_signal_ms": 1e3 * time_call(lambda: gcpo_signal(emb, rewards), 20),
            "semantic_clusters_ms": 1e3 * time_call(
                lambda: [train.tasks.cluster_by_answer(texts) for _ in range(B)], 2),
        })
    encoder = models.tiny_encoder() if args.encoder == "tiny" else models.load_encoder(device="cpu")
    embed_rows = []
    for G in args.embed_groups:
        for length in (32, 128, 512):
            texts = synthetic_texts(encoder.tokenizer, G, length)
            seconds = time_call(lambda: encoder.encode(texts, convert_to_tensor=True), args.repeats)
            embed_rows.append({"G": G, "response_tokens": length,
                               "tokens_embedded": min(length + 2, encoder.max_seq_length),
                               "embed_s": seconds, "ms_per_response": 1e3 * seconds / G})
    markdown = (f"## GCPO's uncertainty work on synthetic inputs (median)\n\nmachine: {common.machine()}\n\n"
                f"Kernel, H_geo, kappa and weights for B = {B} groups of G random {D}-d embeddings "
                f"(20 calls), beside semantic clustering with math-verify (2 calls):\n\n"
                + common.markdown_table(kernel_rows, ["G", "B", "gcpo_signal_ms", "semantic_clusters_ms"], 2)
                + f"\n\nSentence-encoder pass ({args.encoder} encoder, {args.repeats} calls) on G texts. "
                f"Tokens past max_seq_length = {encoder.max_seq_length} are truncated:\n\n"
                + common.markdown_table(embed_rows, ["G", "response_tokens", "tokens_embedded", "embed_s",
                                                     "ms_per_response"], 3))
    common.write_results("uncertainty_scaling", markdown,
                         {"machine": common.machine(), "kernel": kernel_rows, "embed": embed_rows})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", nargs="+", default=["loop", "synthetic"], choices=["loop", "synthetic"])
    p.add_argument("--models", nargs="+", default=["tiny"], choices=["tiny", "default"],
                   help="tiny (random 2-layer Llama and 1-layer BERT) or default (SmolLM2-135M and all-MiniLM-L6-v2)")
    p.add_argument("--algos", nargs="+", default=["grpo", "gcpo"], choices=list(train.PRESETS))
    p.add_argument("--groups", nargs="+", type=int, default=[4, 8, 16], help="group sizes G")
    p.add_argument("--prompts", type=int, default=2, help="B, prompts per step")
    p.add_argument("--max-new-tokens", type=int, default=32, help="response length limit in tokens")
    p.add_argument("--temperature", type=float, default=train.Config.temperature,
                   help="sampling temperature (default: train.py's)")
    p.add_argument("--micro-batch", type=int, default=16, help="responses per forward/backward chunk "
                   "(reduced to a divisor of B*G)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--profile", action="store_true", help="cProfile each loop run instead of tabulating it")
    p.add_argument("--encoder", default="default", choices=["tiny", "default"], help="encoder of the synthetic part")
    p.add_argument("--embed-groups", nargs="+", type=int, default=[4, 16, 64], help="G of the encoder timings")
    p.add_argument("--prompts-synthetic", type=int, default=8, help="B of the synthetic kernel timings")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per encoder timing")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    common.set_threads(arguments.threads)
    if "loop" in arguments.part:
        loop_part(arguments)
    if "synthetic" in arguments.part:
        synthetic_part(arguments)
