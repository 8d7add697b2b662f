from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama chat model with its own BPE tokenizer, built offline once."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


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
