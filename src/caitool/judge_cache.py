"""An opt-in on-disk cache of a judge's answers (``--cache DIR``), so no answer is paid for twice.

A judge-check, a relabel with another clamp, or a rerun after a crash asks the same questions
again; with a cache each answer is looked up by (model id, exact request) before anything is
sent. The request is everything that shapes the answer: the call (generation or letter
scoring), the conversation, the sampling parameters and, for sampled answers only, the
question's seed (a greedy answer does not depend on it). One JSON file per answer, written
atomically, so an interrupted run leaves only whole entries and several runs can share a
directory.

:class:`JudgeCalls` is what the labeller talks to: the backend's two calls, each returning
its results and, per conversation, whether the answer came from the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from caitool.backends import (
    Completion,
    ContinuationsNotScored,
    GenerationBackend,
    SamplingParams,
    TokenLogprobs,
    derive_seed,
)
from caitool.records import Conversation
from caitool.tokens import as_dicts

CACHE_VERSION = 1


class AnswerCache:
    """Answers on disk under ``directory``, one file per (model id, request) key."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model_id: str, request: dict[str, Any]) -> str:
        payload = json.dumps({"v": CACHE_VERSION, "model": model_id, "request": request}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> Any | None:
        path = self._path(key)
        try:
            value = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: Any) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "w") as stream:
            json.dump(value, stream)
        os.replace(temporary, path)

    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses}


def _completion_to_json(completion: Completion) -> dict[str, Any]:
    return asdict(completion)


def _completion_from_json(raw: dict[str, Any]) -> Completion:
    tokens = raw.get("token_logprobs")
    return Completion(
        text=raw["text"],
        num_tokens=raw["num_tokens"],
        finished=raw["finished"],
        token_logprobs=tuple(TokenLogprobs(**t) for t in tokens) if tokens is not None else None,
    )


class JudgeCalls:
    """The backend's calls, looked up in the cache first when there is one; only misses are sent."""

    def __init__(self, backend: GenerationBackend, cache: AnswerCache | None = None):
        self.backend = backend
        self.cache = cache

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seed: int
    ) -> tuple[list[list[Completion]], list[bool]]:
        if self.cache is None:
            return self.backend.generate(conversations, params, seed), [False] * len(conversations)
        keys = [
            self.cache.key(
                self.backend.model_id,
                {
                    "call": "generate",
                    "conversation": as_dicts(c),
                    "params": asdict(params),
                    "seed": None if params.greedy else derive_seed(seed, index),
                },
            )
            for index, c in enumerate(conversations)
        ]
        found = [self.cache.get(k) for k in keys]
        missing = [i for i, value in enumerate(found) if value is None]
        if missing:
            answers = self.backend.generate([conversations[i] for i in missing], params, seed)
            for index, answer in zip(missing, answers, strict=True):
                found[index] = [_completion_to_json(c) for c in answer]
                self.cache.put(keys[index], found[index])
        results = [[_completion_from_json(c) for c in value] for value in found]  # type: ignore[union-attr]
        return results, [i not in missing for i in range(len(conversations))]

    def score_continuations(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> tuple[list[list[float] | str], list[bool]]:
        """Each conversation's continuation log-probs, or why they could not be read for it (a
        served model's top log-probs left one out): one such conversation does not lose the others."""
        if self.cache is None:
            return self._score(conversations, continuations), [False] * len(conversations)
        keys = [
            self.cache.key(
                self.backend.model_id,
                {"call": "score", "conversation": as_dicts(c), "continuations": list(continuations)},
            )
            for c in conversations
        ]
        found = [self.cache.get(k) for k in keys]
        missing = [i for i, value in enumerate(found) if value is None]
        if missing:
            scores = self._score([conversations[i] for i in missing], continuations)
            for index, value in zip(missing, scores, strict=True):
                found[index] = value
                if not isinstance(value, str):  # a failure is not an answer: ask again next time
                    self.cache.put(keys[index], value)
        return list(found), [i not in missing for i in range(len(conversations))]  # type: ignore[arg-type]

    def _score(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[list[float] | str]:
        try:
            return [list(row) for row in self.backend.score_continuations(conversations, continuations)]
        except ContinuationsNotScored as partial:
            return [
                partial.reasons[index] if row is None else list(row)
                for index, row in enumerate(partial.scores)
            ]
