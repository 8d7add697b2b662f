"""Output hygiene for critiques and revisions: clean what is safe to clean, flag the rest.

Small models wrap their answers in boilerplate ("Sure, here is a revised response:") that
would otherwise become fine-tuning targets, and they sometimes fail in recognisable ways:
an empty revision, a revision identical to the response it was meant to improve, or a
critique that is really a rewritten answer. Lead-ins are stripped (the raw text is never
needed downstream); failures become flags on the round, and nothing is ever dropped, so
``sft`` and a human reviewer can decide what to do with them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Flags stored on a Round. The names are also the keys of the end-of-run counts.
CRITIQUE_LEAD_IN = "critique-lead-in-stripped"
CRITIQUE_EMPTY = "critique-empty"
CRITIQUE_IS_REVISION = "critique-is-revision"
CRITIQUE_CUT = "critique-cut"
REVISION_LEAD_IN = "revision-lead-in-stripped"
REVISION_EMPTY = "revision-empty"
REVISION_UNCHANGED = "revision-unchanged"
REVISION_IS_CRITIQUE = "revision-is-critique"
REVISION_CUT = "revision-cut"

_OPENER = r"(?:(?:sure|certainly|of course|okay|ok|absolutely|alright|great)\b[\s,!.]*)?"
_HERE_IS = r"(?:here(?:'s|’s| is| are)\s+(?:the|a|an|my|your)?\s*)?"
_ADJECTIVE = (
    r"(?:revised|rewritten|updated|improved|new|edited|corrected|safer|better|final|sample|example|alternative"
    r"|possible|suggested|modified)"
)
_NOUN = r"(?:version|response|answer|reply|revision|rewrite|critique|assistant(?:'s)?(?:\s+response)?)"
# A tail may only qualify the noun ("... of the response that avoids harm"), so a real
# sentence such as "Response time is 5 seconds: ..." is never taken for a lead-in.
_TAIL = r"(?:\s+(?:of|to|for|that|which|without|with|in|from|below|above|addressing)\b[^:\n.!?]{0,100})?"
# One line ending in a colon, made only of opener / "here is" / adjective / noun / tail.
_LEAD_IN = re.compile(
    rf"^\s*{_OPENER}{_HERE_IS}(?:{_ADJECTIVE}\s+)?{_NOUN}\b{_TAIL}\s*:[ \t]*",
    re.IGNORECASE,
)
_REWRITE_LEAD_IN = re.compile(
    rf"^\s*{_OPENER}{_HERE_IS}(?:{_ADJECTIVE}\s+{_NOUN}|revision|rewrite)\b{_TAIL}\s*:",
    re.IGNORECASE,
)
# A revision that opens by talking about "the response" comments on it instead of rewriting it.
_ABOUT_THE_RESPONSE = re.compile(
    r"^\s*(?:the|this|that)\s+(?:(?:assistant's|ai's|original|revised|previous)\s+)?"
    r"(?:response|reply|answer|assistant)\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"[\w']+")
# A critique whose word trigrams mostly reappear in the response it critiques is a copy of
# that response (the model answered again instead of critiquing).
_COPY_OVERLAP = 0.6
_COPY_MIN_WORDS = 6


def strip_lead_in(text: str) -> tuple[str, bool]:
    """Remove boilerplate lead-ins (repeatedly: "Sure! Revised response:") and wrapping quotes."""
    cleaned = text.strip()
    stripped = False
    for _ in range(3):
        match = _LEAD_IN.match(cleaned)
        if match is None:
            break
        cleaned = cleaned[match.end() :].strip()
        stripped = True
    if stripped and len(cleaned) >= 2 and cleaned[0] == cleaned[-1] and cleaned[0] in "\"'“”":
        cleaned = cleaned[1:-1].strip()
    return cleaned, stripped


def normalised(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def copies_response(critique: str, response: str) -> bool:
    if len(_WORD.findall(critique)) < _COPY_MIN_WORDS:
        return False
    grams = _trigrams(critique)
    return bool(grams) and len(grams & _trigrams(response)) / len(grams) >= _COPY_OVERLAP


@dataclass
class Cleaned:
    text: str
    flags: list[str] = field(default_factory=list)


def clean_critique(raw: str, critiqued_response: str, *, finished: bool = True) -> Cleaned:
    """A critique that opens like a rewrite, or mostly repeats the response, is flagged as a revision."""
    flags: list[str] = []
    if _REWRITE_LEAD_IN.match(raw) or copies_response(raw, critiqued_response):
        flags.append(CRITIQUE_IS_REVISION)
    text, stripped = strip_lead_in(raw)
    if stripped:
        flags.append(CRITIQUE_LEAD_IN)
    if not text:
        flags.append(CRITIQUE_EMPTY)
    if not finished:
        flags.append(CRITIQUE_CUT)
    return Cleaned(text, flags)


def clean_revision(raw: str, previous_response: str, *, finished: bool = True) -> Cleaned:
    flags: list[str] = []
    text, stripped = strip_lead_in(raw)
    if stripped:
        flags.append(REVISION_LEAD_IN)
    if not text:
        flags.append(REVISION_EMPTY)
    elif normalised(text) == normalised(previous_response):
        flags.append(REVISION_UNCHANGED)
    elif _ABOUT_THE_RESPONSE.match(text):
        flags.append(REVISION_IS_CRITIQUE)
    if not finished:
        flags.append(REVISION_CUT)
    return Cleaned(text, flags)


def count_flags(flag_lists: list[list[str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for flags in flag_lists:
        for flag in flags:
            counts[flag] = counts.get(flag, 0) + 1
    return counts
