"""Token plumbing shared by the local backend, ppo and the reward model.

Rendering a conversation through its chat template, padding rows of token ids into a batch
(on the left for generation and next-token reads, on the right for whole-sequence scoring),
and cutting a sampled response at its end-of-turn token. Every phase that turns text into
model input goes through here, so the reward read at training time, at ppo time and at eval
time sees the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from caitool.records import Conversation, Message


def as_dicts(conversation: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in conversation]


def render_chat(tokenizer: Any, conversation: Sequence[Message]) -> str:
    """The chat-template text after which the model writes (or continues) the assistant turn."""
    continuing = bool(conversation) and conversation[-1].role == "assistant"
    return tokenizer.apply_chat_template(
        as_dicts(conversation),
        tokenize=False,
        add_generation_prompt=not continuing,
        continue_final_message=continuing,
    )


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text (the template already holds any special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer: Any, prompt: Conversation, response: str) -> list[int]:
    """Token ids of the full conversation, the response as a finished assistant turn."""
    messages = as_dicts([*prompt, Message(role="assistant", content=response)])
    return encode(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: Any = "cpu") -> tuple[Any, Any]:
    """``input_ids`` and ``attention_mask`` with every row ending at the last column."""
    import torch

    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + list(r) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def right_padded(rows: Sequence[Sequence[int]], pad_id: int, device: Any = "cpu") -> tuple[Any, Any]:
    """``input_ids`` and ``attention_mask`` with every row starting at the first column."""
    import torch

    width = max(len(r) for r in rows)
    ids = [list(r) + [pad_id] * (width - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int], pad_id: int | None) -> tuple[list[int], bool]:
    """The response tokens before the first end-of-turn token, and whether there was one.

    Trailing pad tokens (a batch-mate ran longer) are dropped unless the pad token is itself
    an end-of-turn token, in which case it already ended the response.
    """
    stops = set(stop_ids)
    kept: list[int] = []
    for token in tokens:
        if token in stops:
            return kept, True
        kept.append(token)
    while kept and kept[-1] == pad_id:
        kept.pop()
    return kept, False


def decode(tokenizer: Any, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True).strip()
