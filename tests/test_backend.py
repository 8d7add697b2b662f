import math

import pytest
import torch

from caitool.backend import SamplingParams, TransformersBackend, render_chat
from caitool.records import Message


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return TransformersBackend.load(str(tiny_model_dir), batch_size=2, device="cpu")


def conv(*turns):
    roles = ["user", "assistant"]
    return [Message(role=roles[i % 2], content=t) for i, t in enumerate(turns)]


CONVERSATIONS = [conv("hi"), conv("How do I bake bread at home, step by step?"), conv("a", "b", "c")]


def test_generation_is_seeded_and_batch_independent_of_call_count(backend):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2)
    first = backend.generate(CONVERSATIONS, params, seed=5)
    again = backend.generate(CONVERSATIONS, params, seed=5)
    other = backend.generate(CONVERSATIONS, params, seed=6)
    assert first == again
    assert first != other
    assert [len(samples) for samples in first] == [2, 2, 2]


def test_greedy_batched_matches_unbatched(backend, tiny_model_dir):
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    batched = backend.generate(CONVERSATIONS, params, seed=0)
    single = TransformersBackend(backend.model, backend.tokenizer, model_id="t", batch_size=1)
    assert [s[0].text for s in batched] == [s[0].text for s in single.generate(CONVERSATIONS, params, seed=0)]


def test_generation_stops_at_end_of_turn(backend):
    eot = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    completion = backend._completion([40, 41, eot, 42])
    assert completion.finished and completion.num_tokens == 3
    assert not backend._completion([40, 41]).finished


def test_a_final_assistant_turn_is_continued_not_closed(backend):
    text = render_chat(backend.tokenizer, conv("question", "The answer is ("))
    assert text.endswith("The answer is (")
    assert render_chat(backend.tokenizer, conv("question")).endswith("<|im_start|>assistant\n")


def test_letter_scores_are_next_token_log_probabilities(backend):
    prefill = conv("Which is better?", "The answer is (")
    scores = backend.score_continuations([prefill], ["A", "B"])[0]
    ids = backend.tokenizer(
        render_chat(backend.tokenizer, prefill), add_special_tokens=False, return_tensors="pt"
    )
    with torch.no_grad():
        logits = backend.model(**ids).logits[0, -1]
    logprobs = torch.log_softmax(logits.float(), -1)
    expected = [logprobs[backend.tokenizer.convert_tokens_to_ids(t)].item() for t in ("A", "B")]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_multi_token_continuations_sum_token_log_probabilities(backend):
    prefix = conv("Say something.")
    scores = backend.score_continuations([prefix, prefix], ["safety first", "A"])
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)
    assert all(s < 0 and math.isfinite(s) for s in scores[0])
