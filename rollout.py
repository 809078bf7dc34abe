"""
Group sampling: G responses per prompt, their loss mask, and their log-probabilities.

This is the data path of GRPO and GCPO: responses o_1..o_G ~ pi_old(.|q) for each
prompt q, the per-token log-probabilities log pi(o_i,t | q, o_i,<t) that the clipped
ratio needs, and the per-token entropy that the token-entropy baseline averages.

    prompts = render_prompts(tokenizer, [[{"role": "user", "content": "What is 2+3?"}]])
    rollout = generate_groups(model, tokenizer, prompts, group_size=8, max_new_tokens=256)
    logp, _ = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask,
                                  rollout.completion_ids, rollout.completion_mask, temperature=1.0)

Shape legend: B prompts, G responses per prompt, N = B*G responses (the G responses
of prompt b are rows b*G .. b*G+G-1), P prompt tokens (left-padded), T response
tokens, V vocabulary.

Departures and simplifications:
1. Log-probabilities and entropies are taken from softmax(logits / temperature), the
   distribution that was sampled from, because generation runs with top-k, top-p and
   repetition penalties switched off. Greedy decoding (temperature <= 0) is scored
   at temperature 1.
2. The loss mask includes the first EOS token, so the policy learns when to stop.
   Everything after it is masked. A response with no EOS within max_new_tokens is
   marked truncated and kept in full.
3. The log-probabilities come from one fresh forward pass over prompt + response,
   not from generate's own scores, so they are exact for the weights they are
   computed with. They still differ from generate's KV-cached logits by float
   rounding (under 1e-6 for the tiny float32 test model, more in bf16).
"""
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

# Maximum number of float32 elements in one (rows, T, V) chunk of logits. Without
# grad this bounds each float32 temporary to 256 MiB whatever N is. Under grad,
# autograd keeps every chunk's scaled logits for the backward pass.
_CHUNK_ELEMENTS = 2**26

# Generation options whose only neutral value is None. generate fills a None field of
# the passed GenerationConfig from model.generation_config, so these cannot be reset
# here and are rejected when the model sets them.
_UNRESETTABLE_OPTIONS = (
    "bad_words_ids", "sequence_bias", "forced_bos_token_id", "forced_eos_token_id",
    "exponential_decay_length_penalty", "watermarking_config", "top_h", "stop_strings",
)


@dataclass
class Rollout:
    """A batch of B prompts x G sampled responses, flattened to N = B*G rows, all on the model's device."""
    prompt_ids: torch.Tensor        # (N, P) long, left-padded, rows b*G .. b*G+G-1 share prompt b
    prompt_mask: torch.Tensor       # (N, P) long, 1 on prompt tokens, 0 on left padding
    completion_ids: torch.Tensor    # (N, T) long, right-padded with the pad id after EOS
    completion_mask: torch.Tensor   # (N, T) float 0/1, 1 up to and including the first EOS
    truncated: torch.Tensor         # (N,) bool, no EOS within max_new_tokens
    logp: torch.Tensor | None       # (N, T) float32, log-prob of each sampled token at the sampling temperature, 0 where masked
    entropy: torch.Tensor | None    # (N, T) float32, full-distribution entropy at the sampling temperature in nats, 0 where masked
    texts: list[str]                # N decoded responses up to the first EOS, special tokens skipped


def render_prompts(tokenizer, messages: list[list[dict]]) -> list[str]:
    """
    Render chat conversations as prompt strings ending where the assistant's reply starts.

    A tokenizer without a chat template gets the message contents joined by newlines,
    after its BOS token when it has one. The BOS token is added here because
    generate_groups tokenises with add_special_tokens=False.
    """
    if tokenizer.chat_template:
        return [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    bos = tokenizer.bos_token or ""
    return [bos + "\n".join(message["content"] for message in m) + "\n" for m in messages]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Collect the ids that end a response: the generation config's EOS id or ids, plus the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.add(tokenizer.eos_token_id)
    ids.discard(None)
    return sorted(ids)


def completion_mask_from_ids(ids: torch.Tensor, eos_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Loss mask and truncation flag of right-padded responses.

    A token is kept when no EOS comes before it, so the first EOS is kept and
    everything after it is not. This stays right when the pad id equals an EOS id,
    because only the first EOS counts. Returns (mask (N, T) float 0/1, truncated (N,) bool).
    """
    is_eos = torch.isin(ids, torch.as_tensor(list(eos_ids), dtype=ids.dtype, device=ids.device))  # (N, T)
    eos_before = is_eos.long().cumsum(dim=-1) - is_eos.long()                                      # (N, T)
    mask = (eos_before == 0).float()                                                               # (N, T)
    truncated = ~is_eos.any(dim=-1)                                                                # (N,)
    return mask, truncated


def sampling_config(max_new_tokens: int, temperature: float, eos_ids, pad_id) -> GenerationConfig:
    """
    Build a GenerationConfig that samples from softmax(logits / temperature) exactly, or greedily when temperature <= 0.

    Every option that reshapes the distribution is set to its neutral value.
    Otherwise generate takes it from model.generation_config, where many chat models
    set top_k, top_p or repetition_penalty, and the log-probabilities would no longer
    describe the distribution that was sampled from.
    """
    neutral = dict(
        repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,  # generate then ignores min_length
        suppress_tokens=[], begin_suppress_tokens=[], renormalize_logits=False,
    )
    common = dict(max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids) or None, pad_token_id=pad_id,
                  num_beams=1, num_return_sequences=1, **neutral)
    if temperature <= 0:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=0.0,
        typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, **common,
    )


@torch.no_grad()
def generate_groups(model, tokenizer, prompts: list[str], group_size: int, max_new_tokens: int,
                    temperature: float = 1.0, score: bool = True) -> Rollout:
    """
    Sample `group_size` responses to each prompt, with their loss mask and, when `score`, log-probs and entropies.

    Prompts are strings already rendered by render_prompts. The model's train/eval
    mode is left as it is. Pass score=False when the caller takes the old
    log-probabilities from its own forward pass.
    """
    if group_size < 1 or max_new_tokens < 1:
        raise ValueError(f"group_size and max_new_tokens must be >= 1, got {group_size} and {max_new_tokens}")
    leftover = [name for name in _UNRESETTABLE_OPTIONS if getattr(model.generation_config, name, None) is not None]
    if leftover:
        raise ValueError(
            f"model.generation_config sets {leftover}, which would change the sampling distribution "
            "that the log-probabilities describe; set them to None before sampling"
        )
    device = model.device

    # Left padding keeps every prompt's last token in the last column, where generation continues.
    encoded = tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    prompt_ids = encoded.input_ids.repeat_interleave(group_size, dim=0).to(device)         # (N, P)
    prompt_mask = encoded.attention_mask.repeat_interleave(group_size, dim=0).to(device)   # (N, P)

    eos_ids = eos_token_ids(model, tokenizer)
    config = sampling_config(max_new_tokens, temperature, eos_ids, tokenizer.pad_token_id)
    sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)  # (N, P+T)
    completion_ids = sequences[:, prompt_ids.shape[1]:]                                    # (N, T)
    completion_mask, truncated = completion_mask_from_ids(completion_ids, eos_ids)         # (N, T), (N,)

    logp = entropy = None
    if score:
        scoring_temperature = temperature if temperature > 0 else 1.0
        logp, entropy = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                            temperature=scoring_temperature, with_entropy=True)  # (N, T) each

    # Decode only the kept tokens, so nothing after the first EOS leaks into the text
    # even when an EOS id is not registered as a special token.
    lengths = completion_mask.sum(dim=-1).long().tolist()
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(completion_ids.tolist(), lengths)]
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, logp, entropy, texts)


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                        temperature: float = 1.0, with_entropy: bool = False):
    """
    Per-token log-probs (and entropies) of the responses under softmax(logits / temperature).

    One forward pass over prompt + response. Gradients flow through logp when this
    runs with grad enabled; entropy is always detached. Both are float32 and exactly 0
    at masked positions. Returns (logp (N, T), entropy (N, T) or None).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define a distribution, got {temperature}")
    num_tokens = completion_ids.shape[1]
    if num_tokens == 0:
        raise ValueError("completion_ids has no tokens to score")
    mask = completion_mask.bool()                                                          # (N, T)

    # The logits at position P-1+t predict response token t, so the last response
    # token is never an input and T logits positions are enough.
    input_ids = torch.cat([prompt_ids, completion_ids[:, :-1]], dim=1)                     # (N, P+T-1)
    attention_mask = torch.cat([prompt_mask.long(), mask[:, :-1].long()], dim=1)           # (N, P+T-1)
    # Positions count real tokens only, so a left-padded row gets the same positions
    # as the same row without padding.
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)                        # (N, P+T-1)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    try:
        # logits_to_keep avoids materialising the (N, P+T-1, V) logits.
        logits = model(**inputs, logits_to_keep=num_tokens).logits                         # (N, T, V)
    except TypeError:  # a model or wrapper without logits_to_keep
        logits = model(**inputs).logits[:, -num_tokens:]                                   # (N, T, V)

    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (num_tokens * logits.shape[-1]))
    logp_chunks, entropy_chunks = [], []
    for start in range(0, logits.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        # Float32 before scaling, because bf16 keeps only about 3 significant digits.
        scaled = logits[rows].float() / temperature                                        # (n, T, V)
        sampled = completion_ids[rows].unsqueeze(-1)                                       # (n, T, 1)
        # log p(token) = z_token - logsumexp(z), with z = logits / temperature
        logp_chunks.append(scaled.gather(-1, sampled).squeeze(-1) - scaled.logsumexp(dim=-1))  # (n, T)
        if with_entropy:
            with torch.no_grad():
                # H = -sum_v p_v log p_v, where entr(0) = 0, so a -inf logit gives no NaN.
                # entr writes over probs, so the entropy needs one (n, T, V) temporary, not two.
                probs = scaled.softmax(dim=-1)                                             # (n, T, V)
                entropy_chunks.append(torch.special.entr(probs, out=probs).sum(dim=-1))    # (n, T)
                del probs

    # masked_fill, not a product, because a -inf log-prob times 0 is NaN.
    logp = torch.cat(logp_chunks).masked_fill(~mask, 0.0)                                 # (N, T)
    entropy = torch.cat(entropy_chunks).masked_fill(~mask, 0.0) if with_entropy else None  # (N, T)
    return logp, entropy
