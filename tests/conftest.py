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
def tiny_rm_dir(tiny_model_dir, tmp_path_factory):
    """A reward model with a random head on the tiny backbone, saved the way train-rm saves one."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from caitool.models import load_tokenizer
    from caitool.reward import prepare_reward_tokenizer

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tokenizer = load_tokenizer(tiny_model_dir)
    prepare_reward_tokenizer(tokenizer, model)
    directory = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


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
