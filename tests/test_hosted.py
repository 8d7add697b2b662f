"""What hosted APIs need: pacing under per-minute limits, Retry-After, usage, max_completion_tokens."""

import pytest

from caitool.backends.hosted import (
    RateLimiter,
    Usage,
    generated_token_logprobs,
    retry_after_seconds,
    wants_max_completion_tokens,
    with_max_completion_tokens,
)


class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def test_requests_are_spaced_evenly_under_a_requests_per_minute_limit():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=120, clock=clock, sleep=clock.sleep)
    starts = []
    for _ in range(5):
        limiter.acquire(10)
        starts.append(clock.now)
    assert [b - a for a, b in zip(starts, starts[1:], strict=False)] == pytest.approx([0.5] * 4)


def test_a_large_request_takes_its_share_of_the_token_limit():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=600, tokens_per_minute=6000, clock=clock, sleep=clock.sleep)
    limiter.acquire(3000)  # half the minute's tokens
    limiter.acquire(10)
    assert clock.now - 100.0 == pytest.approx(30.0)


def test_no_limit_never_waits():
    clock = FakeClock()
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    for _ in range(100):
        limiter.acquire(10**6)
    assert clock.slept == []


def test_retry_after_in_seconds_or_as_a_date():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert retry_after_seconds({"retry-after": "99999"}) == 300.0  # capped
    assert retry_after_seconds({}) is None and retry_after_seconds({"retry-after": "soon"}) is None


def test_usage_sums_what_the_api_billed():
    usage = Usage()
    usage.add({"usage": {"prompt_tokens": 10, "completion_tokens": 3}})
    usage.add({"usage": {"prompt_tokens": 5, "completion_tokens": 1}})
    usage.add({"choices": []})
    assert usage.stats() == {"prompt_tokens": 15, "completion_tokens": 4}
    assert Usage().stats() == {}


def test_generated_token_logprobs_are_read_from_a_chat_choice():
    choice = {
        "logprobs": {
            "content": [{"token": "A", "logprob": -0.1, "top_logprobs": [{"token": "A", "logprob": -0.1}]}]
        }
    }
    (token,) = generated_token_logprobs(choice)
    assert token.text == "A" and token.top == {"A": -0.1}
    assert generated_token_logprobs({"message": {"content": "A"}}) is None


def test_max_tokens_is_renamed_when_the_api_asks_for_max_completion_tokens():
    refusal = (
        "http://x/v1/chat/completions answered 400: Unsupported parameter: 'max_tokens' is not supported "
        "with this model. Use 'max_completion_tokens' instead."
    )
    assert wants_max_completion_tokens(refusal)
    assert not wants_max_completion_tokens("answered 400: unknown field continue_final_message")
    assert with_max_completion_tokens({"max_tokens": 5, "n": 1}) == {"max_completion_tokens": 5, "n": 1}
