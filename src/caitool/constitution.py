"""Constitutions: YAML files of critique/revision principles and comparison principles.

Format (see docs/constitutions.md)::

    name: harmless
    version: "1.0"
    description: ...
    critiques:            # supervised phase: one drawn per round
      - {id: ..., critique: "...", revision: "..."}
    comparisons:          # RL phase: one drawn per comparison
      - {id: ..., text: "..."}
    few_shot:             # optional
      critique:   [{principle, conversation, critique, revision}]
      comparison: [{principle, conversation, options: [A, B], answer: A|B}]

``--constitution`` takes a file path or the name of a bundled constitution (``harmless``,
``honest``). Records stamp the name, version and a hash of the parsed content.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from caitool.errors import CaitoolError
from caitool.records import ConstitutionRef, Message

BUNDLED_DIR = Path(__file__).parent / "constitutions"
DEFAULT_CONSTITUTION = "harmless"


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CritiquePrinciple(_Strict):
    id: str
    critique: str
    revision: str

    _check = field_validator("id", "critique", "revision")(_not_blank)


class ComparisonPrinciple(_Strict):
    id: str
    text: str

    _check = field_validator("id", "text")(_not_blank)


class CritiqueExample(_Strict):
    principle: str
    conversation: list[Message] = Field(min_length=2)
    critique: str
    revision: str

    _check = field_validator("principle", "critique", "revision")(_not_blank)

    @field_validator("conversation")
    @classmethod
    def _ends_with_assistant(cls, value: list[Message]) -> list[Message]:
        if value[-1].role != "assistant":
            raise ValueError("the last turn must be the assistant response being critiqued")
        return value


class ComparisonExample(_Strict):
    principle: str
    conversation: list[Message] = Field(min_length=1)
    options: list[str] = Field(min_length=2, max_length=2)
    answer: Literal["A", "B"]

    _check = field_validator("principle")(_not_blank)


class FewShot(_Strict):
    critique: list[CritiqueExample] = Field(default_factory=list)
    comparison: list[ComparisonExample] = Field(default_factory=list)


class Constitution(_Strict):
    name: str
    version: str
    description: str = ""
    critiques: list[CritiquePrinciple] = Field(min_length=1)
    comparisons: list[ComparisonPrinciple] = Field(default_factory=list)
    few_shot: FewShot = Field(default_factory=FewShot)

    _check = field_validator("name", "version")(_not_blank)

    @model_validator(mode="after")
    def _ids_unique_and_referenced(self) -> Constitution:
        for section in ("critiques", "comparisons"):
            seen: set[str] = set()
            for index, principle in enumerate(getattr(self, section)):
                if principle.id in seen:
                    raise ValueError(f'{section}[{index}].id: duplicate id "{principle.id}"')
                seen.add(principle.id)
        critique_ids = {p.id for p in self.critiques}
        comparison_ids = {p.id for p in self.comparisons}
        for index, example in enumerate(self.few_shot.critique):
            if example.principle not in critique_ids:
                raise ValueError(
                    f'few_shot.critique[{index}].principle: unknown critique id "{example.principle}"'
                )
        for index, example in enumerate(self.few_shot.comparison):
            if example.principle not in comparison_ids:
                raise ValueError(
                    f'few_shot.comparison[{index}].principle: unknown comparison id "{example.principle}"'
                )
        return self

    # -- identity ----------------------------------------------------------------
    @property
    def content_hash(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    @property
    def ref(self) -> ConstitutionRef:
        return ConstitutionRef(name=self.name, version=self.version, hash=self.content_hash)

    # -- lookups and draws ---------------------------------------------------------
    def critique(self, principle_id: str) -> CritiquePrinciple:
        for principle in self.critiques:
            if principle.id == principle_id:
                return principle
        raise CaitoolError(f'constitution "{self.name}" has no critique principle "{principle_id}"')

    def comparison(self, principle_id: str) -> ComparisonPrinciple:
        for principle in self.comparisons:
            if principle.id == principle_id:
                return principle
        raise CaitoolError(f'constitution "{self.name}" has no comparison principle "{principle_id}"')

    def restrict_critiques(self, ids: Sequence[str] | None) -> list[CritiquePrinciple]:
        return [self.critique(i) for i in ids] if ids else list(self.critiques)

    def restrict_comparisons(self, ids: Sequence[str] | None) -> list[ComparisonPrinciple]:
        if not self.comparisons:
            raise CaitoolError(f'constitution "{self.name}" has no comparison principles')
        return [self.comparison(i) for i in ids] if ids else list(self.comparisons)


def draw(principles: Sequence[Any], rng: random.Random, avoid: set[str] | None = None) -> Any:
    """One principle at random; ``avoid`` (ids used in earlier rounds) is honoured while possible."""
    fresh = [p for p in principles if p.id not in (avoid or set())]
    return rng.choice(fresh or list(principles))


def resolve_constitution_path(spec: str | Path) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        return path
    bundled = BUNDLED_DIR / f"{spec}.yaml"
    if bundled.exists():
        return bundled
    names = ", ".join(sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml")))
    raise CaitoolError(f'constitution "{spec}" not found: give a YAML file or a bundled name ({names})')


def load_constitution(spec: str | Path = DEFAULT_CONSTITUTION) -> Constitution:
    """Load and validate a constitution; any problem is one line naming the file and the place."""
    path = resolve_constitution_path(spec)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CaitoolError("not valid UTF-8", where=str(path)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CaitoolError(f"invalid YAML ({problem})", where=where) from None
    if not isinstance(raw, dict):
        raise CaitoolError("expected a YAML mapping with name, version, critiques, ...", where=str(path))
    try:
        return Constitution.model_validate(raw)
    except ValidationError as err:
        raise CaitoolError(_describe(err), where=str(path)) from None


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    location = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in first.get("loc", ()))
    location = location.replace(".[", "[")
    kind = first.get("type", "")
    if kind == "missing":
        return f'missing key "{location}"'
    if kind == "extra_forbidden":
        return f'unknown key "{location}"'
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return f"{location}: {message}" if location else message
