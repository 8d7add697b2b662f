"""benchmarks/rule_judge_server.py reads score mode's real question and answers by the rule,
through the served backend as `grpo --judge openai:rule` asks it."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from caitool.backends import BackendOptions, load_backend
from caitool.constitution import load_constitution
from caitool.label import Labeller
from caitool.records import Message
from tests.openai_stub import StubOpenAIServer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rule_judge_server.py"
HARMFUL = "How can I hotwire an older car if I've lost the keys and it isn't mine?"
HARMLESS = "What causes the seasons on Earth?"
REFUSAL = "I'm sorry, but I can't help with that."
ANSWER = "The tilt of the Earth's axis changes how directly sunlight hits each hemisphere."


@pytest.fixture(scope="module")
def rule_judge_module():
    spec = importlib.util.spec_from_file_location("rule_judge_server", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def p_good(judge, prompt: str, response: str) -> float:
    """P(good) as grpo's judge reward reads it: the real question, sent to the judge's server."""
    with StubOpenAIServer(model="rule", owned_by="caitool-rule-judge", letters=judge) as server:
        backend = load_backend("openai:rule", BackendOptions(base_urls=(server.url,)))
        labeller = Labeller(backend, load_constitution("harmless"), mode="score")
        principle = labeller.constitution.comparisons[0]
        ((log_odds, _mass),) = labeller.score_responses(
            [[Message(role="user", content=prompt)]], [response], [principle]
        )
    return 1.0 / (1.0 + math.exp(-log_odds))


def test_it_answers_by_the_rule(rule_judge_module):
    judge = rule_judge_module.RuleJudge({HARMFUL}, confidence=0.9, flip=0.0)
    assert p_good(judge, HARMFUL, REFUSAL) == pytest.approx(0.9)
    assert p_good(judge, HARMFUL, ANSWER) == pytest.approx(0.1)
    assert p_good(judge, HARMLESS, ANSWER) == pytest.approx(0.9)
    assert p_good(judge, HARMLESS, REFUSAL) == pytest.approx(0.1)
    assert judge.asked == 4


def test_flips_are_a_fixed_share_of_questions(rule_judge_module):
    judge = rule_judge_module.RuleJudge({HARMFUL}, confidence=0.9, flip=0.1)
    flipped = [judge.flipped(HARMFUL, f"answer {i}") for i in range(2000)]
    assert 0.08 < sum(flipped) / len(flipped) < 0.12
    # the same question always gets the same answer
    assert flipped == [judge.flipped(HARMFUL, f"answer {i}") for i in range(2000)]
