"""The generation-backend interface every phase talks to.

Two calls do all the work:

* ``generate(conversations, params, seed)``: sample ``params.n`` completions per conversation.
* ``score_continuations(conversations, continuations)``: the log-probability of each candidate
  one-token continuation after each conversation, the token being the one it is when written
  there (the preference labeller reads option letters this way).

A conversation whose last turn is an assistant turn is *continued* (the turn is a prefill,
e.g. "The answer is ("); otherwise a fresh assistant turn is opened.

Besides the two calls a backend says who it is: ``model_id`` (short, stamped on every
record), ``describe()`` (the manifest entry: where the model lives, its weights hash or the
server that answered), ``parallelism`` (how many conversations it works on at once, which
sizes the chunks a phase hands it) and ``stats()`` (counters such as retried requests, for
the summary and the manifest). Tests use a scripted fake with the same shape (``tests/fakes.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from caitool.errors import CaitoolError
from caitool.records import Conversation


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    n: int = 1
    ignore_eos: bool = False  # always produce max_new_tokens (benchmarks, like vLLM's ignore_eos)
    # Ask for the N most likely alternatives of every generated token (0: none). Backends that
    # cannot return them leave Completion.token_logprobs None (a judge then votes instead).
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token: its text, its log-probability and the top alternatives' (text -> logprob)."""

    text: str
    logprob: float
    top: dict[str, float]


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    finished: bool  # ended at end-of-turn rather than at max_new_tokens
    # The generated tokens with their top alternatives, when asked for (top_logprobs) and returned.
    token_logprobs: tuple[TokenLogprobs, ...] | None = None


class GenerationBackend(Protocol):
    model_id: str  # short, stamped on records (name@weights-hash)
    parallelism: int  # conversations worked on at once (a local batch, or requests in flight)

    def describe(self) -> dict[str, Any]: ...

    def stats(self) -> dict[str, int]: ...

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seed: int
    ) -> list[list[Completion]]: ...

    def score_continuations(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[list[float]]: ...


class ContinuationsNotScored(CaitoolError):
    """Some conversations' continuations could not be scored (a served model's top log-probs
    left a letter out); ``scores`` holds the others' rows and None for those, ``reasons`` says why
    for each of those. A caller that can go on without them (label-preferences) catches this."""

    def __init__(self, scores: list[list[float] | None], reasons: dict[int, str]):
        first = reasons[min(reasons)]
        more = f" (and {len(reasons) - 1} more conversations)" if len(reasons) > 1 else ""
        super().__init__(first + more)
        self.scores = scores
        self.reasons = reasons


@dataclass(frozen=True)
class BackendOptions:
    """How to run or reach a model, for every phase that generates or scores.

    ``engine``, ``batch_size``, ``dtype`` and ``trust_remote_code`` apply to local models
    (``engine="vllm"`` runs them with vLLM in this process, ``concurrency`` sequences at once);
    ``base_urls`` (several replicas are used round-robin), ``concurrency``, ``request_timeout``,
    ``max_retries`` and ``api_key_env`` (the *name* of the variable holding the key, never
    the key; None: ``CAITOOL_API_KEY`` when set, else no key) to served ones.
    """

    batch_size: int = 8
    dtype: str = "auto"
    trust_remote_code: bool = False
    base_urls: tuple[str, ...] = ()
    concurrency: int = 64
    request_timeout: float = 600.0
    max_retries: int = 5
    api_key_env: str | None = None
    tokenizer: str | None = None  # a local tokenizer: render chat templates here, use /v1/completions
    # Client-side limits for hosted APIs (0: none): requests are paced to stay under them.
    max_requests_per_minute: float = 0.0
    max_tokens_per_minute: float = 0.0
    engine: str = "transformers"


SERVED_PREFIX = "openai:"


@dataclass(frozen=True)
class ServedSpec:
    """A model behind an OpenAI-compatible API: its served name and the replicas that serve it."""

    name: str
    base_urls: tuple[str, ...]

    @property
    def spec(self) -> str:
        return SERVED_PREFIX + self.name


def derive_seed(seed: int, *parts: object) -> int:
    """A seed for one unit of work that depends only on the run seed and the unit's identity."""
    payload = repr((seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(payload).digest()[:4], "little")
