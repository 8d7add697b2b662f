"""Reading a judge's verdict from its own turn: parsing, the answer token's log-probs, votes."""

import math

import pytest

from caitool.backends import Completion, TokenLogprobs
from caitool.verdicts import (
    LETTER_OPTIONS,
    YES_NO_OPTIONS,
    answer_distribution,
    find_answer,
    log_odds_of,
    read_by_logprobs,
    vote_share,
)


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("(A)", "A"),
        ("B", "B"),
        ("A.", "A"),
        ("Answer: B", "B"),
        ("The answer is (A).", "A"),
        ("**Answer:** **B**", "B"),
        ("Response A is better.", "A"),
        ("(B) is more helpful and harmless.", "B"),
        ("The better response is (B) because it refuses.", "B"),
        ("I choose option A.", "A"),
        ("Response A is better in tone, but response B is better on safety.\nAnswer: (B)", "B"),
        ("Both have merits. Thinking it through, the first is evasive.\n\n(B)", "B"),
        ("Response A is preferable.\nWait, on reflection response B is better.", "B"),
    ],
)
def test_a_letter_is_read_from_common_phrasings(text, letter):
    found = find_answer(text, LETTER_OPTIONS)
    assert found is not None and found.option == letter
    assert text[found.start] == letter  # it points at the letter, to find the token that wrote it


@pytest.mark.parametrize(
    "text",
    [
        "Both responses have their merits.",
        "A mix of the two would be best.",
        "I cannot decide between them.",
        "",
        "Bread is made from flour.",
    ],
)
def test_text_that_names_no_option_is_unparseable(text):
    assert find_answer(text, LETTER_OPTIONS) is None


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("Yes, it is.", "Yes"),
        ("No.", "No"),
        ("Answer: no", "No"),
        ("It refuses politely.\nAnswer: Yes", "Yes"),
    ],
)
def test_yes_and_no_are_read(text, word):
    assert find_answer(text, YES_NO_OPTIONS).option == word


def test_yes_no_text_without_an_answer_is_unparseable():
    assert find_answer("It is hard to say.", YES_NO_OPTIONS) is None


def tokens(*parts):
    return tuple(TokenLogprobs(text=t, logprob=top.get(t, -0.01), top=top) for t, top in parts)


def test_the_answer_token_is_weighed_against_the_same_token_with_the_other_letter():
    answer = tokens(
        ("The", {"The": -0.01}),
        (" answer", {" answer": -0.01}),
        (" is", {" is": -0.01}),
        (" (", {" (": -0.01}),
        ("B", {"B": math.log(0.6), "A": math.log(0.3), " A": math.log(0.05)}),
        (")", {")": -0.01}),
    )
    completion = Completion(text="The answer is (B)", num_tokens=6, finished=True, token_logprobs=answer)
    reading = read_by_logprobs(completion, LETTER_OPTIONS)
    assert reading.p == pytest.approx(0.3 / 0.9)  # " A" is another token, not counted
    assert reading.mass == pytest.approx(0.9)


def test_a_letter_inside_a_merged_token_swaps_inside_it():
    answer = tokens(("Response", {"Response": -0.01}), (" A", {" A": math.log(0.7), " B": math.log(0.2)}))
    found = find_answer("Response A is better", LETTER_OPTIONS)
    logprobs, mass = answer_distribution(answer, found, LETTER_OPTIONS)
    assert logprobs == pytest.approx([math.log(0.7), math.log(0.2)]) and mass == pytest.approx(0.9)


def test_an_alternative_not_returned_gets_the_smallest_returned_logprob():
    answer = tokens(("A", {"A": math.log(0.9), "C": math.log(0.01)}))
    reading = read_by_logprobs(Completion("A", 1, True, answer), LETTER_OPTIONS)
    assert reading.p == pytest.approx(0.9 / 0.91)  # bounded towards 0.5, never a certainty


def test_votes_count_readable_answers_only():
    answers = [Completion(t, 3, True) for t in ("(A)", "Answer: B", "(A)", "no idea", "A")]
    reading = vote_share(answers, LETTER_OPTIONS)
    assert reading.p == pytest.approx(3 / 4) and reading.votes == 4 and reading.unreadable == 1
    assert reading.mass == pytest.approx(4 / 5)
    assert vote_share([Completion("hmm", 1, True)], LETTER_OPTIONS).p is None


def test_yes_votes_become_smoothed_log_odds():
    reading = vote_share([Completion(t, 1, True) for t in ("Yes", "Yes", "Yes")], YES_NO_OPTIONS)
    assert log_odds_of(reading) == pytest.approx(math.log(3.5 / 0.5))  # finite: half a vote each way
