"""The shared skeleton of every record-to-record phase.

validate the whole input (no output yet) -> load the model -> stream chunks of pending
records through ``process`` -> append each chunk's output and flush -> rename into place
and write the manifest. Chunks are formed from the full input in file order, so a resumed
run sees the same chunks (and seeds) as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from caitool.jsonl_io import ResumableWriter, batched, check_input, open_input, read_records
from caitool.progress import PhaseProgress, phase_progress
from caitool.provenance import build_manifest
from caitool.records import ConstitutionRef, Record

In = TypeVar("In")


@dataclass
class ValidatedInput(Generic[In]):
    path: Path
    parse: Callable[[dict[str, Any]], In]
    total: int


def validate_input(path: str | Path, parse: Callable[[dict[str, Any]], In]) -> ValidatedInput[In]:
    """Check every line before anything is written (stdin is spooled first)."""
    source = open_input(path)
    return ValidatedInput(path=source, parse=parse, total=check_input(source, parse))


@dataclass(frozen=True)
class PhaseSpec:
    """What identifies one run of a phase: it keys resumption and fills the manifest.

    ``params`` are the options that shape the output; a partial output written under other
    params (or another model or constitution) is never resumed into.
    """

    phase: str
    model_spec: str
    params: dict[str, Any]
    models: dict[str, Any]
    inputs: list[str | Path]
    started_at: str
    constitution: ConstitutionRef | None = None

    def run_key(self) -> dict[str, Any]:
        key: dict[str, Any] = {"phase": self.phase, "model": self.model_spec, **self.params}
        if self.constitution is not None:
            key["constitution"] = self.constitution.model_dump()
        return key

    def manifest(self, tracker: PhaseProgress, counts: dict[str, int]) -> dict[str, Any]:
        return build_manifest(
            phase=self.phase,
            params=self.params,
            started_at=self.started_at,
            models=self.models,
            inputs=self.inputs,
            constitution=self.constitution,
            counts={"records": tracker.records + tracker.already_done, "tokens": tracker.tokens, **counts},
        )


@dataclass
class ChunkResult:
    records: list[Record]
    tokens: int = 0
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class PhaseResult:
    tracker: PhaseProgress
    counts: dict[str, int]
    output: str


def run_record_phase(
    *,
    spec: PhaseSpec,
    source: ValidatedInput[In],
    output: str | Path,
    resume: bool,
    chunk_size: int,
    process: Callable[[list[In], int], ChunkResult],
) -> PhaseResult:
    counts: dict[str, int] = {}
    with ResumableWriter(output, spec.run_key(), resume=resume) as writer:
        with phase_progress(spec.phase, source.total, already_done=len(writer.done_ids)) as tracker:
            tracker.already_done = len(writer.done_ids)
            for chunk_index, chunk in enumerate(batched(read_records(source.path, source.parse), chunk_size)):
                pending = [r for r in chunk if not writer.is_done(r.id)]  # type: ignore[attr-defined]
                if not pending:
                    continue
                result = process(pending, chunk_index)
                writer.write_batch(result.records)
                tracker.advance(len(pending), result.tokens)
                for key, value in result.counts.items():
                    counts[key] = counts.get(key, 0) + value
        writer.manifest = spec.manifest(tracker, counts)
    return PhaseResult(tracker=tracker, counts=counts, output=str(output))
