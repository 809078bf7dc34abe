"""
Tokens per second of rollout.generate_groups against a bare model.generate call on
the same batch, and the cost of scoring (score=True) inside generate_groups.

The bare call gets the prompts already tokenized, repeated G times and left-padded
exactly as generate_groups builds them, and the same GenerationConfig
(rollout.sampling_config: plain sampling at the given temperature). Only
model.generate is timed for it. generate_groups is timed whole: tokenizing, the
loss mask, decoding, and with score=True the scoring forward pass. Each repeat
reseeds torch before every call with the same seed, so all three calls sample the
same tokens (checked), and the ratio is the overhead alone. The call order rotates
between repeats so that a load change on a shared machine does not favour one call.

    python bench/rollout_throughput.py --model tiny
    python bench/rollout_throughput.py --model default --repeats 3

Tokens per second count response tokens up to and including the first EOS
(completion_mask), summed over the N = B*G responses.
"""
import argparse
import time

import common
import torch
from transformers.generation.utils import GenerationMixin

import models
import rollout
import tasks
import train

MODES = ("bare_generate", "generate_groups", "generate_groups_score")


def build_batch(model, tokenizer, prompts, group_size):
    """Build the (N, P) input ids and attention mask that generate_groups builds from `prompts`."""
    encoded = tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    ids = encoded.input_ids.repeat_interleave(group_size, dim=0).to(model.device)          # (N, P)
    mask = encoded.attention_mask.repeat_interleave(group_size, dim=0).to(model.device)    # (N, P)
    return ids, mask


def timed(mode, model, tokenizer, prompts, args, batch, config, seed):
    """
    Run one mode with a fixed seed.

    Returns (seconds of the call, seconds inside model.generate during it, completion
    ids (N, T), completion mask (N, T)). The second number is measured in the same
    call, so the overhead share it gives is free of load changes between calls.
    """
    inside = []
    original = GenerationMixin.generate

    def generate_timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            inside.append(time.perf_counter() - t0)

    torch.manual_seed(seed)
    GenerationMixin.generate = generate_timed
    try:
        t0 = time.perf_counter()
        if mode == "bare_generate":
            ids, mask = batch
            with torch.no_grad():
                sequences = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)  # (N, P+T)
            seconds = time.perf_counter() - t0
            completion = sequences[:, ids.shape[1]:]                                                    # (N, T)
            eos_ids = rollout.eos_token_ids(model, tokenizer)
            completion_mask, _ = rollout.completion_mask_from_ids(completion, eos_ids)                 # (N, T)
        else:
            ro = rollout.generate_groups(model, tokenizer, prompts, args.group_size, args.max_new_tokens,
                                         args.temperature, score=mode == "generate_groups_score")
            seconds = time.perf_counter() - t0
            completion, completion_mask = ro.completion_ids, ro.completion_mask
    finally:
        GenerationMixin.generate = original
    return seconds, sum(inside), completion, completion_mask


def main(args):
    if args.model == "tiny":
        model, tokenizer = models.tiny_policy(seed=0)
    else:
        model, tokenizer = models.load_policy(models.DEFAULT_POLICY)
    model.eval()
    items = tasks.load_items("arithmetic", None, "train", seed=0)[:args.prompts]
    prompts = rollout.render_prompts(tokenizer, [tasks.build_messages(it, "arithmetic") for it in items])
    batch = build_batch(model, tokenizer, prompts, args.group_size)
    config = rollout.sampling_config(args.max_new_tokens, args.temperature,
                                     rollout.eos_token_ids(model, tokenizer), tokenizer.pad_token_id)

    times = {mode: [] for mode in MODES}
    inside = {mode: [] for mode in MODES}
    tokens = {mode: [] for mode in MODES}
    same_tokens = True
    for r in range(-1, args.repeats):  # repeat -1 is an untimed warm-up
        k = max(r, 0) % len(MODES)
        outputs = {}
        for mode in MODES[k:] + MODES[:k]:
            seconds, generate_s, ids, mask = timed(mode, model, tokenizer, prompts, args, batch, config,
                                                   seed=1000 + r)
            outputs[mode] = ids
            if r >= 0:
                times[mode].append(seconds)
                inside[mode].append(generate_s)
                tokens[mode].append(int(mask.sum()))
        same_tokens &= all(torch.equal(outputs[mode], outputs["bare_generate"]) for mode in MODES)

    rows = []
    for mode in MODES:
        tokens_per_s = [n / s for n, s in zip(tokens[mode], times[mode])]
        rows.append({"call": mode, "repeats": args.repeats, "median_s": common.median(times[mode]),
                     "response_tokens": common.median(tokens[mode]),
                     "tokens_per_s": common.median(tokens_per_s),
                     "generate_share": common.median([g / s for g, s in zip(inside[mode], times[mode])])})
    bare = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_bare"] = row["tokens_per_s"] / bare
    markdown = (f"## Rollout throughput, {args.model} model\n\nB = {args.prompts}, G = {args.group_size}, "
                f"max new tokens {args.max_new_tokens}, temperature {args.temperature}, median of "
                f"{args.repeats} repeats after one warm-up, torch threads {args.threads or 'default'}\n\n"
                f"machine: {common.machine()}\n\n"
                + common.markdown_table(rows, ["call", "repeats", "median_s", "response_tokens", "tokens_per_s",
                                               "vs_bare", "generate_share"])
                + f"\n\nAll three calls sampled identical tokens in every repeat: {same_tokens}. "
                "vs_bare compares separate calls, so it carries the machine's load noise. generate_share "
                "(seconds inside model.generate / seconds of the call, measured within each call) is the "
                "load-independent estimate of the same ratio for score=False.")
    common.write_results(f"rollout_throughput_{args.model}", markdown,
                         {"machine": common.machine(), "args": vars(args), "rows": rows,
                          "same_tokens": same_tokens, "times": times, "inside_generate": inside,
                          "tokens": tokens})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "default"],
                   help="tiny (a random 2-layer Llama) or default (SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", type=int, default=2, help="B, prompts in the batch")
    p.add_argument("--group-size", type=int, default=8, help="G, responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="response length limit in tokens")
    p.add_argument("--temperature", type=float, default=train.Config.temperature,
                   help="sampling temperature, > 0 (default: train.py's)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each call")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    common.set_threads(arguments.threads)
    main(arguments)
