"""
Train a causal LM with GRPO, SEED-GRPO or GCPO on one GPU or on the CPU.

    python train.py                                   # offline default: SmolLM2-135M on built-in arithmetic
    python train.py --algo grpo --steps 50            # the GRPO baseline
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k --group-size 8   # one GPU, hub access
    python train.py --out runs/x --resume             # continue runs/x from its last checkpoint

Each step runs numbered stages: (1) sample G responses for each of B prompts,
(2) grade them, (3) compute the per-prompt uncertainty signal, (4) calibrate it
with the rewards, (5) turn rewards into regulated advantages, (6) take mu
optimizer steps on the clipped loss, (7) log. Stages 3-5 are the method (see
uncertainty.py and gcpo.py); the rest is plumbing. The run folder --out holds
config.json, metrics.jsonl, samples.jsonl and checkpoint/.

Departures and simplifications:
1. Presets fill in the method's switches: grpo = no signal; seed_grpo = semantic
   entropy, no calibration; gcpo = geometric entropy calibrated by kappa. Every
   switch is also a flag, so each ablation is a flag change.
2. Calibrating a non-kernel signal uses the embedding kernel's kappa, except
   semantic entropy, which uses its own cluster-indicator kernel.
3. With one update per batch (mu = 1) the old log-probs are the detached
   log-probs of the training forward pass: the ratio is exactly 1 and no second
   forward pass is spent on them.
4. The learning rate is constant (no warm-up or decay), so a resumed run and an
   uninterrupted one see the same schedule whatever --steps says.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import gcpo
import rollout
import tasks
import uncertainty as unc
from models import load_encoder, load_policy, pick_device, pick_dtype, tiny_encoder, tiny_policy

PRESETS = {  # algo -> (signal, calibration)
    "grpo": ("none", "none"),
    "seed_grpo": ("semantic", "none"),
    "gcpo": ("geometric", "reward"),
}
SIGNALS = ("none", "token", "predictive", "semantic", "geometric")


def opt(default, text):
    """Make a Config field whose help text doubles as the field's comment."""
    return field(default=default, metadata={"help": text})


@dataclass
class Config:
    # algorithm: preset and the switches it fills in
    algo: str = opt("gcpo", "preset: grpo, seed_grpo, gcpo")
    signal: str = opt("", "uncertainty signal: none, token, predictive, semantic, geometric (empty: from --algo)")
    calibration: str = opt("", "none, reward: multiply the signal by 1 - kappa (empty: from --algo)")
    weight_rule: str = opt("linear", "prompt weight f(U): linear, exp, reciprocal")
    alpha: float = opt(1.0, "strength of the weight rule, typically 0.5-2")
    w_min: float = opt(0.0, "floor of the prompt weight, 0-1")
    rescale: bool = opt(True, "rescale weights to mean 1 over groups with reward spread")
    tau: float = opt(0.5, "RBF kernel bandwidth on the sphere, typically 0.1-1")
    kernel: str = opt("rbf", "rbf, cosine (cosine ignores the sign of a cosine)")
    center_embeddings: bool = opt(False, "centre embeddings on a running mean before the kernel")
    unparsed: str = opt("singleton", "semantic clusters of unparsable answers: singleton, shared")
    semantic_weighting: str = opt("discrete", "semantic entropy estimator: discrete, likelihood")
    adv_scale: str = opt("group", "advantage scale: group (divide by sample std), none (Dr. GRPO)")
    adv_eps: float = opt(1e-4, "added to the group std before dividing")
    eps_low: float = opt(0.2, "lower clip range of the ratio")
    eps_high: float = opt(0.2, "upper clip range of the ratio")
    agg: str = opt("token_mean", "loss aggregation: token_mean, seq_mean_token_mean, seq_sum_constant")
    beta: float = opt(0.0, "k3 KL coefficient to a frozen reference model; 0 loads no reference")
    # data and models
    task: str = opt("arithmetic", "arithmetic, gsm8k, math500 (the latter two from the hub)")
    data: str = opt("", "local JSONL training file; overrides --task's data, keeps its prompt template")
    eval_data: str = opt("", "local JSONL held-out file for evaluation")
    question_field: str = opt("question", "JSONL field with the question")
    answer_field: str = opt("answer", "JSONL field with the reference answer ('#### 42' understood)")
    model: str = opt("SmolLM2-135M-Instruct", "policy: hub id, local folder, the packaged default, or 'tiny'")
    encoder: str = opt("all-MiniLM-L6-v2", "sentence encoder: hub id, local folder, the packaged default, or 'tiny'")
    # sampling
    steps: int = opt(20, "training steps (one batch of prompts each)")
    # the sampling and optimisation defaults are sized so the 135M default policy trains in minutes
    # on a CPU; on a GPU raise B, G, max_new_tokens and lower lr for larger models
    prompts_per_step: int = opt(4, "B, prompts per step")
    group_size: int = opt(8, "G, responses sampled per prompt, >= 2")
    max_new_tokens: int = opt(32, "response length limit in tokens")
    temperature: float = opt(0.7, "sampling temperature; log-probs use the same temperature")
    # optimisation
    lr: float = opt(2e-5, "AdamW learning rate (constant)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    mu: int = opt(1, "optimizer steps per batch; > 1 stores old log-probs from a scoring pass")
    micro_batch: int = opt(16, "responses per forward/backward chunk; must divide B*G")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    # run
    seed: int = opt(0, "seed for data order, sampling and initialisation")
    out: str = opt("runs/default", "run folder: config.json, metrics.jsonl, samples.jsonl, checkpoint/")
    resume: bool = opt(False, "continue from OUT/checkpoint with the same data order and RNG state")
    eval_items: int = opt(100, "held-out items for greedy accuracy at the start and end (0: off)")
    eval_every: int = opt(0, "also evaluate every N steps (0: only start and end)")
    save_every: int = opt(10, "checkpoint every N steps (and at the end), >= 1")
    sample_every: int = opt(5, "print one sampled completion every N steps")
    log_signals: bool = opt(True, "compute and log every uncertainty signal, not only the one in use")


def resolve(cfg):
    """Fill preset switches and reject invalid settings before any model is loaded."""
    if cfg.algo not in PRESETS:
        raise ValueError(f"unknown --algo {cfg.algo!r}; use one of {list(PRESETS)}")
    signal, calibration = PRESETS[cfg.algo]
    cfg.signal = cfg.signal or signal
    cfg.calibration = cfg.calibration or calibration
    if cfg.signal not in SIGNALS:
        raise ValueError(f"unknown --signal {cfg.signal!r}; use one of {SIGNALS}")
    if cfg.calibration not in ("none", "reward"):
        raise ValueError(f"unknown --calibration {cfg.calibration!r}; use none or reward")
    choices = {"weight_rule": ("linear", "exp", "reciprocal"), "agg": gcpo.AGGREGATIONS,
               "kernel": ("rbf", "cosine"), "adv_scale": ("group", "none"),
               "unparsed": ("singleton", "shared"), "semantic_weighting": ("discrete", "likelihood")}
    for name, valid in choices.items():
        if getattr(cfg, name) not in valid:
            raise ValueError(f"invalid --{name.replace('_', '-')} {getattr(cfg, name)!r}; use one of {list(valid)}")
    if cfg.save_every < 1:
        raise ValueError(f"--save-every must be >= 1, got {cfg.save_every}")
    if cfg.group_size < 2:
        raise ValueError(f"--group-size must be >= 2 for group-relative advantages, got {cfg.group_size}")
    n = cfg.prompts_per_step * cfg.group_size
    if cfg.micro_batch < 1 or n % cfg.micro_batch:
        raise ValueError(f"--micro-batch {cfg.micro_batch} must divide the {n} responses per step "
                         f"(--prompts-per-step x --group-size); try a divisor of {n}")
    if cfg.temperature <= 0:
        raise ValueError("--temperature must be > 0 for training: the loss needs the sampling distribution")
    for name in ("steps", "prompts_per_step", "max_new_tokens", "mu"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    return cfg


def parse_args(argv=None):
    """Build the command line from Config's fields; on --resume, saved values fill unset flags."""
    p = argparse.ArgumentParser(description="GRPO / SEED-GRPO / GCPO training", argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=type(f.default), help=f.metadata["help"] + f" (default {f.default!r})")
    given = vars(p.parse_args(argv))
    base = Config()
    saved = os.path.join(given.get("out", base.out), "config.json")
    if given.get("resume") and os.path.exists(saved):
        with open(saved) as fh:
            base = Config(**json.load(fh))
    return resolve(dataclasses.replace(base, **given))


# ----------------------------------------------------------------------------
# plumbing: seeding, checkpoints, logging

def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out, model, tokenizer, optimizer, step, emb_mean):
    """Write OUT/checkpoint atomically: into a temporary folder first, then swap it in."""
    final, tmp, old = (os.path.join(out, name) for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), "emb_mean": emb_mean},
               os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def batch_items(items, step, batch_size, seed):
    """Prompts of one step: a seeded permutation per epoch, so the order depends only on (seed, step)."""
    per_epoch = len(items) // batch_size
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(items))
    return [items[i] for i in order[k * batch_size:(k + 1) * batch_size]]


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def log_line(step, steps, m):
    return (f"step {step}/{steps} | reward {m['reward_mean']:.3f} +- {m['reward_std']:.3f} | "
            f"zero-spread {m['zero_spread_frac']:.2f} | unparsed {m['unparsed_frac']:.2f} | "
            f"U {m['u_mean']:.3f} | w {m['w_mean']:.2f} +- {m['w_std']:.2f} | loss {m['loss']:+.4f} | "
            f"clip {m['clip_frac_low']:.3f}/{m['clip_frac_high']:.3f} | kl {m['approx_kl']:.2e} | "
            f"entropy {m['token_entropy']:.3f} | len {m['response_len']:.1f} | {m['time_step']:.1f}s")


# ----------------------------------------------------------------------------
# the method: stages 3-5 for one batch

def uncertainty_signals(cfg, texts, rewards, emb, logp, entropy, mask, vocab_size):
    """Return every requested per-prompt signal, (B,) each, and the kappa of the chosen kernel."""
    B, G = rewards.shape
    want = {cfg.signal} | (set(SIGNALS) - {"none"} if cfg.log_signals else set())
    out = {}
    K = None
    if emb is not None:
        K = unc.embedding_kernel(emb.view(B, G, -1).double(), tau=cfg.tau, kind=cfg.kernel)  # (B, G, G)
        out["geometric"] = unc.geometric_uncertainty(K).float()                                  # (B,)
        out["dispersion"] = unc.kernel_dispersion(K).float()                                     # (B,)
        out["kappa"] = unc.reward_explained_share(K, rewards.double()).float()                   # (B,)
    if "semantic" in want:
        ids = torch.tensor([tasks.cluster_by_answer(texts[b * G:(b + 1) * G], cfg.unparsed) for b in range(B)])
        seq_logp = None
        if cfg.semantic_weighting == "likelihood":
            seq_logp = (logp * mask).sum(-1).view(B, G)                                          # (B, G)
        out["semantic"] = unc.semantic_uncertainty(ids, seq_logp)                                # (B,)
        out["kappa_semantic"] = unc.reward_explained_share(unc.cluster_kernel(ids), rewards)     # (B,)
    if logp is not None and ("token" in want or "predictive" in want):
        out["token"] = unc.token_uncertainty(entropy.view(B, G, -1), mask.view(B, G, -1), vocab_size)
        out["predictive"] = unc.predictive_uncertainty(logp.view(B, G, -1), mask.view(B, G, -1))
    return out


def prompt_uncertainty(cfg, signals, B):
    """(3)-(4) The chosen per-prompt uncertainty U, calibrated when asked: (B,)."""
    if cfg.signal == "none":
        return torch.zeros(B)
    u = signals[cfg.signal]
    if cfg.calibration == "reward":
        kappa = signals["kappa_semantic"] if cfg.signal == "semantic" else signals["kappa"]
        u = unc.calibrate(u, kappa)
    return u


# ----------------------------------------------------------------------------

def train(cfg):
    if not cfg.resume and os.path.exists(os.path.join(cfg.out, "metrics.jsonl")):
        if os.path.exists(os.path.join(cfg.out, "checkpoint")):
            raise FileExistsError(f"{cfg.out} already contains a run; pass --resume to continue it, "
                                  f"or choose another --out (nothing was overwritten)")
        raise FileExistsError(f"{cfg.out} contains a run that stopped before its first checkpoint, so it "
                              f"cannot be resumed; choose another --out, or delete {cfg.out} to start over "
                              f"(nothing was overwritten)")
    os.makedirs(cfg.out, exist_ok=True)
    print(json.dumps(dataclasses.asdict(cfg), indent=1))
    with open(os.path.join(cfg.out, "config.json"), "w") as fh:
        json.dump(dataclasses.asdict(cfg), fh, indent=1)
    device = pick_device()
    dtype = pick_dtype(device)

    ckpt = os.path.join(cfg.out, "checkpoint")
    start, emb_mean, state = 0, None, None
    if cfg.resume:
        if not os.path.exists(os.path.join(ckpt, "trainer_state.pt")):
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt}; run without --resume to start fresh")
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
        start, emb_mean = state["step"], state["emb_mean"]
    model_name = ckpt if state else cfg.model
    if model_name == "tiny":
        model, tok = tiny_policy(seed=cfg.seed)
        model.to(device)
    else:
        model, tok = load_policy(model_name, device=device, dtype=dtype)
    model.eval()  # no dropout: rollout and training must see the same distribution
    ref = None
    if cfg.beta > 0:
        ref = (tiny_policy(seed=cfg.seed)[0].to(device) if cfg.model == "tiny"
               else load_policy(cfg.model, device=device, dtype=dtype)[0]).eval().requires_grad_(False)
    need_emb = cfg.signal == "geometric" or cfg.calibration == "reward" or cfg.log_signals
    encoder = None
    if need_emb:
        encoder = tiny_encoder() if cfg.encoder == "tiny" else load_encoder(cfg.encoder, device=device)
    # The fused kernel (CUDA, and the CPU since torch 2.4) updates all tensors in one call.
    # bench/hotspots.py measured it 3.5x faster than the default per-tensor loop on a 2-core CPU.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cuda", "cpu"))
    # seeded after loading, because the first load converts the packaged model and draws
    # from torch's RNG, which would make a first run differ from every later one
    seed_all(cfg.seed)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])

    train_items = tasks.load_items(cfg.task, cfg.data or None, "train", seed=cfg.seed,
                                   question_field=cfg.question_field, answer_field=cfg.answer_field)
    if len(train_items) < cfg.prompts_per_step:
        raise ValueError(f"{len(train_items)} training items is fewer than --prompts-per-step {cfg.prompts_per_step}")
    eval_items = []
    if cfg.eval_items and (cfg.eval_data or not cfg.data):
        eval_items = tasks.load_items(cfg.task, cfg.eval_data or None, "test", n=cfg.eval_items, seed=cfg.seed,
                                      question_field=cfg.question_field, answer_field=cfg.answer_field)
        eval_items = eval_items[:cfg.eval_items]

    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    keep_metrics(metrics_path, start)
    if eval_items and start == 0:
        log_eval(cfg, model, tok, eval_items, 0, metrics_path)

    B, G, N = cfg.prompts_per_step, cfg.group_size, cfg.prompts_per_step * cfg.group_size
    for step in tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, desc="train", file=sys.stderr):
        t = {}
        t0 = time.perf_counter()
        items = batch_items(train_items, step - 1, B, cfg.seed)

        # (1) sample G responses per prompt; score them now only if the loss needs stored old
        # log-probs (mu > 1) or the chosen signal needs log-probs before the advantages
        needs_scores = cfg.mu > 1 or cfg.signal in ("token", "predictive") or (
            cfg.signal == "semantic" and cfg.semantic_weighting == "likelihood")
        prompts = rollout.render_prompts(tok, [tasks.build_messages(it, cfg.task) for it in items])
        with torch.no_grad():
            ro = rollout.generate_groups(model, tok, prompts, G, cfg.max_new_tokens, cfg.temperature, score=False)
            t_sub = {"old_logp": time.perf_counter()}  # parts of a stage: logged, not summed into time_step
            if needs_scores:
                ro.logp, ro.entropy = rollout.completion_logprobs(
                    model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask,
                    cfg.temperature, with_entropy=True)                                          # (N, T) each
            t_sub["old_logp"] = time.perf_counter() - t_sub["old_logp"]
        mask = ro.completion_mask.float()                                                        # (N, T)
        t["sample"] = time.perf_counter() - t0

        # (2) reward: 1 if the final answer is equivalent to the reference, else 0
        t0 = time.perf_counter()
        graded = [tasks.grade(text, items[i // G].answer) for i, text in enumerate(ro.texts)]
        rewards = torch.tensor([r for r, _ in graded], dtype=torch.float32).view(B, G)         # (B, G)
        for b in range(B):
            if not torch.isfinite(rewards[b]).all():
                raise ValueError(f"reward is NaN or inf for prompt {items[b].question!r}; fix the reward function")
        n_unparsed = sum(not parsed for _, parsed in graded)
        t["reward"] = time.perf_counter() - t0

        # (3) uncertainty: embed all N responses in one batch, then per-prompt signals
        t0 = time.perf_counter()
        emb = None
        if encoder is not None:
            with torch.no_grad():
                emb = encoder.encode(ro.texts, convert_to_tensor=True).float().cpu()              # (N, D)
            if cfg.center_embeddings:
                batch_mean = emb.mean(0)                                                         # (D,)
                emb_mean = batch_mean if emb_mean is None else 0.99 * emb_mean + 0.01 * batch_mean
                emb = unc.center_embeddings(emb, emb_mean)                                       # (N, D)
        t["embed"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        logp_s = ro.logp.cpu() if ro.logp is not None else None
        ent_s = ro.entropy.cpu() if ro.entropy is not None else None
        signals = uncertainty_signals(cfg, ro.texts, rewards, emb, logp_s, ent_s, mask.cpu(),
                                      model.config.vocab_size)

        # (4) calibration: U = signal * (1 - kappa) when asked
        u = prompt_uncertainty(cfg, signals, B)                                                  # (B,)

        # (5) regulated advantages A_hat = w(U) * A
        adv = gcpo.group_advantages(rewards, scale=cfg.adv_scale, eps=cfg.adv_eps)               # (B, G)
        spread = gcpo.has_reward_spread(rewards)                                                 # (B,)
        w = gcpo.uncertainty_weight(u, cfg.weight_rule, cfg.alpha, cfg.w_min,
                                    rescale_over=spread if cfg.rescale else None)               # (B,)
        adv_hat = gcpo.regulate_advantages(adv, w).flatten().to(device)                         # (N,)
        t["uncertainty"] = time.perf_counter() - t0

        # (6) mu optimizer steps on the clipped loss, accumulated over micro-batches
        t0 = time.perf_counter()
        t_sub["ref_logp"], t_sub["optimizer"] = 0.0, 0.0
        loss_m, entropy_sum = {}, 0.0
        n_tokens = mask.sum().clamp_min(1)
        for _ in range(cfg.mu):
            optimizer.zero_grad(set_to_none=True)
            loss_m = {}
            for s in range(0, N, cfg.micro_batch):
                sl = slice(s, s + cfg.micro_batch)
                logp, ent = rollout.completion_logprobs(model, ro.prompt_ids[sl], ro.prompt_mask[sl],
                                                        ro.completion_ids[sl], ro.completion_mask[sl],
                                                        cfg.temperature, with_entropy=True)      # (n, T)
                logp_old = ro.logp[sl] if ro.logp is not None else logp.detach()
                logp_ref = None
                if ref is not None:
                    t_ref = time.perf_counter()
                    with torch.no_grad():
                        logp_ref, _ = rollout.completion_logprobs(ref, ro.prompt_ids[sl], ro.prompt_mask[sl],
                                                                  ro.completion_ids[sl], ro.completion_mask[sl],
                                                                  cfg.temperature)
                    t_sub["ref_logp"] += time.perf_counter() - t_ref
                loss, m = gcpo.gcpo_loss(logp, logp_old, adv_hat[sl], ro.completion_mask[sl],
                                         cfg.eps_low, cfg.eps_high, cfg.agg, logp_ref, cfg.beta,
                                         max_tokens=cfg.max_new_tokens)
                # micro-batch means weighted back into the mean over the whole batch
                share = (mask[sl].sum() / n_tokens).item() if cfg.agg == "token_mean" else cfg.micro_batch / N
                (loss * share).backward()
                for k, v in m.items():
                    if k == "tokens":
                        loss_m[k] = loss_m.get(k, 0) + v
                    elif k in ("ratio_max", "ratio_min"):
                        pick = max if k == "ratio_max" else min
                        loss_m[k] = pick(loss_m.get(k, v), v)
                    else:
                        loss_m[k] = loss_m.get(k, 0.0) + v * share
                entropy_sum += (ent * ro.completion_mask[sl]).sum().item()
            t_opt = time.perf_counter()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
            optimizer.step()
            t_sub["optimizer"] += time.perf_counter() - t_opt
        t["optimize"] = time.perf_counter() - t0
        # the policy's forward, loss and backward: the rest of stage 6
        t_sub["forward_backward"] = t["optimize"] - t_sub["ref_logp"] - t_sub["optimizer"]

        # (7) log one line, the metrics row, and now and then a sampled completion
        t["step"] = sum(t.values())
        row = {"step": step,
               "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
               "zero_spread_frac": 1.0 - spread.float().mean().item(),
               "unparsed_frac": n_unparsed / N, "truncated_frac": ro.truncated.float().mean().item(),
               "response_len": mask.sum(-1).mean().item(),
               "u_mean": u.mean().item(), "w_mean": w.mean().item(), "w_std": w.std().item() if B > 1 else 0.0,
               "token_entropy": entropy_sum / cfg.mu / n_tokens.item(),
               "grad_norm": grad_norm, **loss_m,
               **{f"signal_{k}": v.mean().item() for k, v in signals.items()},
               **{f"time_{k}": v for k, v in t.items()}, **{f"time_{k}": v for k, v in t_sub.items()},
               "peak_mem_gb": peak_memory_gb(device)}
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        tqdm.write(log_line(step, cfg.steps, row), file=sys.stdout)
        if cfg.sample_every and step % cfg.sample_every == 0:
            sample = {"step": step, "question": items[0].question, "answer": items[0].answer,
                      "completion": ro.texts[0], "reward": rewards[0, 0].item()}
            tqdm.write(f"  sample | reward {sample['reward']:.0f} | {sample['question']!r} -> {sample['completion']!r}")
            with open(os.path.join(cfg.out, "samples.jsonl"), "a") as fh:
                fh.write(json.dumps(sample) + "\n")
        if eval_items and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            log_eval(cfg, model, tok, eval_items, step, metrics_path)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(cfg.out, model, tok, optimizer, step, emb_mean)

    if eval_items and cfg.steps > start:
        log_eval(cfg, model, tok, eval_items, cfg.steps, metrics_path)
    return metrics_path


def keep_metrics(path, step):
    """Drop metric and sample rows after `step`, so a resumed run does not log a step twice."""
    for p in (path, os.path.join(os.path.dirname(path), "samples.jsonl")):
        if not os.path.exists(p):
            continue
        with open(p) as fh:
            rows = [line for line in fh if json.loads(line).get("step", 0) <= step]
        with open(p, "w") as fh:
            fh.writelines(rows)


def log_eval(cfg, model, tok, items, step, metrics_path):
    """Greedy accuracy on held-out items, logged as one line and one metrics row."""
    from eval import greedy_accuracy
    t0 = time.perf_counter()
    acc = greedy_accuracy(model, tok, items, cfg.task, cfg.max_new_tokens)
    row = {"step": step, "eval_greedy_acc": acc, "eval_items": len(items), "time_eval": time.perf_counter() - t0}
    with open(metrics_path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    tqdm.write(f"eval step {step} | greedy accuracy {acc:.3f} on {len(items)} held-out items | "
               f"{row['time_eval']:.1f}s", file=sys.stdout)


if __name__ == "__main__":
    train(parse_args())
