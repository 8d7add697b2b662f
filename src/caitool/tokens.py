"""Token plumbing shared by the local backend, ppo and the reward model.

Rendering a conversation through its chat template, padding rows of token ids into a batch
(on the left for generation and next-token reads, on the right for whole-sequence scoring),
and cutting a sampled response at its end-of-turn token. Every phase that turns text into
model input goes through here, so the reward read at training time, at ppo time and at eval
time sees the same tokens.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from caitool.errors import CaitoolError
from caitool.records import Conversation, Message

SYSTEM_PROBE = "caitool-system-probe"
# Whether each tokenizer's chat template has a system role, probed once per tokenizer.
_takes_system: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def as_dicts(conversation: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in conversation]


def takes_system_turns(tokenizer: Any) -> bool:
    """Whether the chat template writes a system turn (Gemma's raises on one; some drop it silently)."""
    from jinja2.exceptions import TemplateError

    if tokenizer not in _takes_system:
        probe = [{"role": "system", "content": SYSTEM_PROBE}, {"role": "user", "content": "hi"}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            _takes_system[tokenizer] = SYSTEM_PROBE in text
        except TemplateError:
            _takes_system[tokenizer] = False
    return _takes_system[tokenizer]


def template_turns(tokenizer: Any, conversation: Sequence[Message]) -> Conversation:
    """The turns as the chat template can take them: for a template without a system role, the
    leading system turns are written at the start of the first user turn (what such model
    families advise), and a note says so once per model."""
    if not any(m.role == "system" for m in conversation) or takes_system_turns(tokenizer):
        return list(conversation)
    head = 0
    while head < len(conversation) and conversation[head].role == "system":
        head += 1
    rest = list(conversation[head:])
    if not rest or rest[0].role != "user" or any(m.role == "system" for m in rest):
        raise CaitoolError(
            f"the chat template of {_model_name(tokenizer)} has no system role, and a system turn "
            "that is not followed by a user turn cannot be folded into one"
        )
    system = "\n\n".join(m.content for m in conversation[:head])
    rest[0] = Message(role="user", content=f"{system}\n\n{rest[0].content}")
    _note_folding(tokenizer)
    return rest


def fitted_to_template(example: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """A TRL example (sft, dpo, rloo) with its prompt as the chat template takes it: TRL renders
    the turns as given, so a system turn would crash a template without that role, or be dropped
    by one that ignores it, where caitool's own rendering (ppo, the reward model) folds it."""
    prompt = template_turns(tokenizer, [Message.model_validate(m) for m in example["prompt"]])
    return {**example, "prompt": [m.model_dump() for m in prompt]}


_noted: weakref.WeakSet[Any] = weakref.WeakSet()


def _note_folding(tokenizer: Any) -> None:
    if tokenizer in _noted:
        return
    _noted.add(tokenizer)
    from caitool.progress import print_summary

    print_summary(
        f"note: the chat template of {_model_name(tokenizer)} has no system role; "
        "system turns are written at the start of the first user turn"
    )


def _model_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or "this model")


def render_chat(tokenizer: Any, conversation: Sequence[Message]) -> str:
    """The chat-template text after which the model writes (or continues) the assistant turn."""
    continuing = bool(conversation) and conversation[-1].role == "assistant"
    return tokenizer.apply_chat_template(
        as_dicts(template_turns(tokenizer, conversation)),
        tokenize=False,
        add_generation_prompt=not continuing,
        continue_final_message=continuing,
    )


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text (the template already holds any special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def next_token_id(tokenizer: Any, text: str, text_ids: Sequence[int], continuation: str) -> int:
    """The one token ``continuation`` adds when written right after ``text`` (whose ids are ``text_ids``).

    Taken from the encoding of text + continuation minus that of text, never from the continuation
    encoded alone: a SentencePiece tokenizer with a dummy prefix encodes "A" alone as "▁A", while
    after "(" the model writes "A". A continuation that is several tokens there, or that merges
    with the end of ``text`` (so its tokens change), cannot be read as one next token: refused.
    """
    full = encode(tokenizer, text + continuation)
    added = full[len(text_ids) :]
    if list(full[: len(text_ids)]) != list(text_ids) or len(added) != 1:
        ending = tokenizer.convert_ids_to_tokens(full[-3:])
        raise CaitoolError(
            f"{continuation!r} written after {text[-24:]!r} is not one token of its own for this "
            f"tokenizer (the text then ends in the tokens {ending}); caitool reads an option letter "
            "as the one next token, so it cannot score with this model"
        )
    return added[0]


def encode_conversation(tokenizer: Any, prompt: Conversation, response: str) -> list[int]:
    """Token ids of the full conversation, the response as a finished assistant turn."""
    messages = as_dicts(template_turns(tokenizer, [*prompt, Message(role="assistant", content=response)]))
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
