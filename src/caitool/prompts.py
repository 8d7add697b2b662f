"""Chat turns for the supervised phase: the critique and revision requests as conversations.

Both requests are ordinary chat turns rendered through the model's own chat template, so
any chat model works without a custom prompt format. Few-shot examples from the
constitution come first as earlier turns of the same chat (the example exchange, the
critique request, the example critique, and for revisions the revision request and the
example revision); the real conversation follows, so the model sees the pattern in
exactly the shape it is asked to continue.
"""

from __future__ import annotations

from collections.abc import Sequence

from caitool.constitution import Constitution, CritiqueExample, CritiquePrinciple
from caitool.records import Conversation, Message


def user(text: str) -> Message:
    return Message(role="user", content=text)


def assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


def pick_examples(constitution: Constitution, principle_id: str, limit: int) -> list[CritiqueExample]:
    """Up to ``limit`` worked examples, those of the drawn principle first (most relevant)."""
    examples = constitution.few_shot.critique
    same = [e for e in examples if e.principle == principle_id]
    other = [e for e in examples if e.principle != principle_id]
    return (same + other)[: max(limit, 0)]


def split_system(prompt: Sequence[Message]) -> tuple[Conversation, Conversation]:
    """Leading system turns and the rest: system turns must stay first, before any example."""
    head = 0
    while head < len(prompt) and prompt[head].role == "system":
        head += 1
    return list(prompt[:head]), list(prompt[head:])


def _example_turns(
    constitution: Constitution, examples: Sequence[CritiqueExample], *, with_revision: bool
) -> Conversation:
    turns: Conversation = []
    for example in examples:
        principle = constitution.critique(example.principle)
        turns += [m for m in example.conversation if m.role != "system"]
        turns += [user(principle.critique), assistant(example.critique)]
        if with_revision:
            turns += [user(principle.revision), assistant(example.revision)]
    return turns


def critique_conversation(
    constitution: Constitution,
    principle: CritiquePrinciple,
    prompt: Sequence[Message],
    response: str,
    examples: Sequence[CritiqueExample],
) -> Conversation:
    """Examples, then the real exchange and the critique request; the model writes the critique."""
    system, turns = split_system(prompt)
    shots = _example_turns(constitution, examples, with_revision=False)
    return [*system, *shots, *turns, assistant(response), user(principle.critique)]


def revision_conversation(
    constitution: Constitution,
    principle: CritiquePrinciple,
    prompt: Sequence[Message],
    response: str,
    critique: str,
    examples: Sequence[CritiqueExample],
) -> Conversation:
    """The critique exchange followed by the revision request; the model writes the revision."""
    system, turns = split_system(prompt)
    shots = _example_turns(constitution, examples, with_revision=True)
    return [
        *system,
        *shots,
        *turns,
        assistant(response),
        user(principle.critique),
        assistant(critique),
        user(principle.revision),
    ]
