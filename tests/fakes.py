"""A scripted generation backend for unit tests: no model, fully predictable."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from caitool.backends import Completion, SamplingParams
from caitool.records import Conversation


class ScriptedBackend:
    """``reply(conversation, sample_index, seed) -> text`` decides every completion.

    ``letter_logprobs(conversation, continuations) -> [logprob, ...]`` decides scores
    (default: uniform). Every call is recorded in ``calls`` for assertions.
    """

    model_id = "scripted@000000000000"

    def __init__(
        self,
        reply: Callable[[Conversation, int, int], str] | None = None,
        scores: Callable[[Conversation, Sequence[str]], list[float]] | None = None,
        parallelism: int = 8,
    ):
        self.parallelism = parallelism
        self.reply = reply or (lambda conv, i, seed: f"reply {i} to: {conv[-1].content[:40]}")
        self.scores = scores or (lambda conv, conts: [-0.6931] * len(conts))
        self.calls: list[tuple[str, int]] = []

    def describe(self):
        return {"backend": "scripted", "model_id": self.model_id}

    def stats(self):
        return {}

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams, seed: int):
        self.calls.append(("generate", len(conversations)))
        out = []
        for conversation in conversations:
            texts = [self.reply(conversation, i, seed) for i in range(params.n)]
            out.append([Completion(text=t, num_tokens=len(t.split()), finished=True) for t in texts])
        return out

    def score_continuations(self, conversations: Sequence[Conversation], continuations: Sequence[str]):
        self.calls.append(("score", len(conversations)))
        return [self.scores(c, continuations) for c in conversations]
