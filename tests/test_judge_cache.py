"""The judge-answer cache: keyed by model and exact request, only misses sent, hits reported."""

from caitool.backends import SamplingParams
from caitool.judge_cache import AnswerCache, JudgeCalls
from caitool.records import Message
from tests.fakes import ScriptedBackend


def question(text):
    return [Message(role="user", content=text)]


def test_scores_are_asked_once_and_the_misses_only(tmp_path):
    backend = ScriptedBackend(scores=lambda conv, conts: [-0.1 * len(conv[-1].content), -1.0])
    calls = JudgeCalls(backend, AnswerCache(tmp_path))
    first, hits = calls.score_continuations([question("one"), question("three")], ["A", "B"])
    assert hits == [False, False] and backend.calls == [("score", 2)]
    again, hits = calls.score_continuations([question("three"), question("fifteen")], ["A", "B"])
    assert hits == [True, False] and backend.calls[-1] == ("score", 1)  # only the new question is sent
    assert again[0] == first[1]


def test_greedy_answers_ignore_the_seed_and_sampled_ones_do_not(tmp_path):
    backend = ScriptedBackend(reply=lambda conv, i, seed: f"answer {seed}")
    calls = JudgeCalls(backend, AnswerCache(tmp_path))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=4, top_logprobs=5)
    calls.generate([question("q")], greedy, seed=1)
    (cached,), hits = calls.generate([question("q")], greedy, seed=2)
    assert hits == [True] and cached[0].text == "answer 1"
    sampled = SamplingParams(temperature=1.0, max_new_tokens=4, n=3)
    calls.generate([question("q")], sampled, seed=1)
    _, hits = calls.generate([question("q")], sampled, seed=2)
    assert hits == [False]  # another seed is another request


def test_another_model_does_not_read_this_ones_answers(tmp_path):
    cache = AnswerCache(tmp_path)
    JudgeCalls(ScriptedBackend(), cache).score_continuations([question("q")], ["A", "B"])
    other = ScriptedBackend()
    other.model_id = "other@111111111111"
    _, hits = JudgeCalls(other, cache).score_continuations([question("q")], ["A", "B"])
    assert hits == [False]
