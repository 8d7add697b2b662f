import pytest

from caitool.hygiene import (
    CRITIQUE_CUT,
    CRITIQUE_EMPTY,
    CRITIQUE_IS_REVISION,
    CRITIQUE_LEAD_IN,
    REVISION_CUT,
    REVISION_EMPTY,
    REVISION_IS_CRITIQUE,
    REVISION_LEAD_IN,
    REVISION_UNCHANGED,
    clean_critique,
    clean_revision,
    count_flags,
    strip_lead_in,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Sure, here is a revised response: I can't help with that.", "I can't help with that."),
        ('Sure! Revised response:\n"Please don\'t do that."', "Please don't do that."),
        (
            "Here's a rewritten version of the response that avoids harm:\n\nTalk to him first.",
            "Talk to him first.",
        ),
        ("Certainly. Here is the revised answer below:\n\nText here.", "Text here."),
        ("Revision: ok", "ok"),
        ("Critique: The response is rude.", "The response is rude."),
        ("Revised response:", ""),
    ],
)
def test_lead_ins_are_stripped(raw, expected):
    assert strip_lead_in(raw) == (expected, True)


@pytest.mark.parametrize(
    "text",
    [
        "Response time is 5 seconds: fast enough.",
        "The response is harmful: it explains how to pick a lock.",
        "Assistant's response is harmful because: it insults the user.",
        "Sure, I can help with that. Mix the flour and water.",
        'He said "hello" to me.',
    ],
)
def test_real_content_is_kept(text):
    assert strip_lead_in(text) == (text, False)


def test_critique_that_opens_like_a_rewrite_is_flagged():
    cleaned = clean_critique('Here\'s a sample response that is kind and respectful:\n\n"Hello!"', "Go away.")
    assert cleaned.text == "Hello!"
    assert cleaned.flags == [CRITIQUE_IS_REVISION, CRITIQUE_LEAD_IN]


def test_critique_that_repeats_the_response_is_flagged():
    response = "You could mix a strong laxative into his leftovers so he gets sick after eating them."
    assert (
        CRITIQUE_IS_REVISION
        in clean_critique("You could mix a strong laxative into his leftovers", response).flags
    )
    real = "The response suggests drugging the roommate, which could hurt him and is likely a crime."
    assert clean_critique(real, response).flags == []


def test_empty_and_cut_critiques_are_flagged():
    assert clean_critique("   ", "x", finished=False).flags == [CRITIQUE_EMPTY, CRITIQUE_CUT]


def test_revision_flags():
    assert clean_revision("", "before").flags == [REVISION_EMPTY]
    assert clean_revision("Revised response:  Hello,   world!", "hello world").flags == [
        REVISION_LEAD_IN,
        REVISION_UNCHANGED,
    ]
    cut = clean_revision("A different answer that got cut", "before", finished=False)
    assert cut.text == "A different answer that got cut" and cut.flags == [REVISION_CUT]


def test_revision_that_talks_about_the_response_is_flagged():
    assert clean_revision("The response is suitable for a child.", "x").flags == [REVISION_IS_CRITIQUE]
    assert clean_revision("The bank will not help with that.", "x").flags == []


def test_count_flags():
    assert count_flags([[REVISION_EMPTY], [], [REVISION_EMPTY, REVISION_CUT]]) == {
        REVISION_EMPTY: 2,
        REVISION_CUT: 1,
    }
