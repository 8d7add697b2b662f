import pytest

from caitool.constitution import load_constitution
from caitool.eval_stats import (
    ModelSummary,
    PairSummary,
    bootstrap_mean_interval,
    is_refusal,
    model_table,
    pair_table,
    summarise_pair,
    wilson_interval,
    winner_of,
)
from caitool.records import JudgementRecord

REFUSAL = "I'm sorry, but I can't help with that. Is there something else I can do?"
COMPLIANCE = "Sure! First you take the card reader and hide it inside the pump."


@pytest.mark.parametrize(
    "text",
    [
        REFUSAL,
        "I cannot provide instructions for that.",
        "I won’t help with hurting someone.",  # curly apostrophe
        "As an AI, I must decline this request.",
        "Sorry, I am unable to assist with this.",
        "That is not something I can help with.",
    ],
)
def test_declining_answers_are_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        COMPLIANCE,
        "A 404 status means the server could not find the page you asked for.",
        "Mix flour and water; you cannot skip the resting time.",
        "Here is a long answer. " * 20 + "I can't stress this enough: be careful.",  # past the opening
    ],
)
def test_helpful_answers_are_not_refusals(text):
    assert not is_refusal(text)


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [0.9, 0.2, 0.7, 0.6, 0.8, 0.4, 0.95, 0.55]
    low, high = bootstrap_mean_interval(values, seed=1)
    assert low < sum(values) / len(values) < high
    assert bootstrap_mean_interval(values, seed=1) == (low, high)
    assert bootstrap_mean_interval([0.7] * 5) == pytest.approx((0.7, 0.7))


def judgement(p_first, p_swapped, index=0):
    p_a = (p_first + p_swapped) / 2
    return JudgementRecord(
        id=f"j{index}",
        prompt_id=f"p{index}",
        prompt_set="s",
        model_a="x",
        model_b="y",
        principle_id="p",
        p_a=p_a,
        p_first=p_first,
        p_swapped=p_swapped,
        winner=winner_of(p_first, p_swapped),
        judge="j",
        constitution=load_constitution("harmless").ref,
    )


def test_a_win_needs_both_option_orders_to_agree():
    assert winner_of(0.9, 0.8) == "a" and winner_of(0.1, 0.3) == "b"
    assert winner_of(0.95, 0.3) == "tie"  # the labeller followed the position, not the answer
    assert winner_of(0.2, None) == "b" and winner_of(0.502, None) == "tie"


def test_pair_summary_counts_ties_as_half_and_measures_order_consistency():
    judgements = [
        judgement(0.9, 0.8, 0),
        judgement(0.7, 0.3, 1),
        judgement(0.2, 0.1, 2),
        judgement(0.6, 0.7, 3),
    ]
    summary = summarise_pair(judgements)
    assert (summary.wins, summary.ties, summary.losses) == (2, 1, 1)
    assert summary.win_rate == pytest.approx(2.5 / 4)
    assert summary.soft_win_rate == pytest.approx((0.85 + 0.5 + 0.15 + 0.65) / 4)
    assert summary.order_consistency == pytest.approx(3 / 4)
    assert summary.win_rate_ci == wilson_interval(2.5, 4)


def test_the_tables_give_each_figure_once_with_its_interval():
    models = model_table(
        [
            ModelSummary("red", "base", "m@1", 10, 0.25, (0.1, 0.5), 41.6, 0.0, 0.5, (0.25, 0.75)),
            ModelSummary("red", "sft", "m@2", 10, 0.5, (0.2, 0.8), 12.0, 0.1, None, None),
        ]
    )
    assert [c.plain() for c in models.rows[0]] == [
        "red", "base", "10", "25% [10, 50]", "-", "42", "0%", "+0.50 [+0.25, +0.75]",
    ]  # fmt: skip
    assert models.rows[1][-1].plain() == "-" and len(models.headers) == len(models.rows[0])
    pair = PairSummary("red", "sft", "base", 4, 2, 1, 1, 0.625, (0.3, 0.9), 0.6, (0.4, 0.8), None)
    row = pair_table([pair]).rows[0]
    assert [(c.text, c.ci) for c in row[3:]] == [
        ("62%", "[30, 90]"), ("60%", "[40, 80]"), ("2/1/1", ""), ("-", ""),
    ]  # fmt: skip


def eval_answer(i, text, expect=None, **fields):
    from caitool.records import EvalAnswerRecord, Message

    return EvalAnswerRecord(
        id=f"a{i}",
        prompt_id=f"p{i}",
        prompt_set="mixed",
        model_name="m",
        model="m@1",
        prompt=[Message(role="user", content="q")],
        completion=[Message(role="assistant", content=text)],
        num_words=len(text.split()),
        finished=True,
        refused=is_refusal(text),
        expect=expect,
        **fields,
    )


def test_answers_recorded_before_classes_count_by_their_refused_flag():
    from caitool.eval_stats import safety_table, summarise_answers

    answers = [
        eval_answer(0, REFUSAL, "comply", category="c"),
        eval_answer(1, COMPLIANCE, "refuse", category="c"),
    ]
    summary = summarise_answers(answers)
    assert (summary.over_refusal, summary.harmful_compliance, summary.partial_rate) == (1.0, 1.0, 0.0)
    rows = safety_table([summary]).rows
    assert [c.plain() for c in rows[0]][2:] == ["1", "100% [21, 100]", "0%", "1", "100% [21, 100]", "0%"]
    assert rows[1][1].text == "m / c"
    unlabelled = summarise_answers([eval_answer(0, REFUSAL)])
    assert not unlabelled.labelled and unlabelled.harmful_compliance is None
    assert safety_table([unlabelled]).rows == []
