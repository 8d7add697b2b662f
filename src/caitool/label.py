"""``caitool label-preferences``: soft preference labels from a feedback model (RLAIF).

Each comparison is a multiple-choice question: the conversation, one comparison principle,
options (A) and (B) holding the two responses, and an assistant turn prefilled with
"The answer is (" so that the very next token is the option letter. The feedback model's
log-probabilities of "A" and "B" are normalised into P(A is better): one forward pass per
batch, no generation. The constitution's comparison few-shot examples come first as
earlier user/assistant turns.

With ``swap`` (default) every pair is asked a second time with the options in the other
order and the two probabilities are averaged, which cancels the model's position bias.
In ``cot`` mode the model first writes step-by-step reasoning and the letters are read
after it; those labels are clamped (default [0.4, 0.6]) because chain-of-thought labels
are over-confident.

In ``score`` mode there are no options and so no positions: each response is shown alone,
as the assistant's turn of the conversation, with the principle and the question "is this
response a good one under it? Answer Yes or No", and the log-probabilities of " Yes" and
" No" after a prefilled "The answer is:" give its log-odds of being good. The label is
sigmoid(log-odds of the first - log-odds of the second): one forward pass per response,
batched and prefix-cached like the letters, and a model's leaning towards "Yes" (or towards
whatever it is shown) cancels in the difference. The constitution's comparison few-shot
examples become yes/no turns: the better option answered "Yes", the other "No".

Other phases (eval's pairwise win rates) use :class:`Labeller` directly:
``Labeller(backend, constitution).judge([Comparison(prompt, x, y, principle)])[0].p``
is the probability that response ``x`` beats ``y`` under ``principle``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from caitool.backends import GenerationBackend, SamplingParams, derive_seed
from caitool.backends.hosted import estimate_tokens
from caitool.choices import LabelMode, check_choice
from caitool.constitution import ComparisonExample, ComparisonPrinciple, Constitution, draw, load_constitution
from caitool.errors import CaitoolError
from caitool.judge_cache import AnswerCache, JudgeCalls
from caitool.pipeline import BackendPhase, ChunkResult, PhaseResult, Runtime
from caitool.progress import print_summary
from caitool.records import Conversation, Message, PreferenceRecord, parse_prompt_without_response
from caitool.verdicts import (
    LETTER_OPTIONS,
    YES_NO_OPTIONS,
    Reading,
    log_odds_of,
    read_by_logprobs,
    vote_share,
)

Mode = LabelMode
LETTERS = ("A", "B")
ANSWER_PREFILL = "The answer is ("
VERDICT_WORDS = (" Yes", " No")
SCORE_PREFILL = "The answer is:"
COT_PREFILL = "Let's think step by step:"
COT_ANSWER = "Therefore, the better response is ("
DEFAULT_CLAMP = (0.4, 0.6)
# The verdict modes: what each asks (as the prefill modes do), answered in the judge's own turn.
OWN_TURN_KINDS = {"verdict": "logprob", "verdict-cot": "cot", "verdict-score": "score"}
COT_OWN_TURN = (
    "\n\nThink it through step by step, then give your verdict on a last line of its own, "
    "written as Answer: (A) or Answer: (B)."
)
VERDICT_MAX_NEW_TOKENS = 24  # room for "The answer is (A)" and a few words around it
TOP_LOGPROBS = 20  # alternatives asked per generated token (OpenAI's maximum)
# A run stops when more than this share of the judge's answers name no option (after a few answers).
MAX_UNPARSEABLE_SHARE = 0.2
MIN_ANSWERS_BEFORE_STOP = 10
# label-preferences warns when the letters carry less than this share of the probability, or
# when the two option orders disagree on more than half of the pairs.
LOW_LETTER_MASS = 0.5
SPEAKERS = {"user": "Human", "assistant": "Assistant", "system": "System"}


@dataclass(frozen=True)
class Comparison:
    """Two responses to the same prompt, to be compared under one principle."""

    prompt: Conversation
    first: str
    second: str
    principle: ComparisonPrinciple


@dataclass(frozen=True)
class Verdict:
    """The feedback model's judgement of one comparison.

    ``p_first``: P(first is better) with the first response shown as (A);
    ``p_swapped``: the same probability with it shown as (B) (``None`` without swap);
    ``p``: their mean, clamped in cot mode; the probability that ``first`` beats ``second``.
    In score mode there is no option order: ``p_first`` is ``p`` and ``p_swapped`` is None.
    ``votes``: with --samples, the readable answers the vote shares counted (a Wilson interval's n);
    ``unparseable``: an answer named no option, so there is no label (``p`` is a placeholder).
    ``letter_mass``: the probability the model put on the two answer tokens, P(A) + P(B)
    (score mode: P(Yes) + P(No)), averaged over the questions asked; a judge that puts little
    mass there is reading its label from the tail of its distribution.
    """

    p: float
    p_first: float
    p_swapped: float | None
    reasoning: list[str] = field(default_factory=list)
    letter_mass: float | None = None
    votes: int | None = None  # readable sampled answers behind p (verdict modes with --samples)
    from_cache: bool = False
    unparseable: bool = False  # an answer named no option: no label (p is a placeholder)
    not_scored: str = ""  # why the answer tokens could not be scored (unparseable is then True)

    @property
    def orders_disagree(self) -> bool:
        return self.p_swapped is not None and (self.p_first > 0.5) != (self.p_swapped > 0.5)


def letter_probability(logprob_a: float, logprob_b: float) -> float:
    """P(A) normalised over the two letters: a softmax over their two scores."""
    top = max(logprob_a, logprob_b)
    weight_a = math.exp(logprob_a - top)
    weight_b = math.exp(logprob_b - top)
    return weight_a / (weight_a + weight_b)


def answer_mass(logprob_a: float, logprob_b: float) -> float:
    """The probability the model put on either of the two answer tokens."""
    return math.exp(logprob_a) + math.exp(logprob_b)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def render_transcript(conversation: Conversation) -> str:
    """The conversation as plain text inside the question (the feedback model judges it, not continues it)."""
    return "\n\n".join(f"{SPEAKERS[m.role]}: {m.content}" for m in conversation)


def question_text(conversation: Conversation, principle_text: str, option_a: str, option_b: str) -> str:
    return (
        "Consider the following conversation between a human and an assistant:\n\n"
        f"{render_transcript(conversation)}\n\n"
        f"{principle_text}\n\n"
        f"Options:\n(A) {option_a}\n(B) {option_b}\n\n"
        "Answer with the letter of the better option."
    )


def score_question_text(conversation: Conversation, principle_text: str, response: str) -> str:
    """One response shown alone, as the assistant's turn, to be judged good or not under a principle."""
    shown = [*conversation, Message(role="assistant", content=response)]
    return (
        "Consider the following conversation between a human and an assistant:\n\n"
        f"{render_transcript(shown)}\n\n"
        f"Responses are being compared under this principle: {principle_text}\n\n"
        "Under this principle, is the assistant's last response a good one? Answer Yes or No."
    )


def score_few_shot_turns(constitution: Constitution) -> list[Message]:
    """Each worked comparison as two yes/no turns: its better option "Yes", the other "No"."""
    turns: list[Message] = []
    for example in constitution.few_shot.comparison:
        principle_text = constitution.comparison(example.principle).text
        for letter, option in zip(LETTERS, example.options, strict=True):
            word = VERDICT_WORDS[0] if letter == example.answer else VERDICT_WORDS[1]
            question = score_question_text(example.conversation, principle_text, option)
            turns.append(Message(role="user", content=question))
            turns.append(Message(role="assistant", content=f"{SCORE_PREFILL}{word}"))
    return turns


def few_shot_turns(constitution: Constitution) -> list[Message]:
    """The constitution's worked comparison examples as prior turns, each under its own principle."""
    turns: list[Message] = []
    for example in constitution.few_shot.comparison:
        turns.extend(_example_turns(example, constitution.comparison(example.principle).text))
    return turns


def _example_turns(example: ComparisonExample, principle_text: str) -> list[Message]:
    question = question_text(example.conversation, principle_text, example.options[0], example.options[1])
    return [
        Message(role="user", content=question),
        Message(role="assistant", content=f"{ANSWER_PREFILL}{example.answer})"),
    ]


@dataclass(frozen=True)
class CostEstimate:
    """What judging a set of comparisons will send: requests and tokens (about four characters a token)."""

    requests: int
    prompt_tokens: int
    completion_tokens: int

    def __add__(self, other: CostEstimate) -> CostEstimate:
        return CostEstimate(
            self.requests + other.requests,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    def line(self, what: str) -> str:
        return (
            f"dry run: {what}: {self.requests} requests, about {self.prompt_tokens} prompt tokens and "
            f"at most {self.completion_tokens} completion tokens; nothing was sent"
        )


class Labeller:
    """Reads soft preference labels from a feedback model: option-letter probabilities after a
    prefill (logprob, cot, score), or the verdict it writes in its own turn (the verdict modes)."""

    def __init__(
        self,
        backend: GenerationBackend | None,
        constitution: Constitution,
        *,
        mode: Mode = "logprob",
        swap: bool = True,
        clamp: tuple[float, float] | None = DEFAULT_CLAMP,
        cot_max_new_tokens: int = 128,
        cot_temperature: float = 0.0,
        samples: int = 0,
        cache: AnswerCache | None = None,
        max_unparseable: float = MAX_UNPARSEABLE_SHARE,
    ):
        check_choice("--mode", mode, LabelMode)
        if clamp is not None and not 0.0 <= clamp[0] <= 0.5 <= clamp[1] <= 1.0:
            raise CaitoolError(
                f"--clamp must satisfy 0 <= low <= 0.5 <= high <= 1, got {clamp[0]} {clamp[1]}"
            )
        if samples < 0:
            raise CaitoolError(f"--samples must be 0 or more, got {samples}")
        if samples and not mode.startswith("verdict"):
            raise CaitoolError(f"--samples applies to the verdict modes only, not --mode {mode}")
        self.backend = backend
        self.calls = JudgeCalls(backend, cache) if backend is not None else None
        self.constitution = constitution
        self.mode = mode
        self.own_turn = mode.startswith("verdict")
        self.kind = OWN_TURN_KINDS.get(mode, mode)  # logprob, cot or score: what is asked
        self.swap = swap
        self.clamp = clamp
        self.samples = samples
        self.max_unparseable = max_unparseable
        self.cot_params = SamplingParams(temperature=cot_temperature, max_new_tokens=cot_max_new_tokens)
        self.answer_tokens = cot_max_new_tokens if self.kind == "cot" else VERDICT_MAX_NEW_TOKENS
        self.shots = (
            score_few_shot_turns(constitution) if self.kind == "score" else few_shot_turns(constitution)
        )
        self.answers = 0  # answers read in this run (sampled ones each count) ...
        self.unparseable = 0  # ... and those that named no option
        self.unlabelled = 0  # comparisons left without a label because an answer was unparseable
        self._unreadable_example = ""
        # label-preferences leaves a pair whose answer tokens a server could not score unlabelled
        # and goes on; eval and judge-check, whose figures would silently lose it, stop.
        self.skip_not_scored = False
        self._score_shots: list[Message] | None = None

    def judge(self, comparisons: Sequence[Comparison], seed: int = 0) -> list[Verdict]:
        """One verdict per comparison; all questions of the call go to the model as one batch."""
        if self.kind == "score":
            verdicts = self._judge_by_scores(comparisons, seed)
        else:
            verdicts = self._judge_by_letters(comparisons, seed)
        self.unlabelled += sum(v.unparseable for v in verdicts)
        self._stop_if_mostly_unparseable()
        not_scored = [v.not_scored for v in verdicts if v.not_scored]
        if not_scored and not self.skip_not_scored:
            raise CaitoolError(not_scored[0])
        return verdicts

    def _judge_by_letters(self, comparisons: Sequence[Comparison], seed: int) -> list[Verdict]:
        questions = [self.question(c, swapped=False) for c in comparisons]
        if self.swap:
            questions += [self.question(c, swapped=True) for c in comparisons]
        readings = self._ask(questions, seed)
        count = len(comparisons)
        verdicts = []
        for index in range(count):
            asked = readings[index::count]
            texts = [r.text for r in asked] if self.kind == "cot" or self.own_turn else []
            if any(r.p is None for r in asked):
                verdicts.append(_unparseable_verdict(asked, texts))
                continue
            p_first = asked[0].p
            p_swapped = 1.0 - asked[1].p if self.swap else None  # type: ignore[operator]
            shown = [p_first] if p_swapped is None else [p_first, p_swapped]
            verdicts.append(
                Verdict(
                    p=self._final(sum(shown) / len(shown)),  # type: ignore[arg-type]
                    p_first=p_first,  # type: ignore[arg-type]
                    p_swapped=p_swapped,
                    reasoning=texts,
                    letter_mass=sum(r.mass for r in asked) / len(asked),  # type: ignore[misc]
                    votes=_total_votes(asked),
                    from_cache=all(r.cached for r in asked),
                )
            )
        return verdicts

    def score_responses(
        self,
        prompts: Sequence[Conversation],
        responses: Sequence[str],
        principles: Sequence[ComparisonPrinciple],
    ) -> list[tuple[float, float]]:
        """Each response alone, under its principle: its log-odds of being good, log P(Yes) - log P(No),
        and the mass P(Yes) + P(No); one batch of questions (score mode's question, whatever the mode)."""
        questions = [
            self.score_question_about(p, principle, r)
            for p, r, principle in zip(prompts, responses, principles, strict=True)
        ]
        prefilled = [[*q, Message(role="assistant", content=SCORE_PREFILL)] for q in questions]
        scores, _ = self._calls().score_continuations(prefilled, list(VERDICT_WORDS))
        failed = [row for row in scores if isinstance(row, str)]
        if failed:
            raise CaitoolError(failed[0])
        return [(yes - no, answer_mass(yes, no)) for yes, no in scores]  # type: ignore[misc]

    @property
    def score_shots(self) -> list[Message]:
        if self.kind == "score":
            return self.shots
        if self._score_shots is None:
            self._score_shots = score_few_shot_turns(self.constitution)
        return self._score_shots

    def _judge_by_scores(self, comparisons: Sequence[Comparison], seed: int) -> list[Verdict]:
        """Both responses of every comparison scored alone; the label is sigmoid of their log-odds gap."""
        questions = [self.score_question(c, c.first) for c in comparisons]
        questions += [self.score_question(c, c.second) for c in comparisons]
        if self.own_turn:
            readings = self._read_own_turn(questions, YES_NO_OPTIONS, seed)
        else:
            prefilled = [[*q, Message(role="assistant", content=SCORE_PREFILL)] for q in questions]
            scores, cached = self._calls().score_continuations(prefilled, list(VERDICT_WORDS))
            readings = [_prefill_reading(row, "", hit) for row, hit in zip(scores, cached, strict=True)]
        count = len(comparisons)
        verdicts = []
        for index in range(count):
            asked = [readings[index], readings[count + index]]
            if any(r.p is None for r in asked):
                verdicts.append(_unparseable_verdict(asked, [r.text for r in asked]))
                continue
            p = sigmoid(log_odds_of(asked[0]) - log_odds_of(asked[1]))
            verdicts.append(
                Verdict(
                    p=p,
                    p_first=p,
                    p_swapped=None,
                    reasoning=[r.text for r in asked] if self.own_turn else [],
                    letter_mass=sum(r.mass for r in asked) / 2,  # type: ignore[misc]
                    votes=_total_votes(asked),
                    from_cache=all(r.cached for r in asked),
                )
            )
        return verdicts

    def _final(self, p: float) -> float:
        if self.kind == "cot" and self.clamp is not None:
            return min(max(p, self.clamp[0]), self.clamp[1])
        return p

    def question(self, comparison: Comparison, *, swapped: bool) -> Conversation:
        """The few-shot turns, then the multiple-choice question (options swapped: second shown as A)."""
        a, b = (comparison.second, comparison.first) if swapped else (comparison.first, comparison.second)
        text = question_text(comparison.prompt, comparison.principle.text, a, b)
        if self.mode == "verdict-cot":
            text += COT_OWN_TURN
        return [*self.shots, Message(role="user", content=text)]

    def score_question(self, comparison: Comparison, response: str) -> Conversation:
        """The yes/no few-shot turns, then the question about one response of the comparison."""
        return self.score_question_about(comparison.prompt, comparison.principle, response)

    def score_question_about(
        self, prompt: Conversation, principle: ComparisonPrinciple, response: str
    ) -> Conversation:
        text = score_question_text(prompt, principle.text, response)
        return [*self.score_shots, Message(role="user", content=text)]

    def _calls(self) -> JudgeCalls:
        if self.calls is None:
            raise CaitoolError("this labeller was made without a model (a dry run) and cannot judge")
        return self.calls

    def _ask(self, questions: list[Conversation], seed: int) -> list[Reading]:
        """P(option A), the letter mass P(A) + P(B) and the reasoning or answer text of each question."""
        if self.own_turn:
            return self._read_own_turn(questions, LETTER_OPTIONS, seed)
        calls = self._calls()
        reasoning = [""] * len(questions)
        thought_cached = [True] * len(questions)
        if self.kind == "logprob":
            prefilled = [[*q, Message(role="assistant", content=ANSWER_PREFILL)] for q in questions]
        else:
            thinking = [[*q, Message(role="assistant", content=COT_PREFILL)] for q in questions]
            samples, thought_cached = calls.generate(thinking, self.cot_params, seed)
            reasoning = [s[0].text for s in samples]
            prefilled = [
                [*q, Message(role="assistant", content=f"{COT_PREFILL} {text}\n{COT_ANSWER}")]
                for q, text in zip(questions, reasoning, strict=True)
            ]
        scores, cached = calls.score_continuations(prefilled, list(LETTERS))
        return [
            _prefill_reading(row, text, hit and thought)
            for row, text, hit, thought in zip(scores, reasoning, cached, thought_cached, strict=True)
        ]

    def _read_own_turn(
        self, questions: list[Conversation], options: Sequence[str], seed: int
    ) -> list[Reading]:
        """The judge answers in its own turn: greedy with token log-probs, or ``samples`` votes at
        temperature 1."""
        if self.samples:
            params = SamplingParams(
                temperature=1.0, top_p=1.0, max_new_tokens=self.answer_tokens, n=self.samples
            )
        else:
            params = SamplingParams(
                temperature=0.0, max_new_tokens=self.answer_tokens, top_logprobs=TOP_LOGPROBS
            )
        answers, cached = self._calls().generate(questions, params, seed)
        readings = []
        for completions, hit in zip(answers, cached, strict=True):
            if self.samples:
                reading = vote_share(completions, options)
            else:
                if completions[0].token_logprobs is None:
                    raise CaitoolError(
                        f"the judge {self._model_id()} returned no log-probabilities of the tokens it "
                        f"generated, so --mode {self.mode} cannot read P(answer) from them: pass --samples K "
                        "(e.g. 5) to label by the vote share of K answers sampled at temperature 1"
                    )
                reading = read_by_logprobs(completions[0], options)
            readings.append(replace(reading, cached=hit))
            self.answers += len(completions) if self.samples else 1
            self.unparseable += reading.unreadable
            if reading.unreadable and not self._unreadable_example:
                self._unreadable_example = reading.text
        return readings

    def _model_id(self) -> str:
        return self.backend.model_id if self.backend is not None else "?"

    def _stop_if_mostly_unparseable(self) -> None:
        if self.answers < MIN_ANSWERS_BEFORE_STOP or self.unparseable <= self.max_unparseable * self.answers:
            return
        example = " ".join(self._unreadable_example.split())[:80]
        raise CaitoolError(
            f"{self.unparseable} of {self.answers} answers of the judge {self._model_id()} named no option "
            f"(more than {self.max_unparseable:.0%}; e.g. {example!r}), so its labels cannot be read: "
            "check it with caitool judge-check, or use a stronger judge"
        )

    def unparseable_counts(self) -> dict[str, int]:
        """This run's counts of answers read and unparseable, for summaries and manifests (verdict modes)."""
        if not self.own_turn:
            return {}
        return {
            "answers": self.answers,
            "unparseable_answers": self.unparseable,
            "unlabelled": self.unlabelled,
        }

    def cost_estimate(self, comparisons: Sequence[Comparison]) -> CostEstimate:
        """The requests and tokens judging ``comparisons`` would take; no model is needed."""
        if self.kind == "score":
            questions = [self.score_question(c, r) for c in comparisons for r in (c.first, c.second)]
        else:
            orders = (False, True) if self.swap else (False,)
            questions = [self.question(c, swapped=s) for c in comparisons for s in orders]
        prompt_tokens = sum(estimate_tokens(render_transcript(q)) for q in questions)
        if self.own_turn:
            per_question = self.answer_tokens * max(1, self.samples)
            return CostEstimate(len(questions), prompt_tokens, per_question * len(questions))
        if self.kind == "cot":  # the reasoning, then the letter after it (its prompt includes the reasoning)
            count = len(questions)
            prompt_tokens = 2 * prompt_tokens + count * self.answer_tokens
            return CostEstimate(2 * count, prompt_tokens, count * (self.answer_tokens + 1))
        return CostEstimate(len(questions), prompt_tokens, len(questions))


def _total_votes(readings: Sequence[Reading]) -> int | None:
    votes = [r.votes for r in readings]
    return None if any(v is None for v in votes) else sum(votes)  # type: ignore[misc]


def _prefill_reading(row: list[float] | str, text: str, cached: bool) -> Reading:
    """The two answer tokens' log-probs after a prefill as a reading; a row the backend could not
    score (a served model's top log-probs left a letter out) is a reading without a label."""
    if isinstance(row, str):
        return Reading(p=None, mass=None, text=text, not_scored=row)
    first, second = row
    return Reading(
        p=letter_probability(first, second), mass=answer_mass(first, second), text=text, cached=cached
    )


def _unparseable_verdict(readings: Sequence[Reading], texts: list[str]) -> Verdict:
    return Verdict(
        p=0.5,
        p_first=0.5,
        p_swapped=None,
        reasoning=texts,
        unparseable=True,
        not_scored=next((r.not_scored for r in readings if r.not_scored), ""),
        from_cache=all(r.cached for r in readings),
    )


# ---------------------------------------------------------------------------
# The label-preferences phase


@dataclass(frozen=True)
class ResponsesInput:
    """An input record of label-preferences: a prompt and the responses sampled for it."""

    id: str
    prompt: Conversation
    responses: list[str]
    extra: dict[str, Any]


GENERATION_FIELDS = ("completion", "finished", "model", "seed")


def parse_responses_input(raw: dict[str, Any]) -> ResponsesInput:
    """A ``generate -n 2`` record (or any record with ``prompt`` and ``responses``)."""
    raw = dict(raw)
    responses = raw.pop("responses", None)
    if responses is None:
        raise CaitoolError('missing field "responses" (label-preferences reads the output of generate -n 2)')
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise CaitoolError('field "responses" must be a list of strings')
    if len(responses) < 2:
        raise CaitoolError(f'field "responses" has {len(responses)} response(s); comparing needs at least 2')
    if raw.get("kind") == "generation":
        for name in GENERATION_FIELDS:
            raw.pop(name, None)
    prompt_record = parse_prompt_without_response(raw, '"responses"')
    return ResponsesInput(
        id=prompt_record.id,
        prompt=prompt_record.prompt,
        responses=responses,
        extra=prompt_record.user_fields(),
    )


def choose_pair(record: ResponsesInput, seed: int) -> tuple[int, int]:
    """The two responses to compare: the only pair, or one pair drawn (seeded) when there are more."""
    if len(record.responses) == 2:
        return (0, 1)
    rng = random.Random(derive_seed(seed, "pair", record.id))
    first, second = sorted(rng.sample(range(len(record.responses)), 2))
    return (first, second)


def choose_principle(
    principles: Sequence[ComparisonPrinciple], record_id: str, pair: tuple[int, int], seed: int
) -> ComparisonPrinciple:
    return draw(principles, random.Random(derive_seed(seed, "principle", record_id, pair)))


def preference_record(
    record: ResponsesInput,
    pair: tuple[int, int],
    principle: ComparisonPrinciple,
    verdict: Verdict,
    *,
    mode: Mode,
    feedback_model: str,
    constitution: Constitution,
    samples: int = 0,
    cached: bool = False,
) -> PreferenceRecord:
    first, second = (record.responses[i] for i in pair)
    chosen, rejected = (first, second) if verdict.p >= 0.5 else (second, first)
    return PreferenceRecord(
        id=record.id,
        prompt=record.prompt,
        chosen=[Message(role="assistant", content=chosen)],
        rejected=[Message(role="assistant", content=rejected)],
        p_chosen=max(verdict.p, 1.0 - verdict.p),
        principle_id=principle.id,
        pair=pair,
        p_first=verdict.p_first,
        p_swapped=verdict.p_swapped,
        mode=mode,
        reasoning=verdict.reasoning,
        samples=samples or None,
        from_cache=verdict.from_cache if cached else None,
        feedback_model=feedback_model,
        constitution=constitution.ref,
        **record.extra,
    )


def run_label_preferences(
    input_path: str | Path,
    output: str | Path,
    *,
    model: str = "default",
    constitution: str = "harmless",
    principles: Sequence[str] | None = None,
    mode: Mode = "logprob",
    swap: bool = True,
    clamp: tuple[float, float] | None = DEFAULT_CLAMP,
    cot_max_new_tokens: int = 128,
    samples: int = 0,
    cache: str | Path | None = None,
    max_unparseable: float = MAX_UNPARSEABLE_SHARE,
    runtime: Runtime | None = None,
    backend: GenerationBackend | None = None,
) -> PhaseResult:
    loaded_constitution = load_constitution(constitution)
    candidates = loaded_constitution.restrict_comparisons(principles)
    masses: list[float] = []  # this session's letter masses, for the fitness warning
    both_orders = swap and OWN_TURN_KINDS.get(mode, mode) != "score"  # score: each response alone, no order
    answer_cache = AnswerCache(cache) if cache is not None else None
    Labeller(None, loaded_constitution, mode=mode, swap=swap, clamp=clamp, samples=samples)  # checks options

    def make_process(backend: GenerationBackend, seed: int):
        labeller = Labeller(
            backend,
            loaded_constitution,
            mode=mode,
            swap=swap,
            clamp=clamp,
            cot_max_new_tokens=cot_max_new_tokens,
            samples=samples,
            cache=answer_cache,
            max_unparseable=max_unparseable,
        )
        labeller.skip_not_scored = True

        def process(records: list[ResponsesInput], chunk_index: int) -> ChunkResult:
            pairs, chosen_principles, comparisons = _comparisons_of(records, candidates, seed)
            before = labeller.unparseable_counts()
            verdicts = labeller.judge(comparisons, seed=derive_seed(seed, chunk_index))
            for record, verdict in zip(records, verdicts, strict=True):
                if verdict.not_scored:
                    print_summary(f"warning: record {record.id!r} left unlabelled: {verdict.not_scored}")
            masses.extend(v.letter_mass for v in verdicts if v.letter_mass is not None)
            out = [
                preference_record(
                    r,
                    p,
                    principle,
                    v,
                    mode=mode,
                    feedback_model=backend.model_id,
                    constitution=loaded_constitution,
                    samples=samples,
                    cached=answer_cache is not None,
                )
                for r, p, principle, v in zip(records, pairs, chosen_principles, verdicts, strict=True)
                if not v.unparseable  # never guessed: the pair stays unlabelled, and is counted
            ]
            counts = {"disagree": sum(v.orders_disagree for v in verdicts)}
            counts.update(_grown(before, labeller.unparseable_counts()))
            not_scored = sum(bool(v.not_scored) for v in verdicts)
            if not_scored:
                counts["unlabelled"] = counts.get("unlabelled", 0) + not_scored
            if answer_cache is not None:
                counts["labels_from_cache"] = sum(v.from_cache and not v.unparseable for v in verdicts)
            return ChunkResult(out, counts=counts)

        return process

    phase = BackendPhase(
        phase="label-preferences",
        parse=parse_responses_input,
        params={
            "mode": mode,
            "swap": swap,
            "clamp": list(clamp) if clamp else None,
            "principles": list(principles or []),
            "cot_max_new_tokens": cot_max_new_tokens,
            **({"samples": samples} if samples else {}),
        },
        make_process=make_process,
        summary_counts=lambda result: _summary_counts(result, both_orders),
        constitution=loaded_constitution.ref,
        role="feedback",
        chunk_factor=1,
    )
    result = phase.run(input_path, output, model=model, runtime=runtime, backend=backend)
    warning = fitness_warning(
        result.counts.get("disagree", 0) if both_orders else None,
        result.tracker.records,
        masses,
        mass_name="P(Yes)+P(No)" if mode == "score" else "P(A)+P(B)",
    )
    if warning:
        print_summary(warning)
    return result


def _comparisons_of(records: Sequence[ResponsesInput], candidates, seed: int):
    """Each record's pair, principle and comparison: drawn from the seed, the same in a dry run."""
    pairs = [choose_pair(r, seed) for r in records]
    chosen_principles = [
        choose_principle(candidates, r.id, p, seed) for r, p in zip(records, pairs, strict=True)
    ]
    comparisons = [
        Comparison(r.prompt, r.responses[p[0]], r.responses[p[1]], principle)
        for r, p, principle in zip(records, pairs, chosen_principles, strict=True)
    ]
    return pairs, chosen_principles, comparisons


def _grown(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after}


def dry_run_label_preferences(
    input_path: str | Path,
    *,
    constitution: str = "harmless",
    principles: Sequence[str] | None = None,
    mode: Mode = "logprob",
    swap: bool = True,
    cot_max_new_tokens: int = 128,
    samples: int = 0,
    seed: int = 0,
) -> CostEstimate:
    """What label-preferences would send for this file, printed as one line; no model is loaded."""
    from caitool.jsonl_io import read_records
    from caitool.pipeline import validate_input

    charter = load_constitution(constitution)
    candidates = charter.restrict_comparisons(principles)
    source = validate_input(input_path, parse_responses_input)
    labeller = Labeller(
        None, charter, mode=mode, swap=swap, cot_max_new_tokens=cot_max_new_tokens, samples=samples
    )
    records = list(read_records(source.path, parse_responses_input))
    estimate = labeller.cost_estimate(_comparisons_of(records, candidates, seed)[2])
    print_summary(estimate.line(f"label-preferences --mode {mode} on {len(records)} records"))
    return estimate


def fitness_warning(
    disagreed: int | None, labelled: int, masses: Sequence[float], *, mass_name: str = "P(A)+P(B)"
) -> str | None:
    """One line when the labels look unreliable: the orders mostly disagree, or the letters get little mass.

    ``disagreed`` is None when only one order was asked (no swap, or score mode).
    """
    if not labelled:
        return None
    problems = []
    if disagreed is not None and disagreed > labelled / 2:
        problems.append(f"the two option orders disagreed on {disagreed} of {labelled} pairs")
    mean_mass = sum(masses) / len(masses) if masses else None
    if mean_mass is not None and mean_mass < LOW_LETTER_MASS:
        problems.append(f"the mean answer mass {mass_name} was {mean_mass:.2f} (below {LOW_LETTER_MASS})")
    if not problems:
        return None
    return (
        f"warning: {' and '.join(problems)}, so these labels may be noise; check the feedback model "
        "with caitool judge-check (e.g. on examples/judge_check.jsonl) before training on them"
    )


def _summary_counts(result: PhaseResult, both_orders: bool) -> dict[str, object]:
    shown: dict[str, object] = {}
    if both_orders:
        labelled = max(result.tracker.records, 1)
        disagree = result.counts.get("disagree", 0)
        shown["the_two_option_orders_disagreed"] = (
            f"{disagree}/{result.tracker.records} ({100.0 * disagree / labelled:.0f}%)"
        )
    if "answers" in result.counts:
        shown["unparseable_answers"] = f"{result.counts['unparseable_answers']}/{result.counts['answers']}"
    if "answers" in result.counts or result.counts.get("unlabelled"):
        shown["unlabelled_pairs"] = result.counts.get("unlabelled", 0)
    if "labels_from_cache" in result.counts:
        shown["labels_from_cache"] = result.counts["labels_from_cache"]
    return shown
