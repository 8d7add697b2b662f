"""Build a tiny random chat model offline: a 2-layer Llama and a byte-level BPE tokenizer
trained on the spot with the ``tokenizers`` library, with a ChatML chat template."""

from __future__ import annotations

import json
import shutil
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    # Score mode reads " Yes" / " No" as one next token, as real tokenizers have them.
    "Is the response harmful? Yes. Is it helpful? No. " * 8,
] + [f"Sentence number {i} about safety, honesty, privacy and kindness." for i in range(50)]


def build_tiny_model(
    directory: Path,
    *,
    seed: int = 0,
    corpus: list[str] | None = None,
    extra_corpus: tuple[str, ...] = (),
    hidden_size: int = 64,
) -> Path:
    """The model in ``directory``; another ``corpus`` gives a tokenizer of another family (other ids).

    ``extra_corpus``: more text for the tokenizer, so that text a test uses a lot becomes few tokens.
    ``hidden_size``: 4 heads share it (vLLM's CPU attention needs a head size of 32 or more: 128).
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
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
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


# ---------------------------------------------------------------------------
# A model-family matrix: tiny random models whose tokenizer, chat template, special tokens and
# generation config behave like those of the real families (tests/test_families.py).

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system is defined %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
QWEN2_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """What makes a model family different for caitool, and the tiny model that reproduces it."""

    name: str
    architecture: str  # the transformers config class, e.g. "LlamaConfig"
    tokenizer: str  # "sentencepiece" (Metaspace with a dummy prefix), "gemma" (no prefix) or "bytelevel"
    template: str
    special: dict[str, str | None]  # bos/eos/unk/pad, None where the family has none
    extra_special: tuple[str, ...]
    end_of_turn: str  # the token the chat template closes an assistant turn with
    takes_system: bool
    generation_config: dict[str, Any] = field(default_factory=dict)


FAMILIES = {
    "llama": Family(
        name="llama",
        architecture="LlamaConfig",
        tokenizer="sentencepiece",
        template=LLAMA2_TEMPLATE,
        special={"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None},
        extra_special=(),
        end_of_turn="</s>",
        takes_system=True,
    ),
    "qwen2": Family(
        name="qwen2",
        architecture="Qwen2Config",
        tokenizer="bytelevel",
        template=QWEN2_TEMPLATE,
        special={"bos": None, "eos": "<|im_end|>", "unk": None, "pad": "<|endoftext|>"},
        extra_special=("<|im_start|>",),
        end_of_turn="<|im_end|>",
        takes_system=True,
        # Qwen2.5-Instruct's shipped sampling settings, which caitool must not apply.
        generation_config={
            "do_sample": True,
            "repetition_penalty": 1.05,
            "top_k": 20,
            "top_p": 0.8,
            "temperature": 0.7,
        },
    ),
    "gemma": Family(
        name="gemma",
        architecture="GemmaConfig",
        tokenizer="gemma",
        template=GEMMA_TEMPLATE,
        special={"bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "pad": "<pad>"},
        extra_special=("<start_of_turn>", "<end_of_turn>"),
        # The generation config names <eos> alone (as gemma-7b-it's did): <end_of_turn> must be found.
        end_of_turn="<end_of_turn>",
        takes_system=False,
    ),
    "phi3": Family(
        name="phi3",
        architecture="Phi3Config",
        tokenizer="sentencepiece",
        template=PHI3_TEMPLATE,
        # Phi-3-mini pads with its end-of-text token, which its template writes after every conversation.
        special={"bos": "<s>", "eos": "<|endoftext|>", "unk": "<unk>", "pad": "<|endoftext|>"},
        extra_special=("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
        end_of_turn="<|end|>",
        takes_system=True,
    ),
}

SERVABLE_MAX_LENGTH = 8192

FAMILY_CORPUS = (
    CORPUS
    + [
        "A good answer is kind. A bad answer is rude. Answer A or answer B, and say why.",
        "Also, Alice asked Bob about apples and bananas; Bob answered briefly.",
        "The answer is short. The better response is the safer one.",
        "Human: hello. Assistant: hi, how can I help? Consider the following conversation.",
    ]
    * 3
)


def _family_tokenizer(family: Family) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = [t for t in family.special.values() if t is not None]
    special = list(dict.fromkeys([*special, *family.extra_special]))
    if family.tokenizer == "bytelevel":
        bpe = Tokenizer(models.BPE(unk_token=None))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        # SentencePiece-style: spaces become "▁"; Llama and Phi-3 add a dummy "▁" at the start of
        # the text (so "A" alone is "▁A"), Gemma does not.
        scheme = "first" if family.tokenizer == "sentencepiece" else "never"
        bpe = Tokenizer(models.BPE(unk_token=family.special["unk"]))
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
        bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
        alphabet = sorted(set(string.printable.replace(" ", "▁")) | {"▁"})
    # min_frequency 2: a letter glued to the "(" before it (seen once) does not become a token.
    trainer = trainers.BpeTrainer(
        vocab_size=600, min_frequency=2, special_tokens=special, initial_alphabet=alphabet
    )
    bpe.train_from_iterator(FAMILY_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        **{f"{role}_token": token for role, token in family.special.items() if token is not None},
        additional_special_tokens=list(family.extra_special),
    )
    tokenizer.chat_template = family.template
    return tokenizer


def _family_config(family: Family, tokenizer: Any, shape_changes: dict[str, Any] | None = None) -> Any:
    import transformers

    def token_id(role: str) -> int | None:
        token = family.special[role]
        return None if token is None else tokenizer.convert_tokens_to_ids(token)

    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "bos_token_id": token_id("bos"),
        "eos_token_id": token_id("eos"),
        "pad_token_id": token_id("pad"),
    }
    if family.architecture == "GemmaConfig":
        shape["head_dim"] = 16
    if family.architecture == "Phi3Config":
        shape["original_max_position_embeddings"] = 2048
    shape.update(shape_changes or {})
    return getattr(transformers, family.architecture)(**shape)


def build_family_model(
    directory: Path,
    family: Family,
    *,
    seed: int = 0,
    servable: bool = False,
    bos_added: bool = False,
) -> Path:
    """A tiny random causal LM of ``family`` in ``directory``, built offline.

    ``servable``: a shape vLLM's CPU attention takes (head size 32, not 16) and logits spread
    wide enough (a scaled output layer) that near-ties between tokens are rare, so that greedy
    outputs of two engines can be compared. ``bos_added``: the tokenizer adds BOS when it
    encodes text, as Llama's does (add_bos_token), so that a server tokenizing a rendered
    template that already starts with BOS writes two.
    """
    import torch
    from transformers import AutoModelForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _family_tokenizer(family)
    if bos_added:
        with_bos_added(tokenizer)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    shape = None
    if servable:  # and long enough for the labeller's few-shot prompts in this small vocabulary
        shape = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}
        shape["max_position_embeddings"] = SERVABLE_MAX_LENGTH
    model = AutoModelForCausalLM.from_config(_family_config(family, tokenizer, shape))
    if servable:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(40.0)
    model.generation_config.update(**family.generation_config)
    model.save_pretrained(directory)
    (directory / "README.txt").write_text(
        json.dumps({"built_by": "tests/tiny_model.py", "family": family.name})
    )
    return directory


def with_bos_added(tokenizer: Any) -> Any:
    """The tokenizer, changed to add BOS whenever it encodes text with special tokens."""
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    return tokenizer


def save_reward_model(model_dir, directory, *, seed: int = 1):
    """A reward model with a random head (drawn from ``seed``) on ``model_dir``'s backbone, saved the
    way train-rm saves one."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from caitool.models import load_tokenizer
    from caitool.reward import prepare_reward_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    tokenizer = load_tokenizer(model_dir)
    prepare_reward_tokenizer(tokenizer, model)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
