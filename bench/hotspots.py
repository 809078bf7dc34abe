"""
Time the two pieces of a train.py step that are neither generation, the model's
forward and backward, nor GCPO's. They are the AdamW update and the log-prob head of
rollout.completion_logprobs: log-softmax, gather and token entropy over the vocabulary,
timed here together with the output projection that feeds them.

Part "optimizer" times optimizer.step of torch.optim.AdamW over the policy's
parameters, filled with random gradients, in its three implementations: the
per-parameter loop (what torch.optim.AdamW uses on the CPU when neither option is
given), foreach=True, and fused=True.
Part "head" calls the real rollout.completion_logprobs on a stand-in model whose
forward is only the output projection (D = 576, V = 49152 by default, as in
SmolLM2-135M), so the time is the head's alone, forward plus backward, with
with_entropy True (what train.py's loss pass requests) and False, each in a fresh
process that also reports how far the call raised its peak resident memory.

    python bench/hotspots.py --model tiny
    python bench/hotspots.py --model default --threads 1
"""
import argparse
import multiprocessing
import time
from types import SimpleNamespace

import common
import torch

import models
import rollout

OPTIMIZERS = {"loop (torch default on CPU)": dict(foreach=False, fused=False),
              "foreach": dict(foreach=True, fused=False),
              "fused": dict(foreach=False, fused=True)}


def time_optimizer(params, options, repeats):
    """Median seconds of one AdamW step over `params`, after one untimed step."""
    optimizer = torch.optim.AdamW(params, lr=1e-5, **options)
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        optimizer.step()
        if r:
            times.append(time.perf_counter() - t0)
    return common.median(times)


class OutputProjection(torch.nn.Module):
    """A stand-in causal LM whose logits are a fixed random embedding times a trainable output matrix."""

    def __init__(self, vocab, dim):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim).requires_grad_(False)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        hidden = self.embed(input_ids[:, -logits_to_keep:])                      # (N, T, D)
        return SimpleNamespace(logits=self.head(hidden))                         # (N, T, V)


def time_head(n, T, vocab, dim, with_entropy, repeats, threads):
    """
    Time completion_logprobs forward + backward through the stand-in head, in a fresh process.

    Returns (median seconds, GiB by which the first call raised the process's peak
    resident memory). The memory figure includes the head's weight gradient
    (V * D * 4 bytes) and every (N, T, V) temporary alive at the peak.
    """
    common.set_threads(threads)
    model = OutputProjection(vocab, dim)
    prompt_ids = torch.randint(vocab, (n, 8))                                    # (N, P)
    completion_ids = torch.randint(vocab, (n, T))                                # (N, T)
    ones_prompt, ones_completion = torch.ones_like(prompt_ids), torch.ones(n, T)
    times = []
    peak_before = common.peak_rss_gb()
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        logp, _ = rollout.completion_logprobs(model, prompt_ids, ones_prompt, completion_ids, ones_completion,
                                              temperature=1.0, with_entropy=with_entropy)  # (N, T)
        logp.sum().backward()
        model.head.weight.grad = None
        if r:
            times.append(time.perf_counter() - t0)
        else:
            peak_growth = common.peak_rss_gb() - peak_before
    return common.median(times), peak_growth


def main(args):
    rows_optimizer, rows_head = [], []
    if "optimizer" in args.part:
        policy = models.tiny_policy()[0] if args.model == "tiny" else models.load_policy(device="cpu")[0]
        params = [p for p in policy.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p)
        for name, options in OPTIMIZERS.items():
            rows_optimizer.append({"AdamW": name, "parameters_M": sum(p.numel() for p in params) / 1e6,
                                   "step_ms": 1e3 * time_optimizer(params, options, args.repeats)})
    if "head" in args.part:
        for T in args.response_tokens:
            for with_entropy in (True, False):
                # a fresh process per measurement, so each peak-memory figure is its own
                with multiprocessing.get_context("spawn").Pool(1) as pool:
                    seconds, peak_gb = pool.apply(time_head, (args.responses, T, args.vocab, args.dim,
                                                              with_entropy, args.repeats, args.threads))
                rows_head.append({"N": args.responses, "T": T, "V": args.vocab, "with_entropy": with_entropy,
                                  "forward_backward_s": seconds, "peak_growth_gb": peak_gb,
                                  "logits_gb": args.responses * T * args.vocab * 4 / 2**30})
    markdown = (f"## Optimizer step and log-prob head, {args.model} model (median of {args.repeats})\n\n"
                f"machine: {common.machine()}\n\n"
                + common.markdown_table(rows_optimizer, ["AdamW", "parameters_M", "step_ms"], 2)
                + f"\n\nrollout.completion_logprobs on a head-only model (D = {args.dim}). logits_gb is the "
                "size of one float32 (N, T, V) tensor:\n\n"
                + common.markdown_table(rows_head, ["N", "T", "V", "with_entropy", "forward_backward_s",
                                                    "peak_growth_gb", "logits_gb"])
                + "\n\npeak_growth_gb: how far the first call raised the peak resident memory of a fresh process.")
    common.write_results(f"hotspots_{args.model}", markdown, {"machine": common.machine(), "args": vars(args),
                                                              "optimizer": rows_optimizer, "head": rows_head})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", nargs="+", default=["optimizer", "head"], choices=["optimizer", "head"])
    p.add_argument("--model", default="tiny", choices=["tiny", "default"],
                   help="whose parameters the optimizer part updates")
    p.add_argument("--responses", type=int, default=16, help="N, responses in the head's batch")
    p.add_argument("--response-tokens", nargs="+", type=int, default=[32, 128], help="T values of the head part")
    p.add_argument("--vocab", type=int, default=49152, help="V of the head part")
    p.add_argument("--dim", type=int, default=576, help="hidden size D of the head part")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    common.set_threads(arguments.threads)
    main(arguments)
