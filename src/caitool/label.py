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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caitool.backends import ContinuationsNotScored, GenerationBackend, SamplingParams, derive_seed
from caitool.choices import LabelMode, check_choice
from caitool.constitution import ComparisonExample, ComparisonPrinciple, Constitution, draw, load_constitution
from caitool.errors import CaitoolError
from caitool.pipeline import BackendPhase, ChunkResult, PhaseResult, Runtime
from caitool.progress import print_summary
from caitool.records import Conversation, Message, PreferenceRecord, parse_prompt_without_response

Mode = LabelMode
LETTERS = ("A", "B")
ANSWER_PREFILL = "The answer is ("
VERDICT_WORDS = (" Yes", " No")
SCORE_PREFILL = "The answer is:"
COT_PREFILL = "Let's think step by step:"
COT_ANSWER = "Therefore, the better response is ("
DEFAULT_CLAMP = (0.4, 0.6)
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
    ``letter_mass``: the probability the model put on the two answer tokens, P(A) + P(B)
    (score mode: P(Yes) + P(No)), averaged over the questions asked; a judge that puts little
    mass there is reading its label from the tail of its distribution.
    """

    p: float
    p_first: float
    p_swapped: float | None
    reasoning: list[str] = field(default_factory=list)
    letter_mass: float | None = None

    @property
    def orders_disagree(self) -> bool:
        return self.p_swapped is not None and (self.p_first > 0.5) != (self.p_swapped > 0.5)


@dataclass(frozen=True)
class Unjudged:
    """A comparison the feedback model could not answer: why (one line)."""

    reason: str


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


class Labeller:
    """Reads soft preference labels from a feedback model's option-letter probabilities."""

    def __init__(
        self,
        backend: GenerationBackend,
        constitution: Constitution,
        *,
        mode: Mode = "logprob",
        swap: bool = True,
        clamp: tuple[float, float] | None = DEFAULT_CLAMP,
        cot_max_new_tokens: int = 128,
        cot_temperature: float = 0.0,
    ):
        check_choice("--mode", mode, LabelMode)
        if clamp is not None and not 0.0 <= clamp[0] <= 0.5 <= clamp[1] <= 1.0:
            raise CaitoolError(
                f"--clamp must satisfy 0 <= low <= 0.5 <= high <= 1, got {clamp[0]} {clamp[1]}"
            )
        self.backend = backend
        self.constitution = constitution
        self.mode = mode
        self.swap = swap
        self.clamp = clamp
        self.cot_params = SamplingParams(temperature=cot_temperature, max_new_tokens=cot_max_new_tokens)
        self.shots = score_few_shot_turns(constitution) if mode == "score" else few_shot_turns(constitution)

    def judge(self, comparisons: Sequence[Comparison], seed: int = 0) -> list[Verdict]:
        """One verdict per comparison; all questions of the call go to the model as one batch."""
        judged = self.judge_each(comparisons, seed)
        for verdict in judged:
            if isinstance(verdict, Unjudged):
                raise CaitoolError(verdict.reason)
        return [v for v in judged if isinstance(v, Verdict)]

    def judge_each(self, comparisons: Sequence[Comparison], seed: int = 0) -> list[Verdict | Unjudged]:
        """As :meth:`judge`, but a comparison whose answer tokens the model could not score (a
        served model's top log-probs left one out) is :class:`Unjudged` and the others are kept."""
        if self.mode == "score":
            return self._judge_by_scores(comparisons)
        questions = [self.question(c, swapped=False) for c in comparisons]
        if self.swap:
            questions += [self.question(c, swapped=True) for c in comparisons]
        scores, reasoning = self._ask(questions, seed)
        count = len(comparisons)
        verdicts: list[Verdict | Unjudged] = []
        for index in range(count):
            asked = scores[index::count]
            failed = [row for row in asked if isinstance(row, str)]
            if failed:
                verdicts.append(Unjudged(failed[0]))
                continue
            p_first = letter_probability(*asked[0])
            p_swapped = 1.0 - letter_probability(*asked[1]) if self.swap else None
            shown = [p_first] if p_swapped is None else [p_first, p_swapped]
            masses = [answer_mass(*row) for row in asked]
            texts = reasoning[index::count] if reasoning else []
            verdicts.append(
                Verdict(
                    p=self._final(sum(shown) / len(shown)),
                    p_first=p_first,
                    p_swapped=p_swapped,
                    reasoning=texts,
                    letter_mass=sum(masses) / len(masses),
                )
            )
        return verdicts

    def _judge_by_scores(self, comparisons: Sequence[Comparison]) -> list[Verdict | Unjudged]:
        """Both responses of every comparison scored alone; the label is sigmoid of their log-odds gap."""
        questions = [self.score_question(c, c.first) for c in comparisons]
        questions += [self.score_question(c, c.second) for c in comparisons]
        prefilled = [[*q, Message(role="assistant", content=SCORE_PREFILL)] for q in questions]
        scores = self._scores(prefilled, list(VERDICT_WORDS))
        count = len(comparisons)
        verdicts: list[Verdict | Unjudged] = []
        for index in range(count):
            first, second = scores[index], scores[count + index]
            if isinstance(first, str) or isinstance(second, str):
                verdicts.append(Unjudged(first if isinstance(first, str) else str(second)))
                continue
            p = sigmoid((first[0] - first[1]) - (second[0] - second[1]))
            verdicts.append(
                Verdict(
                    p=p,
                    p_first=p,
                    p_swapped=None,
                    letter_mass=(answer_mass(*first) + answer_mass(*second)) / 2,
                )
            )
        return verdicts

    def _scores(self, prefilled: list[Conversation], words: list[str]) -> list[list[float] | str]:
        """Each prompt's answer-token log-probs, or why they could not be read for it."""
        try:
            return list(self.backend.score_continuations(prefilled, words))
        except ContinuationsNotScored as partial:
            return [
                partial.reasons[index] if row is None else row for index, row in enumerate(partial.scores)
            ]

    def _final(self, p: float) -> float:
        if self.mode == "cot" and self.clamp is not None:
            return min(max(p, self.clamp[0]), self.clamp[1])
        return p

    def question(self, comparison: Comparison, *, swapped: bool) -> Conversation:
        """The few-shot turns, then the multiple-choice question (options swapped: second shown as A)."""
        a, b = (comparison.second, comparison.first) if swapped else (comparison.first, comparison.second)
        ask = Message(role="user", content=question_text(comparison.prompt, comparison.principle.text, a, b))
        return [*self.shots, ask]

    def score_question(self, comparison: Comparison, response: str) -> Conversation:
        """The yes/no few-shot turns, then the question about one response of the comparison."""
        text = score_question_text(comparison.prompt, comparison.principle.text, response)
        return [*self.shots, Message(role="user", content=text)]

    def _ask(self, questions: list[Conversation], seed: int) -> tuple[list[list[float] | str], list[str]]:
        """The two letters' log-probs for each question (or why they could not be read); the
        reasoning texts in cot mode."""
        reasoning: list[str] = []
        if self.mode == "logprob":
            prefilled = [[*q, Message(role="assistant", content=ANSWER_PREFILL)] for q in questions]
        else:
            thinking = [[*q, Message(role="assistant", content=COT_PREFILL)] for q in questions]
            samples = self.backend.generate(thinking, self.cot_params, seed)
            reasoning = [s[0].text for s in samples]
            prefilled = [
                [*q, Message(role="assistant", content=f"{COT_PREFILL} {text}\n{COT_ANSWER}")]
                for q, text in zip(questions, reasoning, strict=True)
            ]
        return self._scores(prefilled, list(LETTERS)), reasoning


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
    runtime: Runtime | None = None,
    backend: GenerationBackend | None = None,
) -> PhaseResult:
    loaded_constitution = load_constitution(constitution)
    candidates = loaded_constitution.restrict_comparisons(principles)
    masses: list[float] = []  # this session's letter masses, for the fitness warning
    both_orders = swap and mode != "score"  # score mode shows each response alone: no order to swap

    def make_process(backend: GenerationBackend, seed: int):
        labeller = Labeller(
            backend,
            loaded_constitution,
            mode=mode,
            swap=swap,
            clamp=clamp,
            cot_max_new_tokens=cot_max_new_tokens,
        )

        def process(records: list[ResponsesInput], chunk_index: int) -> ChunkResult:
            pairs = [choose_pair(r, seed) for r in records]
            chosen_principles = [
                choose_principle(candidates, r.id, p, seed) for r, p in zip(records, pairs, strict=True)
            ]
            comparisons = [
                Comparison(r.prompt, r.responses[p[0]], r.responses[p[1]], principle)
                for r, p, principle in zip(records, pairs, chosen_principles, strict=True)
            ]
            judged = labeller.judge_each(comparisons, seed=derive_seed(seed, chunk_index))
            for record, verdict in zip(records, judged, strict=True):
                if isinstance(verdict, Unjudged):
                    print_summary(f"warning: record {record.id!r} left unlabelled: {verdict.reason}")
            verdicts = [v for v in judged if isinstance(v, Verdict)]
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
                )
                for r, p, principle, v in zip(records, pairs, chosen_principles, judged, strict=True)
                if isinstance(v, Verdict)
            ]
            counts = {
                "disagree": sum(v.orders_disagree for v in verdicts),
                "unlabelled": len(records) - len(out),
            }
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
    unlabelled = result.counts.get("unlabelled", 0)
    shown: dict[str, object] = {"left_unlabelled": unlabelled} if unlabelled else {}
    if not both_orders:
        return shown
    labelled = max(result.tracker.records, 1)
    disagree = result.counts.get("disagree", 0)
    share = f"{disagree}/{result.tracker.records} ({100.0 * disagree / labelled:.0f}%)"
    return {**shown, "the_two_option_orders_disagreed": share}
