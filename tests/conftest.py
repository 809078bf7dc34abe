"""Shared fixtures: tiny random models built in memory, so tests need no files and no network."""
import os
import sys
from pathlib import Path

# Set before transformers is imported anywhere, because it reads them at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests import the modules at the repo root

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads a real packaged model (deselect with -m 'not slow')")


@pytest.fixture
def tiny_lm():
    """A fresh random 2-layer Llama (float32, CPU) and its character tokenizer, as (model, tokenizer)."""
    import models

    model, tokenizer = models.tiny_policy(seed=0)
    return model.eval(), tokenizer


@pytest.fixture
def tiny_enc():
    """A fresh random 1-layer BERT SentenceTransformer on the CPU."""
    import models

    return models.tiny_encoder(seed=0)
