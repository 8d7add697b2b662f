"""Rewards whose optimum is known, for tests that show an RL trainer moves a policy toward it."""

from __future__ import annotations


class VowelShare:
    """Scores a response by the share of its letters that are vowels (0 for one without letters).

    A random tiny model writes about 37% vowels; a policy optimiser that follows its reward
    must raise that share, whatever the reward model on disk would have said.
    """

    def score(self, prompts, responses) -> list[float]:
        return [vowel_share(response) for response in responses]


def vowel_share(text: str) -> float:
    letters = [c for c in text.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / max(len(letters), 1)
