import math

import pytest
import torch

from caitool.backends import SamplingParams
from caitool.backends.local import TransformersBackend
from caitool.errors import CaitoolError
from caitool.records import Message
from caitool.tokens import render_chat


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


def test_greedy_generation_reports_each_tokens_top_logprobs(backend):
    """The verdict modes read an answer letter from these, as from a server's top_logprobs."""
    params = SamplingParams(temperature=0.0, max_new_tokens=6, top_logprobs=5)
    completion = backend.generate([CONVERSATIONS[1]], params, seed=0)[0][0]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    plain = backend.generate([CONVERSATIONS[1]], greedy, seed=0)[0][0]
    assert completion.text == plain.text and plain.token_logprobs is None
    tokens = completion.token_logprobs
    assert tokens and len(tokens) <= 6
    for token in tokens:
        assert len(token.top) <= 5 and token.logprob == pytest.approx(max(token.top.values()), abs=1e-5)
        assert sum(math.exp(v) for v in token.top.values()) <= 1.0 + 1e-5
    assert "".join(t.text for t in tokens).strip() == completion.text


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


def test_a_continuation_that_is_not_one_next_token_is_refused(backend):
    prefix = conv("Say something.")
    with pytest.raises(CaitoolError, match="'safety first' written after .* is not one token of its own"):
        backend.score_continuations([prefix], ["safety first", "A"])
    scores = backend.score_continuations([conv("Which?", "The answer is (")], ["A", "B"])[0]
    assert all(s < 0 and math.isfinite(s) for s in scores)


def _alone(backend, conversation):
    """Letter log-probs from one full forward pass over the whole text, no cache."""
    ids = backend.tokenizer(
        render_chat(backend.tokenizer, conversation), add_special_tokens=False, return_tensors="pt"
    )["input_ids"]
    letters = [backend.tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in "AB"]
    with torch.no_grad():
        return torch.log_softmax(backend.model(input_ids=ids).logits[0, -1].float(), -1)[letters].tolist()


def test_shared_prefix_cache_is_computed_once_across_calls(tiny_model_dir, monkeypatch):
    backend = TransformersBackend.load(str(tiny_model_dir), batch_size=2, device="cpu")
    shots = conv("An earlier question with plenty of words in it " * 8, "The answer is (A)")
    computed = []
    original = backend._prefix_cache
    monkeypatch.setattr(
        backend, "_prefix_cache", lambda prefix: computed.append(len(prefix)) or original(prefix)
    )

    def ask(question):
        return [*shots, *conv(question, "The answer is (")]

    calls = [
        [ask("first?"), ask("second question?")],
        [ask("third, longer question?"), ask("4th")],
        [ask("5")],
    ]
    for questions in calls:
        scores = backend.score_continuations(questions, ["A", "B"])
        for question, got in zip(questions, scores, strict=True):
            assert got == pytest.approx(_alone(backend, question), abs=1e-4)
    assert len(computed) == 1 and computed[0] >= 32

    other = [conv("A different opening that shares nothing " * 8, "The answer is (")] * 2
    assert backend.score_continuations(other, ["A", "B"])[0] == pytest.approx(
        _alone(backend, other[0]), abs=1e-4
    )
    assert len(computed) == 2
