"""What hosted chat APIs need beyond a self-served model, for the served backend.

* :class:`RateLimiter`: client-side pacing under ``--max-requests-per-minute`` and
  ``--max-tokens-per-minute``. Requests are spaced evenly (no burst at the start of a
  minute), so a run stays under a provider's per-minute quota instead of living on 429s.
* :func:`retry_after_seconds`: a 429/503's ``Retry-After`` header (seconds or an HTTP date).
* :class:`Usage`: prompt and completion tokens as the API reports them (``usage``), summed
  over a run for its summary and manifest, so a run can be priced.
* :func:`generated_token_logprobs`: the log-probabilities of the generated tokens of a chat
  answer (``logprobs: true, top_logprobs: N``), which the verdict modes read a letter from.
* :func:`wants_max_completion_tokens`: OpenAI's newer models refuse ``max_tokens`` with a 400
  that names ``max_completion_tokens``; the backend then sends that field instead.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from caitool.backends.base import TokenLogprobs

# A request's size before it is sent, for the token limit: about four characters a token.
CHARS_PER_TOKEN = 4
RETRY_AFTER_CAP_SECONDS = 300.0


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // CHARS_PER_TOKEN)


class RateLimiter:
    """Paces requests: each waits until the one before it has used up its share of the minute.

    A request of T tokens takes max(60 / rpm, 60 * T / tpm) seconds of the schedule; threads
    reserve their slot under a lock and sleep outside it.
    """

    def __init__(
        self,
        requests_per_minute: float = 0.0,
        tokens_per_minute: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._clock = clock
        self._sleep = sleep
        self._next_free = 0.0
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.requests_per_minute > 0 or self.tokens_per_minute > 0

    def acquire(self, tokens: int) -> None:
        if not self.active:
            return
        spacing = 60.0 / self.requests_per_minute if self.requests_per_minute > 0 else 0.0
        if self.tokens_per_minute > 0:
            spacing = max(spacing, 60.0 * tokens / self.tokens_per_minute)
        with self._lock:
            now = self._clock()
            start = max(now, self._next_free)
            self._next_free = start + spacing
        if start > now:
            self._sleep(start - now)


def retry_after_seconds(headers: Any) -> float | None:
    """The wait a ``Retry-After`` header asks for (capped), or None when there is none."""
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_SECONDS)


@dataclass
class Usage:
    """Tokens the API billed, summed over a run (thread-safe)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, answer: Any) -> None:
        usage = answer.get("usage") if isinstance(answer, dict) else None
        if not isinstance(usage, dict):
            return
        with self._lock:
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)

    def stats(self) -> dict[str, int]:
        if not (self.prompt_tokens or self.completion_tokens):
            return {}
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


def generated_token_logprobs(choice: dict[str, Any]) -> tuple[TokenLogprobs, ...] | None:
    """The generated tokens of one chat choice with their top alternatives, or None if not returned."""
    content = (choice.get("logprobs") or {}).get("content")
    if not content:
        return None
    tokens = []
    for entry in content:
        top: dict[str, float] = {}
        for alternative in entry.get("top_logprobs") or []:
            token, logprob = alternative.get("token"), alternative.get("logprob")
            if token is not None and logprob is not None:
                top[token] = max(top.get(token, logprob), logprob)
        tokens.append(TokenLogprobs(text=entry.get("token", ""), logprob=entry.get("logprob", 0.0), top=top))
    return tuple(tokens)


def wants_max_completion_tokens(message: str) -> bool:
    """A 400 saying max_tokens is not supported and max_completion_tokens should be used."""
    return "max_completion_tokens" in message and "max_tokens" in message and "answered 400" in message


def with_max_completion_tokens(body: dict[str, Any]) -> dict[str, Any]:
    if "max_tokens" not in body:
        return body
    renamed = {k: v for k, v in body.items() if k != "max_tokens"}
    renamed["max_completion_tokens"] = body["max_tokens"]
    return renamed
