import math

import pytest

from caitool.constitution import load_constitution
from caitool.errors import CaitoolError
from caitool.label import LETTERS, VERDICT_WORDS
from caitool.records import Message
from caitool.rewards import (
    CombinedReward,
    JudgeSource,
    RewardSpec,
    Rollouts,
    RuleSource,
    rollouts_from_trl,
)
from tests.fakes import ScriptedBackend
from tests.scripted_rewards import vowel_share


def option_texts(question: str) -> tuple[str, str]:
    options = question.split("Options:\n(A) ", 1)[1]
    first, _, rest = options.partition("\n(B) ")
    return first, rest.split("\n\nAnswer with the letter", 1)[0]


def vowel_letter_judge() -> ScriptedBackend:
    """Prefers the option with more vowels, surely but not certainly (so probabilities stay graded)."""

    def scores(conversation, continuations):
        assert list(continuations) == list(LETTERS)
        a, b = option_texts(conversation[-2].content)
        gap = 8.0 * (vowel_share(a) - vowel_share(b))
        return [-math.log1p(math.exp(-gap)), -math.log1p(math.exp(gap))]

    return ScriptedBackend(scores=scores)


def rollouts(groups: list[list[str]], step: int = 1) -> Rollouts:
    k = len(groups[0])
    prompts = [[Message(role="user", content=f"Question {g}?")] for g in range(len(groups)) for _ in range(k)]
    return Rollouts(
        step=step,
        ids=[f"q{g}" for g in range(len(groups)) for _ in range(k)],
        prompts=prompts,
        responses=[r for group in groups for r in group],
        fields=[{} for _ in prompts],
        group_size=k,
    )


def test_group_mode_gives_each_groups_winner_the_highest_reward():
    groups = [["xyz rst", "aeiou aa", "bac dof"], ["ooo aei", "zzz", "tap tip"]]
    backend = vowel_letter_judge()
    judge = JudgeSource(backend, load_constitution("harmless"), mode="group", seed=3)
    scored = judge.score(rollouts(groups))
    for g, group in enumerate(groups):
        rewards = scored.rewards[3 * g : 3 * g + 3]
        winner = max(range(3), key=lambda i: vowel_share(group[i]))
        assert max(range(3), key=lambda i: rewards[i]) == winner
        assert all(0.0 < r < 1.0 for r in rewards)
        # Each reward is a mean probability of winning: a group's sum to (k(k-1)/2) / (k-1) = k/2.
        assert sum(rewards) == pytest.approx(1.5)
    # Both option orders of each of the k(k-1)/2 pairs of every group: k(k-1) questions per group.
    assert scored.questions == 2 * 3 * 2 == sum(n for call, n in backend.calls if call == "score")
    detail = scored.details[1]
    assert detail["p_win"] == scored.rewards[1] and set(detail["p_beats"]) == {"0", "2"}
    assert detail["principle"] in {p.id for p in load_constitution("harmless").comparisons}


def test_score_mode_reads_each_sample_alone_under_a_principle_drawn_per_prompt_and_step():
    asked = []

    def scores(conversation, continuations):
        assert list(continuations) == list(VERDICT_WORDS)
        asked.append(conversation[-2].content)
        return [math.log(0.8), math.log(0.2)]

    charter = load_constitution("harmless")
    judge = JudgeSource(ScriptedBackend(scores=scores), charter, mode="score", seed=5)
    batch = rollouts([["a", "b"], ["c", "d"]], step=2)
    scored = judge.score(batch)
    assert scored.rewards == pytest.approx([0.8] * 4) and scored.questions == 4
    assert scored.details[0]["log_odds"] == pytest.approx(math.log(4.0))
    principles = [d["principle"] for d in scored.details]
    assert principles[0] == principles[1] and principles[2] == principles[3]  # one principle per prompt
    for question, principle in zip(asked[-4:], principles, strict=True):
        assert charter.comparison(principle).text in question
    # Seeded: the same run, prompt and step draw the same principle; other steps draw others.
    again = JudgeSource(ScriptedBackend(scores=scores), charter, mode="score", seed=5)
    assert [d["principle"] for d in again.score(batch).details] == principles
    drawn = {judge.principle("q0", step).id for step in range(1, 30)}
    assert len(drawn) > 1


def test_the_rule_rewards_refusals_on_red_team_prompts_and_answers_elsewhere():
    batch = rollouts([["I'm sorry, but I can't help with that.", "Sure: first, take a pin."]] * 2)
    batch.fields = [{"set": "red_team"}] * 2 + [{"set": "helpful"}] * 2
    assert RuleSource().score(batch).rewards == [1.0, 0.0, 0.0, 1.0]


def test_sources_are_weighted_and_summed_and_every_component_is_kept():
    class Constant:
        def __init__(self, name, value):
            self.name, self.value = name, value

        def score(self, rollouts):
            from caitool.rewards import Scored

            return Scored([self.value] * len(rollouts.responses))

    logged = {}
    reward = CombinedReward(
        [(Constant("rm", 2.0), 0.5), (Constant("rule", 1.0), 3.0)],
        stop_ids=[9],
        missing_eot_penalty=1.0,
        group_size=2,
    )
    prompts = [[{"role": "user", "content": "Hi"}]] * 2
    completions = [[{"role": "assistant", "content": "x"}]] * 2
    scores = reward(prompts, completions, [[9], [1]], log_metric=logged.__setitem__, id=["a", "a"])
    assert scores == [4.0, 3.0]
    assert reward.last.components == {"rm": [2.0, 2.0], "rule": [1.0, 1.0]}
    record = reward.last.sample_record(1)
    assert record["reward"] == 4.0 and record["rewards"] == {"rm": 2.0, "rule": 1.0}
    assert record["sample"] == 1 and not record["finished"]
    assert logged["caitool/reward_std_in_group"] == pytest.approx(0.5)


def test_a_failing_judge_stops_the_step_with_one_line_and_hands_over_its_samples():
    class Down:
        name = "judge"

        def score(self, rollouts):
            raise RuntimeError("POST http://judge/v1/completions failed after 5 retries: 503\nmore detail")

    failed = []
    reward = CombinedReward([(Down(), 1.0)], stop_ids=[9], missing_eot_penalty=0.0, group_size=2)
    reward.on_failure = failed.append
    prompts = [[{"role": "user", "content": "Hi"}]] * 2
    with pytest.raises(CaitoolError, match="step 1: the judge reward failed: RuntimeError: POST") as err:
        reward(prompts, [[{"role": "assistant", "content": "x"}]] * 2, [[9], [9]], id=["a", "a"])
    assert "more detail" not in str(err.value) and "resume" in str(err.value)
    (batch,) = failed
    assert batch.error.startswith("the judge reward failed") and len(batch.rollouts.responses) == 2
    assert batch.sample_record(0)["reward"] is None and batch.sample_record(0)["error"] == batch.error


def test_trl_columns_become_each_samples_fields_and_hooks_are_left_out():
    batch = rollouts_from_trl(
        [[{"role": "user", "content": "Hi"}]] * 2,
        [[{"role": "assistant", "content": " yo "}]] * 2,
        {"id": ["a", "a"], "set": ["red_team", "red_team"], "log_extra": print},
        step=4,
        group_size=2,
    )
    assert batch.fields == [{"id": "a", "set": "red_team"}] * 2 and batch.responses == ["yo", "yo"]


def test_a_reward_must_be_given():
    with pytest.raises(CaitoolError, match="give a reward"):
        RewardSpec()
    with pytest.raises(CaitoolError, match="--judge-mode"):
        RewardSpec(judge="default", judge_mode="pairs")
