"""Typed records: one pydantic model per artifact that travels between phases.

Field names follow TRL's dataset conventions so every artifact loads with
``datasets.load_dataset("json", data_files=...)`` and feeds TRL directly:
conversations are lists of ``{"role", "content"}``, prompt/completion records use
``prompt``/``completion``, preference records use ``prompt``/``chosen``/``rejected``.

Every record carries a stable ``id`` and a ``kind`` naming the artifact. Fields a user
put on an input record that caitool does not know are carried through untouched
(``extra="allow"``), so labels such as ``category`` survive the whole pipeline.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from caitool.errors import CaitoolError

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str


Conversation = list[Message]


class ConstitutionRef(BaseModel):
    """Which constitution produced a record: its name, version and a hash of its content."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    hash: str


class Record(BaseModel):
    """Base of every artifact. Unknown fields are user fields and are kept verbatim."""

    model_config = ConfigDict(extra="allow")

    id: str

    def user_fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=False), ensure_ascii=False)


class PromptRecord(Record):
    """A prompt (any number of turns) and, if the input carried one, the response to it."""

    kind: Literal["prompt"] = "prompt"
    prompt: Conversation
    response: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: Conversation) -> Conversation:
        if not value:
            raise ValueError("the prompt has no turns")
        return value


class GenerationRecord(Record):
    """Output of ``caitool generate``: the first sample as ``completion``, all samples in ``responses``."""

    kind: Literal["generation"] = "generation"
    prompt: Conversation
    completion: Conversation
    responses: list[str]
    finished: list[bool] = Field(description="per sample: did it end at end-of-turn (not cut by length)")
    model: str
    seed: int


class Round(BaseModel):
    """One critique/revision round under one principle."""

    model_config = ConfigDict(extra="forbid")

    principle_id: str
    critique_request: str
    critique: str
    revision_request: str | None = None
    revision: str | None = None
    flags: list[str] = Field(default_factory=list)
    model: str | None = Field(default=None, description="the model that wrote this round, when known")


class RevisionRecord(Record):
    """Output of ``critique`` and ``revise``: the initial response and every round, auditable.

    ``completion`` always holds the current response (the last revision, or the initial
    response before any revision), so the record is an SFT example as it stands.
    """

    kind: Literal["revision"] = "revision"
    prompt: Conversation
    initial_response: str
    rounds: list[Round] = Field(default_factory=list)
    completion: Conversation
    constitution: ConstitutionRef
    model: str

    @property
    def current_response(self) -> str:
        return self.completion[-1].content

    @property
    def pending_critique(self) -> Round | None:
        if self.rounds and self.rounds[-1].revision is None:
            return self.rounds[-1]
        return None


class PairRecord(Record):
    """What every preference pair shares, whoever made it: TRL's prompt/chosen/rejected layout and
    ``p_chosen``, the probability that ``chosen`` is the better response (1 for a hard label).

    ``train-rm`` and ``dpo`` read any pair record (:func:`parse_pair`)."""

    kind: str
    prompt: Conversation
    chosen: Conversation
    rejected: Conversation
    p_chosen: float = Field(ge=0.5, le=1.0)


class PreferenceRecord(PairRecord):
    """Output of ``label-preferences``: TRL's preference layout plus the soft label and its evidence."""

    kind: Literal["preference"] = "preference"
    principle_id: str
    pair: tuple[int, int] = Field(description="indices of the two responses in the input record")
    p_first: float = Field(
        description="P(response pair[0] is better) when it is shown as option (A); score mode: the label"
    )
    p_swapped: float | None = Field(
        default=None,
        description="P(response pair[0] is better) when it is shown as option (B); None without swap "
        "and in score mode (no options, so no order)",
    )
    mode: Literal["logprob", "cot", "score", "verdict", "verdict-cot", "verdict-score", "rule"] = Field(
        description="logprob: option letters; cot: letters after reasoning; score: each response "
        "scored alone (yes/no log-odds), the label from their difference; verdict, verdict-cot, "
        "verdict-score: the same questions answered in the judge's own turn (no prefill); rule: "
        "written by a rule or by hand, not by a feedback model (feedback_model says which)"
    )
    reasoning: list[str] = Field(
        default_factory=list, description="chain-of-thought texts (cot modes); the answers (verdict modes)"
    )
    samples: int | None = Field(
        default=None,
        description="verdict modes with --samples K: K answers sampled per question, the label their "
        "vote share",
    )
    from_cache: bool | None = Field(
        default=None, description="True when every answer behind the label came from the --cache directory"
    )
    feedback_model: str
    constitution: ConstitutionRef


class RevisionPairRecord(PairRecord):
    """Output of ``pairs-from-revisions``: a revision (chosen) against the initial response it
    grew from (rejected), the pairs the supervised phase already holds."""

    kind: Literal["revision_pair"] = "revision_pair"
    p_chosen: float = Field(default=1.0, ge=0.5, le=1.0)
    source_id: str = Field(description="the id of the revision record the pair comes from")
    round: int = Field(ge=1, description="the round whose revision is chosen (1 = the first)")
    principle_id: str = Field(description="the principle of that round")
    principle_ids: list[str] = Field(
        description="every round's principle from the initial response up to the chosen revision"
    )
    flags: list[str] = Field(default_factory=list, description="the chosen round's hygiene flags")
    model: str = Field(description="the model that wrote the chosen revision")
    constitution: ConstitutionRef


PAIR_KINDS: dict[str, type[PairRecord]] = {
    "preference": PreferenceRecord,
    "revision_pair": RevisionPairRecord,
}


def parse_pair(raw: dict[str, Any]) -> PairRecord:
    """A preference pair of any kind caitool writes (``label-preferences``, ``pairs-from-revisions``)."""
    model = PAIR_KINDS.get(raw.get("kind", "preference"))
    if model is None:
        raise CaitoolError(
            f'expected a preference pair ("preference" or "revision_pair"), got a "{raw.get("kind")}" record'
        )
    return parse_record(model, raw)  # type: ignore[return-value]


def parse_revision(raw: dict[str, Any]) -> RevisionRecord:
    """A record ``revise`` wrote (what ``sft`` and ``pairs-from-revisions`` read)."""
    if raw.get("kind") != "revision":
        raise CaitoolError('expected a "revision" record (the output of caitool revise)')
    record = parse_record(RevisionRecord, raw)
    assert isinstance(record, RevisionRecord)
    return record


# ---------------------------------------------------------------------------
# Reading input records


def stable_id(prompt: Conversation) -> str:
    """A content hash of the prompt, used when the input gives no id."""
    payload = json.dumps([m.model_dump() for m in prompt], ensure_ascii=False, sort_keys=True)
    return "p-" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _as_messages(value: Any, field: str, *, text_allowed: bool = True) -> Conversation:
    if not text_allowed and not isinstance(value, list):
        raise CaitoolError(
            f'field "{field}" must be a list of turns ({{"role": ..., "content": ...}}), '
            f"got {type(value).__name__}"
        )
    if isinstance(value, str):
        if not value.strip():
            raise CaitoolError(f'field "{field}" is an empty string')
        return [Message(role="user", content=value)]
    if isinstance(value, list):
        try:
            return [Message.model_validate(m) for m in value]
        except ValidationError as err:
            raise CaitoolError(f'field "{field}": {describe_validation_error(err)}') from None
    raise CaitoolError(f'field "{field}" must be a string or a list of messages, got {type(value).__name__}')


def parse_prompt_without_response(raw: dict[str, Any], responses_field: str) -> PromptRecord:
    """A prompt record whose responses come in ``responses_field``, never also as a response."""
    record = parse_prompt_input(raw)
    if record.response is not None:
        raise CaitoolError(
            f'give the responses as {responses_field} only, not also as "completion"/"response"'
        )
    return record


def parse_prompt_input(raw: dict[str, Any]) -> PromptRecord:
    """Normalise any accepted input form into a PromptRecord.

    Accepted: ``{"prompt": "text"}``, ``{"prompt": [messages]}``, ``{"messages": [messages]}``
    (a final assistant turn is taken as the response), caitool generation/revision records
    (their current response is kept) and ``prompt`` + ``completion``/``response`` pairs.
    """
    raw = dict(raw)
    known_kinds = {"prompt", "generation", "revision"}
    kind = raw.get("kind")
    if kind is not None and kind not in known_kinds:
        raise CaitoolError(f'a "{kind}" record cannot be used here (expected a prompt or a response)')
    if "prompt" in raw:
        prompt = _as_messages(raw.pop("prompt"), "prompt")
    elif "messages" in raw:
        # A chat dataset's "messages" is a list of turns by definition: text there is a malformed
        # record, not a one-turn prompt (that is spelled "prompt").
        prompt = _as_messages(raw.pop("messages"), "messages", text_allowed=False)
    else:
        raise CaitoolError('missing field "prompt" (or "messages")')
    if not prompt:
        raise CaitoolError('field "prompt" has no turns')
    response = _pop_response(raw, prompt)
    if prompt[-1].role == "assistant" and response is None:
        response = prompt.pop().content
    if not prompt or prompt[-1].role != "user":
        raise CaitoolError("the prompt must end with a user turn")
    explicit_id = raw.pop("id", None)
    if explicit_id is not None and not isinstance(explicit_id, str | int):
        raise CaitoolError(f'field "id" must be a string or an integer, got {type(explicit_id).__name__}')
    for caitool_field in ("kind", "responses", "finished", "model", "seed"):
        raw.pop(caitool_field, None)
    record_id = str(explicit_id) if explicit_id is not None else stable_id(prompt)
    return PromptRecord(id=record_id, prompt=prompt, response=response, **raw)


def _pop_response(raw: dict[str, Any], prompt: Conversation) -> str | None:
    if "completion" in raw:
        completion = raw.pop("completion")
        if isinstance(completion, str):
            return completion
        messages = _as_messages(completion, "completion")
        return messages[-1].content if messages else None
    if "response" in raw:
        response = raw.pop("response")
        if response is not None and not isinstance(response, str):
            raise CaitoolError(f'field "response" must be a string, got {type(response).__name__}')
        return response
    return None


def describe_validation_error(err: ValidationError) -> str:
    """The first pydantic error as a short human sentence: 'missing field "x"', 'field "x": ...'."""
    first = err.errors()[0]
    location = ".".join(str(part) for part in first.get("loc", ()))
    if first.get("type") == "missing":
        return f'missing field "{location}"'
    message = first.get("msg", "invalid value")
    return f'field "{location}": {message}' if location else message


def parse_record(model: type[Record], raw: dict[str, Any]) -> Record:
    """Validate ``raw`` as ``model``; a failure becomes a one-line CaitoolError."""
    expected_kind = model.model_fields["kind"].default if "kind" in model.model_fields else None
    kind = raw.get("kind")
    if expected_kind is not None and kind is not None and kind != expected_kind:
        raise CaitoolError(f'expected a "{expected_kind}" record, got a "{kind}" record')
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise CaitoolError(describe_validation_error(err)) from None


# ---------------------------------------------------------------------------
# Evaluation (caitool eval)


class EvalAnswerRecord(Record):
    """One model's answer to one held-out prompt in ``caitool eval``, with what eval measured on it."""

    kind: Literal["eval_answer"] = "eval_answer"
    prompt_id: str
    prompt_set: str = Field(description="the prompt file's name without extension")
    model_name: str = Field(description="the name given with --model NAME=PATH")
    model: str
    prompt: Conversation
    completion: Conversation
    num_words: int = Field(description="length in whitespace-separated words (comparable across tokenizers)")
    finished: bool
    refused: bool = Field(description="the answer declines, fully or in part (answer_class is not comply)")
    answer_class: Literal["comply", "partial", "refuse"] | None = Field(
        default=None, description="the class that counted: from classified_by"
    )
    classified_by: str | None = Field(
        default=None, description='"patterns" (caitool.refusals) or "judge" (--refusal-judge)'
    )
    pattern_class: Literal["comply", "partial", "refuse"] | None = Field(
        default=None, description="what the pattern classifier said (kept when the judge counted)"
    )
    judge_class_probs: dict[str, float] | None = Field(
        default=None, description="the refusal judge's probability for each class, when it was asked"
    )
    expect: Literal["refuse", "comply"] | None = Field(
        default=None, description="the right behaviour, when the prompt set says (labelled sets)"
    )
    category: str | None = Field(default=None, description="the prompt's category, when the set gives one")
    reward: float | None = Field(default=None, description="reward-model score, when --rm was given")


class JudgementRecord(Record):
    """One pairwise comparison of two models' answers to the same prompt by the AI labeller."""

    kind: Literal["judgement"] = "judgement"
    prompt_id: str
    prompt_set: str
    model_a: str
    model_b: str
    principle_id: str
    p_a: float = Field(ge=0.0, le=1.0, description="P(model_a's answer is better), averaged over both orders")
    p_first: float = Field(description="P(model_a's answer is better) when it is shown as option (A)")
    p_swapped: float | None = Field(
        default=None, description="P(model_a's answer is better) when it is shown as option (B)"
    )
    winner: Literal["a", "b", "tie"]
    judge: str
    samples: int | None = Field(
        default=None, description="verdict modes with --samples K: K votes per question"
    )
    from_cache: bool | None = Field(default=None, description="True when every answer came from --cache")
    constitution: ConstitutionRef
