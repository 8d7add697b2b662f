"""A tiny feedback model that can judge one decidable rule: the response that speaks of safety is better.

The tiny random Llama of ``tiny_model.py`` is trained for a few dozen full-batch steps on the
labeller's own questions (letter questions in both option orders, and score mode's yes/no
questions) about training comparisons, and is then used on comparisons with prompts it never
saw. It exists so that tests can run ``judge-check`` on a real model whose answer is known to
be right, not on a scripted one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from caitool.constitution import Constitution
from caitool.label import (
    ANSWER_PREFILL,
    SCORE_PREFILL,
    VERDICT_WORDS,
    Comparison,
    Labeller,
    question_text,
    score_question_text,
)
from caitool.records import Message
from tests.tiny_model import build_tiny_model

SAFE = (
    "I cannot help with that, but here is a safer alternative.",
    "Here is a safer way to do it, with care.",
    "A safer plan: ask a professional for help.",
    "Please stay safe and ask an adult.",
)
UNSAFE = (
    "The quick brown fox jumps over the lazy dog.",
    "Mix flour, water, yeast and salt, then bake.",
    "Sentence number 7 about the lazy dog.",
    "Just do it fast and tell nobody.",
)
TINY_CONSTITUTION = {
    "name": "tiny-judge",
    "version": "1",
    "critiques": [{"id": "any", "critique": "Critique the response.", "revision": "Revise the response."}],
    "comparisons": [{"id": "safer", "text": "Which response is safer?"}],
}


def tiny_constitution() -> Constitution:
    return Constitution.model_validate(TINY_CONSTITUTION)


def write_tiny_constitution(path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(TINY_CONSTITUTION))
    return path


def safety_comparisons(count: int, *, first_index: int, seed: int) -> list[dict[str, str]]:
    """Labelled comparisons (prompt, chosen = a safe response, rejected = an unsafe one)."""
    rng = random.Random(seed)
    return [
        {
            "id": f"q{i}",
            "prompt": f"Question {i}: how do I do thing {i}?",
            "chosen": rng.choice(SAFE),
            "rejected": rng.choice(UNSAFE),
            "principle_id": "safer",
            "category": "even" if i % 2 == 0 else "odd",
        }
        for i in range(first_index, first_index + count)
    ]


def write_labelled(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def train_tiny_judge(directory: Path, *, steps: int = 80, seed: int = 0) -> Path:
    """Build the tiny model and teach it the rule on 16 training comparisons; returns its directory."""
    import torch

    from caitool.backends.local import TransformersBackend
    from caitool.tokens import encode, left_padded, render_chat

    charter = tiny_constitution()
    principle = charter.comparisons[0]
    train = [
        Comparison([Message(role="user", content=r["prompt"])], r["chosen"], r["rejected"], principle)
        for r in safety_comparisons(16, first_index=0, seed=seed)
    ]
    # The questions' wording in the tokenizer's corpus keeps them short (about 100 tokens).
    corpus = []
    for c in train:
        corpus += [
            question_text(c.prompt, principle.text, c.first, c.second),
            score_question_text(c.prompt, principle.text, c.first),
            f"{ANSWER_PREFILL}A) {SCORE_PREFILL}{VERDICT_WORDS[0]} {SCORE_PREFILL}{VERDICT_WORDS[1]}",
        ] * 3
    build_tiny_model(directory, seed=seed, extra_corpus=tuple(corpus))
    backend = TransformersBackend.load(str(directory))
    tokenizer, model = backend.tokenizer, backend.model
    letters = Labeller(backend, charter, mode="logprob")
    scores = Labeller(backend, charter, mode="score")
    rows: list[tuple[list[int], str]] = []
    for c in train:
        for swapped, letter in ((False, "A"), (True, "B")):
            rows.append(([*letters.question(c, swapped=swapped), _prefill(ANSWER_PREFILL)], letter))
        for response, word in ((c.first, VERDICT_WORDS[0]), (c.second, VERDICT_WORDS[1])):
            rows.append(([*scores.score_question(c, response), _prefill(SCORE_PREFILL)], word))
    token_rows = [encode(tokenizer, render_chat(tokenizer, conversation)) for conversation, _ in rows]
    targets = []
    for _, answer in rows:
        answer_ids = encode(tokenizer, answer)
        assert len(answer_ids) == 1, f"{answer!r} must be one token of the tiny judge's tokenizer"
        targets.append(answer_ids[0])
    input_ids, mask = left_padded(token_rows, tokenizer.pad_token_id)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    target_ids = torch.tensor(targets)
    torch.manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        logits = model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1
        ).logits
        loss = torch.nn.functional.cross_entropy(logits[:, -1], target_ids)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    model.save_pretrained(directory)
    return directory


def _prefill(text: str) -> Message:
    return Message(role="assistant", content=text)
