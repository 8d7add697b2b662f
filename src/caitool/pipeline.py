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
from caitool.records import Record

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
    label: str,
    source: ValidatedInput[In],
    output: str | Path,
    run_key: dict[str, Any],
    resume: bool,
    chunk_size: int,
    process: Callable[[list[In], int], ChunkResult],
    manifest: Callable[[PhaseProgress, dict[str, int]], dict[str, Any]],
) -> PhaseResult:
    counts: dict[str, int] = {}
    with ResumableWriter(output, run_key, resume=resume) as writer:
        with phase_progress(label, source.total, already_done=len(writer.done_ids)) as tracker:
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
        writer.manifest = manifest(tracker, counts)
    return PhaseResult(tracker=tracker, counts=counts, output=str(output))
