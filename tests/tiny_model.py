"""Build a tiny random chat model offline: a 2-layer Llama and a byte-level BPE tokenizer
trained on the spot with the ``tokenizers`` library, with a ChatML chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if not (loop.last and continue_final_message) %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I bake bread? Mix flour, water, yeast and salt, then knead and bake.",
    "I cannot help with that, but here is a safer alternative.",
    "Identify specific ways in which the response is harmful, unethical or illegal.",
    "Please rewrite the response to remove harmful content. Which response is less harmful?",
    "Options: (A) first answer (B) second answer. The answer is (A) or (B).",
    "user assistant system critique revision principle constitution",
] + [f"Sentence number {i} about safety, honesty, privacy and kindness." for i in range(50)]


def build_tiny_model(
    directory: Path, *, seed: int = 0, corpus: list[str] | None = None, extra_corpus: tuple[str, ...] = ()
) -> Path:
    """The model in ``directory``; another ``corpus`` gives a tokenizer of another family (other ids).

    ``extra_corpus``: more text for the tokenizer, so that text a test uses a lot becomes few tokens.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([*(corpus or CORPUS), *extra_corpus], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    (directory / "README.txt").write_text(json.dumps({"built_by": "tests/tiny_model.py", "seed": seed}))
    return directory


def variant_of(
    source: Path, directory: Path, *, config: dict | None = None, generation_config: dict | None = None
) -> Path:
    """A copy of a model directory with some ``config.json`` or ``generation_config.json`` values changed."""
    shutil.copytree(source, directory)
    for name, changes in (("config.json", config), ("generation_config.json", generation_config)):
        if changes:
            path = directory / name
            path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))
    return directory
