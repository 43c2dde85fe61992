"""Shared test helpers: small configs, random models, and transformers as the parity reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llama_core import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]


def assets_dir() -> Path:
    return Path(os.environ.get("LLAMA_CORE_ASSETS", REPO.parent / "shared" / "assets"))


def small_config(**overrides) -> LlamaConfig:
    """A 2-layer GQA 4:2 model; fields overridable (HF names)."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    return LlamaConfig(**{**base, **overrides})


def random_model(config: LlamaConfig | None = None, seed: int = 0, cls=LlamaForCausalLM):
    torch.manual_seed(seed)
    return cls(config or small_config()).eval()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic story corpus (a directory of .txt files) and its 192-id tokenizer, shared by the training
    tests (read only)."""
    from tests.train_corpus import write_corpus, write_tokenizer

    root = tmp_path_factory.mktemp("story_corpus")
    data = write_corpus(root / "corpus")
    return data, write_tokenizer(root / "tokenizer", data)


@pytest.fixture
def transformers_module():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers
