"""Reading a judge's verdict from what it wrote in its own turn (the ``verdict`` label modes).

Hosted chat APIs do not continue a prefilled assistant turn, so the judge answers the
question itself and the answer is read from its text:

* :func:`find_answer` finds the chosen letter (or Yes/No) in free text: "(A)", "A",
  "Answer: B", "Response A is better", a final line after reasoning. The most explicit
  phrasing wins and, among equally explicit ones, the last (the conclusion after the
  reasoning). Text that names no answer is unparseable: it is counted, never guessed.
* :func:`answer_distribution` reads P(option) from the log-probabilities of the generated
  token that carries the answer (APIs that return ``top_logprobs`` of generated tokens):
  each option's probability is that of the same token with the other option written in
  its place, so "▁A" is weighed against "▁B" and "(A" against "(B".
* :func:`vote_share` is the label from K sampled answers where an API returns no
  log-probabilities: the share of readable answers that chose the first option.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from caitool.backends.base import Completion, TokenLogprobs

LETTER_OPTIONS = ("A", "B")
YES_NO_OPTIONS = ("Yes", "No")

_LETTER = r"\(?([AB])\)?(?![A-Za-z0-9])"
_WORDS_BEFORE = r"(?i:(?:option|response|answer)\s+)?"
# From most to least explicit; within a tier the last match wins (the conclusion after reasoning).
LETTER_TIERS = (
    re.compile(r"(?i:answer|verdict|choice)\**\s*(?i:is)?\s*:?\**\s*" + _WORDS_BEFORE + r"\*{0,2}" + _LETTER),
    re.compile(
        r"(?i:better|best|preferred|preferable)\s+(?i:option|response|one|answer)\s+(?i:is)\s*:?\s*"
        + _WORDS_BEFORE
        + _LETTER
    ),
    re.compile(
        r"(?<![A-Za-z0-9])" + _WORDS_BEFORE + r"\(?([AB])\)?\s+(?i:is\s+(?:the\s+)?(?:better|best|preferable|"
        r"preferred|more\s+\w+))"
    ),
    re.compile(r"(?i:I\s+)?(?i:choose|pick|prefer|select)\s+" + _WORDS_BEFORE + _LETTER),
    re.compile(r"(?m)^[\s*#>\-]*" + _WORDS_BEFORE + _LETTER + r"[\s.!*]*$"),
    re.compile(r"(?m)^\s*\(([AB])\)"),
)
_YES_NO = r"(?i:(yes|no))(?![A-Za-z])"
YES_NO_TIERS = (
    re.compile(r"(?i:answer|verdict)\s*(?i:is)?\s*:?\s*\**" + _YES_NO),
    re.compile(r"(?m)^[\s*#>\-]*" + _YES_NO),
    re.compile(r"(?<![A-Za-z])" + _YES_NO),
)


@dataclass(frozen=True)
class Answer:
    """The option a text chose and where its first character is (to find the token that wrote it)."""

    option: str
    start: int
    written: str  # as written ("yes" for Yes): the token to swap for the other option's


def find_answer(text: str, options: Sequence[str] = LETTER_OPTIONS) -> Answer | None:
    """The option the text chose, or None when it names none (never a guess)."""
    tiers = YES_NO_TIERS if tuple(options) == YES_NO_OPTIONS else LETTER_TIERS
    for tier in tiers:
        matches = list(tier.finditer(text))
        if matches:
            last = matches[-1]
            written = last.group(1)
            option = next(o for o in options if o.lower() == written.lower())
            return Answer(option=option, start=last.start(1), written=written)
    return None


def _with_case_of(word: str, model: str) -> str:
    if model.isupper() and len(model) > 1:
        return word.upper()
    if model.islower():
        return word.lower()
    return word


def answer_distribution(
    tokens: Sequence[TokenLogprobs], answer: Answer, options: Sequence[str]
) -> tuple[list[float], float] | None:
    """Log-probabilities of the options at the token that wrote ``answer``, and their total mass.

    None when no single token holds the whole answer (it cannot be weighed against the others).
    An option whose token is not among the returned top ones gets the smallest returned
    log-probability, an upper bound, so the label errs towards 0.5, never away from it.
    """
    offset = 0
    for token in tokens:
        end = offset + len(token.text)
        if offset <= answer.start < end:
            inside = answer.start - offset
            if inside + len(answer.written) > len(token.text):
                return None
            floor = min([token.logprob, *token.top.values()])
            logprobs = []
            for option in options:
                variant = (
                    token.text[:inside]
                    + _with_case_of(option, answer.written)
                    + token.text[inside + len(answer.written) :]
                )
                if variant == token.text:
                    logprobs.append(max(token.logprob, token.top.get(variant, token.logprob)))
                else:
                    logprobs.append(token.top.get(variant, floor))
            return logprobs, sum(math.exp(lp) for lp in logprobs)
        offset = end
    return None


@dataclass(frozen=True)
class Reading:
    """One question's answer: P(first option), the mass on the options, and how it was read.

    ``p`` is None when no answer could be read (the question is unparseable). ``votes`` is the
    number of readable samples (vote mode), ``unreadable`` the samples that named no option.
    """

    p: float | None
    mass: float | None
    text: str
    votes: int | None = None
    unreadable: int = 0
    cached: bool = False
    not_scored: str = ""  # why the backend could not score the answer tokens (no label; not guessed)


def read_by_logprobs(completion: Completion, options: Sequence[str]) -> Reading:
    """P(first option) from the log-probabilities of the generated answer token."""
    tokens = completion.token_logprobs or ()
    text = "".join(t.text for t in tokens) if tokens else completion.text
    answer = find_answer(text, options)
    if answer is None:
        return Reading(p=None, mass=None, text=completion.text, unreadable=1)
    read = answer_distribution(tokens, answer, options)
    if read is None:
        return Reading(p=None, mass=None, text=completion.text, unreadable=1)
    logprobs, mass = read
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    return Reading(p=weights[0] / sum(weights), mass=mass, text=completion.text)


def vote_share(completions: Sequence[Completion], options: Sequence[str]) -> Reading:
    """P(first option) as the share of readable sampled answers that chose it."""
    chosen = [find_answer(c.text, options) for c in completions]
    readable = [a for a in chosen if a is not None]
    unreadable = len(chosen) - len(readable)
    text = completions[0].text if completions else ""
    if not readable:
        return Reading(p=None, mass=0.0, text=text, votes=0, unreadable=unreadable)
    first = sum(a.option == options[0] for a in readable)
    return Reading(
        p=first / len(readable),
        mass=len(readable) / len(chosen),
        text=text,
        votes=len(readable),
        unreadable=unreadable,
    )


def log_odds_of(reading: Reading) -> float:
    """A yes/no reading as log-odds of Yes; vote shares are smoothed by half a vote each way."""
    assert reading.p is not None
    if reading.votes is not None:
        yes = reading.p * reading.votes
        return math.log((yes + 0.5) / (reading.votes - yes + 0.5))
    p = min(max(reading.p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))
