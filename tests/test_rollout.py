"""Tests of group sampling, the EOS loss mask and the per-token log-probabilities, on a tiny random Llama."""
import math

import pytest
import torch

import rollout
from rollout import completion_logprobs, completion_mask_from_ids, generate_groups, render_prompts

ATOL = 1e-5  # float32 rounding of the same sums taken in a different order


def loop_mask(ids, eos_ids):
    """Plain-loop reference for completion_mask_from_ids."""
    mask, truncated = [], []
    for row in ids.tolist():
        row_mask, seen_eos = [], False
        for token in row:
            row_mask.append(0.0 if seen_eos else 1.0)
            seen_eos = seen_eos or token in eos_ids
        mask.append(row_mask)
        truncated.append(not seen_eos)
    return torch.tensor(mask), torch.tensor(truncated)


def encode(tokenizer, text):
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)])  # (1, L)


# ----------------------------------------------------------------------------
# EOS mask, pinned by hand

def test_mask_keeps_first_eos_and_zeros_after():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, eos, pad, pad],
                        [5, eos, 6, eos, pad],
                        [eos, pad, pad, pad, pad],
                        [5, 6, 7, 8, 9]])
    mask, truncated = completion_mask_from_ids(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, False, True]
    assert mask.dtype == torch.float32


def test_mask_when_pad_equals_eos():
    eos = 2  # generate pads finished rows with the pad id, here the EOS id itself
    ids = torch.tensor([[5, eos, eos, eos],
                        [eos, eos, eos, eos],
                        [5, 6, 7, 8]])
    mask, truncated = completion_mask_from_ids(ids, [eos])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_mask_with_two_eos_ids():
    ids = torch.tensor([[5, 9, 2, 0],
                        [5, 6, 2, 9],
                        [9, 2, 0, 0],
                        [5, 6, 7, 8]])
    mask, truncated = completion_mask_from_ids(ids, [2, 9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, False, True]


def test_mask_without_eos_ids_truncates_all():
    mask, truncated = completion_mask_from_ids(torch.tensor([[1, 2], [3, 4]]), [])
    assert mask.tolist() == [[1, 1], [1, 1]]
    assert truncated.tolist() == [True, True]


def test_mask_matches_plain_loop():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (64, 12), generator=generator)  # (N, T), EOS ids 0 and 1 are frequent
    mask, truncated = completion_mask_from_ids(ids, [0, 1])
    expected_mask, expected_truncated = loop_mask(ids, {0, 1})
    assert torch.equal(mask, expected_mask)
    assert torch.equal(truncated, expected_truncated)


# ----------------------------------------------------------------------------
# Log-probabilities and entropy against hand computations

def hand_logits(model, prompt, completion):
    """Logits predicting each completion token, from one unpadded forward pass: (T, V) float64."""
    with torch.no_grad():
        logits = model(torch.cat([prompt, completion], dim=1)).logits[0].double()  # (P+T, V)
    return logits[prompt.shape[1] - 1: -1]                                         # (T, V)


def score(model, prompt, completion, **kwargs):
    ones = torch.ones_like
    with torch.no_grad():
        return completion_logprobs(model, prompt, ones(prompt), completion, ones(completion).float(), **kwargs)


def test_logp_equals_hand_loop(tiny_lm):
    model, tokenizer = tiny_lm
    prompt, completion = encode(tokenizer, "<s>2+3="), encode(tokenizer, "5 done</s>")
    logp, _ = score(model, prompt, completion)
    logits = hand_logits(model, prompt, completion)
    for t, token in enumerate(completion[0].tolist()):
        z = logits[t]
        expected = z[token] - torch.log(torch.exp(z).sum())
        assert logp[0, t].item() == pytest.approx(expected.item(), abs=ATOL)


def test_entropy_equals_hand_computation(tiny_lm):
    model, tokenizer = tiny_lm
    prompt, completion = encode(tokenizer, "<s>2+3="), encode(tokenizer, "5 ok")
    _, entropy = score(model, prompt, completion, with_entropy=True)
    z = hand_logits(model, prompt, completion)[2]                      # (V,)
    p = torch.exp(z) / torch.exp(z).sum()
    expected = -(p * torch.log(p)).sum()
    assert entropy[0, 2].item() == pytest.approx(expected.item(), abs=ATOL)


def test_temperature_scales_logits(tiny_lm):
    model, tokenizer = tiny_lm
    prompt, completion = encode(tokenizer, "<s>7*6="), encode(tokenizer, "42")
    logp_cold, _ = score(model, prompt, completion, temperature=0.5)
    logp_plain, _ = score(model, prompt, completion, temperature=1.0)
    z = hand_logits(model, prompt, completion) / 0.5                  # (T, V)
    expected = z.gather(-1, completion[0, :, None]).squeeze(-1) - z.logsumexp(-1)
    assert torch.allclose(logp_cold.double(), expected[None], atol=ATOL)
    assert not torch.allclose(logp_cold, logp_plain, atol=1e-3)


def test_high_temperature_approaches_uniform(tiny_lm):
    model, tokenizer = tiny_lm
    prompt, completion = encode(tokenizer, "<s>7*6="), encode(tokenizer, "42")
    logp, entropy = score(model, prompt, completion, temperature=1e6, with_entropy=True)
    vocab = model.config.vocab_size
    assert torch.allclose(logp, torch.full_like(logp, -math.log(vocab)), atol=1e-4)
    assert torch.allclose(entropy, torch.full_like(entropy, math.log(vocab)), atol=1e-4)


def tiny_gpt2(tokenizer):
    """A random GPT-2: learned absolute position embeddings, unlike Llama's rotary ones."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_logp_invariant_to_left_padding(tiny_lm, architecture):
    # Rotary attention depends only on relative positions, so Llama alone would pass even
    # with shifted positions. GPT-2's absolute positions catch a missing position_ids.
    model, tokenizer = tiny_lm
    if architecture == "gpt2":
        model = tiny_gpt2(tokenizer)
    texts = ["<s>1+1=", "<s>a much longer prompt that forces left padding ="]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    completion = encode(tokenizer, "2, I think</s>").repeat(2, 1)      # (2, T)
    mask = torch.ones_like(completion).float()
    with torch.no_grad():
        logp_batch, entropy_batch = completion_logprobs(model, batch.input_ids, batch.attention_mask,
                                                        completion, mask, with_entropy=True)
    logp_alone, entropy_alone = score(model, encode(tokenizer, texts[0]), completion[:1], with_entropy=True)
    assert batch.attention_mask[0, 0] == 0  # the short prompt really is padded
    # Not bit-equal in general: attention sums over a longer, partly masked row in another order.
    assert torch.allclose(logp_batch[0], logp_alone[0], atol=ATOL)
    assert torch.allclose(entropy_batch[0], entropy_alone[0], atol=ATOL)


def test_masked_positions_are_zero_and_finite(tiny_lm):
    model, tokenizer = tiny_lm
    prompt = encode(tokenizer, "<s>hi").repeat(2, 1)
    completion = torch.tensor([[10, tokenizer.eos_token_id, 0, 0], [10, 11, 12, 13]])
    mask, _ = completion_mask_from_ids(completion, [tokenizer.eos_token_id])
    logp, entropy = completion_logprobs(model, prompt, torch.ones_like(prompt), completion, mask, with_entropy=True)
    assert torch.isfinite(logp).all()
    assert logp[0, 2:].tolist() == [0.0, 0.0]
    assert entropy[0, 2:].tolist() == [0.0, 0.0]
    assert (logp[1] < 0).all()


def test_logp_carries_gradient_entropy_does_not(tiny_lm):
    model, tokenizer = tiny_lm
    prompt, completion = encode(tokenizer, "<s>hi"), encode(tokenizer, "yo")
    logp, entropy = completion_logprobs(model, prompt, torch.ones_like(prompt), completion,
                                        torch.ones_like(completion), with_entropy=True)
    assert logp.requires_grad
    assert not entropy.requires_grad
    logp.sum().backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_logp_same_without_logits_to_keep(tiny_lm):
    model, tokenizer = tiny_lm

    class PlainForward(torch.nn.Module):  # a wrapper whose forward has no logits_to_keep argument
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    prompt, completion = encode(tokenizer, "<s>3+4="), encode(tokenizer, "7</s>")
    with_keep, _ = score(model, prompt, completion)
    sliced, _ = score(PlainForward(model), prompt, completion)
    assert torch.allclose(with_keep, sliced, atol=ATOL)


def test_completion_logprobs_rejects_zero_temperature(tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="temperature"):
        score(model, encode(tokenizer, "<s>a"), encode(tokenizer, "b"), temperature=0.0)


# ----------------------------------------------------------------------------
# Prompt rendering and group sampling

def test_render_prompts_uses_chat_template(tiny_lm):
    _, tokenizer = tiny_lm
    [text] = render_prompts(tokenizer, [[{"role": "user", "content": "What is 2+3?"}]])
    assert text == "<s>user: What is 2+3?\nassistant: "


def test_render_prompts_without_template_uses_plain_text(tiny_lm):
    _, tokenizer = tiny_lm
    tokenizer.chat_template = None
    [text] = render_prompts(tokenizer, [[{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "2+3?"}]])
    assert text == "<s>Be brief.\n2+3?\n"


def stop_often(model, tokenizer, chars="aeiou0123456789"):
    """Make the near-uniform tiny model stop quickly: each character in `chars` becomes an extra EOS id."""
    extra = [tokenizer.convert_tokens_to_ids(c) for c in chars]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *extra]
    return {tokenizer.eos_token_id, *extra}


def test_generate_groups_shapes_and_contiguous_groups(tiny_lm):
    model, tokenizer = tiny_lm
    prompts = ["<s>1+1=", "<s>a longer second prompt="]
    torch.manual_seed(0)
    out = generate_groups(model, tokenizer, prompts, group_size=3, max_new_tokens=6)
    assert out.prompt_ids.shape[0] == 6
    assert out.completion_ids.shape[0] == 6
    assert out.completion_ids.shape[1] <= 6
    assert out.completion_mask.shape == out.completion_ids.shape
    assert out.logp.shape == out.completion_ids.shape
    assert out.entropy.shape == out.completion_ids.shape
    assert out.truncated.shape == (6,)
    assert len(out.texts) == 6
    for b, prompt in enumerate(prompts):
        expected = tokenizer.encode(prompt, add_special_tokens=False)
        for row in range(b * 3, b * 3 + 3):
            kept_ids = out.prompt_ids[row][out.prompt_mask[row].bool()].tolist()
            assert kept_ids == expected


def test_generate_groups_stops_at_any_eos(tiny_lm):
    model, tokenizer = tiny_lm
    eos_ids = stop_often(model, tokenizer)
    torch.manual_seed(0)
    out = generate_groups(model, tokenizer, ["<s>q:"], group_size=8, max_new_tokens=12)
    expected_mask, expected_truncated = loop_mask(out.completion_ids, eos_ids)
    assert torch.equal(out.completion_mask, expected_mask)
    assert torch.equal(out.truncated, expected_truncated)
    assert not out.truncated.all()  # the seed gives at least one early stop
    for row, text in enumerate(out.texts):
        kept_ids = out.completion_ids[row][out.completion_mask[row].bool()].tolist()
        assert text == tokenizer.decode(kept_ids, skip_special_tokens=True)
        assert "</s>" not in text
        assert "<pad>" not in text


def test_generate_groups_when_pad_equals_eos(tiny_lm):
    model, tokenizer = tiny_lm
    tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    eos_ids = stop_often(model, tokenizer)
    torch.manual_seed(1)
    out = generate_groups(model, tokenizer, ["<s>q:", "<s>longer q:"], group_size=4, max_new_tokens=10)
    expected_mask, expected_truncated = loop_mask(out.completion_ids, eos_ids)
    assert torch.equal(out.completion_mask, expected_mask)
    assert torch.equal(out.truncated, expected_truncated)


def test_rollout_logp_matches_generate_scores(tiny_lm):
    model, tokenizer = tiny_lm
    prompts, temperature = ["<s>1+1=", "<s>a longer prompt="], 0.7
    torch.manual_seed(3)
    out = generate_groups(model, tokenizer, prompts, group_size=2, max_new_tokens=8, temperature=temperature)

    # The same sampling, replayed with generate's processed scores: logits / temperature.
    config = rollout.sampling_config(8, temperature, rollout.eos_token_ids(model, tokenizer), tokenizer.pad_token_id)
    config.output_scores, config.return_dict_in_generate = True, True
    torch.manual_seed(3)
    replay = model.generate(input_ids=out.prompt_ids, attention_mask=out.prompt_mask, generation_config=config)
    scores = torch.stack(replay.scores, dim=1).log_softmax(-1)                   # (N, T, V)
    expected = scores.gather(-1, out.completion_ids[..., None]).squeeze(-1)      # (N, T)
    mask = out.completion_mask.bool()
    assert torch.equal(replay.sequences[:, out.prompt_ids.shape[1]:], out.completion_ids)
    assert torch.allclose(out.logp[mask], expected[mask], atol=ATOL)


def test_generate_groups_ignores_model_sampling_defaults(tiny_lm):
    model, tokenizer = tiny_lm
    torch.manual_seed(5)
    plain = generate_groups(model, tokenizer, ["<s>x"], group_size=4, max_new_tokens=6, score=False)
    # Defaults that would make sampling near-greedy if generate applied them.
    model.generation_config.top_k = 1
    model.generation_config.top_p = 0.1
    model.generation_config.temperature = 0.05
    model.generation_config.repetition_penalty = 3.0
    torch.manual_seed(5)
    reshaped = generate_groups(model, tokenizer, ["<s>x"], group_size=4, max_new_tokens=6, score=False)
    assert torch.equal(plain.completion_ids, reshaped.completion_ids)
    assert plain.logp is None
    assert plain.entropy is None


def test_generate_groups_rejects_unresettable_option(tiny_lm):
    model, tokenizer = tiny_lm
    model.generation_config.bad_words_ids = [[7]]
    with pytest.raises(ValueError, match="bad_words_ids"):
        generate_groups(model, tokenizer, ["<s>x"], group_size=2, max_new_tokens=3)


def test_greedy_groups_are_identical(tiny_lm):
    model, tokenizer = tiny_lm
    out = generate_groups(model, tokenizer, ["<s>x="], group_size=3, max_new_tokens=5, temperature=0.0)
    assert torch.equal(out.completion_ids[0], out.completion_ids[1])
    assert torch.equal(out.completion_ids[0], out.completion_ids[2])


def test_greedy_scored_at_temperature_one(tiny_lm):
    model, tokenizer = tiny_lm
    out = generate_groups(model, tokenizer, ["<s>x="], group_size=2, max_new_tokens=5, temperature=0.0)
    with torch.no_grad():
        logp, entropy = completion_logprobs(model, out.prompt_ids, out.prompt_mask, out.completion_ids,
                                            out.completion_mask, temperature=1.0, with_entropy=True)
    assert torch.allclose(out.logp, logp)
    assert torch.allclose(out.entropy, entropy)


def test_generate_groups_rejects_empty_group(tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="group_size"):
        generate_groups(model, tokenizer, ["<s>x"], group_size=0, max_new_tokens=3)
