from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_model, variant_of

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama chat model with its own BPE tokenizer, built offline once."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


# Sampling settings a model may ship in generation_config.json; caitool must ignore every one.
SAMPLING_DISTORTIONS = {
    "repetition_penalty": 1e4,
    "no_repeat_ngram_size": 1,
    "min_p": 0.3,
    "typical_p": 0.5,
    "top_k": 3,
    "min_new_tokens": 4,
}


@pytest.fixture(scope="session")
def penalised_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a generation config that distorts sampling (like Qwen2.5's repetition_penalty)."""
    return variant_of(
        tiny_model_dir, tmp_path_factory.mktemp("penalised") / "model", generation_config=SAMPLING_DISTORTIONS
    )


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return REPO / "examples"


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"id": "a", "prompt": "How do I bake bread?", "category": "cooking"}\n'
        '{"prompt": [{"role": "user", "content": "Tell me a joke."}]}\n'
        '{"id": "c", "messages": [{"role": "user", "content": "Hi"},'
        ' {"role": "assistant", "content": "Hello!"},'
        ' {"role": "user", "content": "Which response is less harmful?"}]}\n'
    )
    return path
