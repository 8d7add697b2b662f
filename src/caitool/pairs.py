"""``caitool pairs-from-revisions``: preference pairs from the supervised phase's revisions.

Every revised record already holds a comparison: the revision the constitution asked for
against the response it replaced. The open Constitutional AI recipes train DPO on exactly
these pairs (revision chosen, initial response rejected), with no feedback model at all.
Each pair keeps where it came from: the revision record's id, the round whose revision is
chosen, the principle of that round and of every round before it, the round's hygiene flags,
the model that wrote it and the constitution. The output is TRL's prompt/chosen/rejected
layout, read as it is by ``dpo`` and ``train-rm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from caitool.choices import SftRounds, check_choice
from caitool.errors import CaitoolError
from caitool.jsonl_io import ResumableWriter, read_records
from caitool.pipeline import validate_input
from caitool.progress import print_summary
from caitool.provenance import build_manifest, now_iso
from caitool.records import Message, RevisionPairRecord, RevisionRecord, parse_revision
from caitool.sft import usable_revisions


@dataclass(frozen=True)
class PairsConfig:
    """Which revisions become pairs, and the label each pair gets."""

    rounds: SftRounds = "final"  # final: the last usable revision of a record; all: every usable one
    exclude_flags: tuple[str, ...] = ()
    p_chosen: float = 1.0

    def __post_init__(self) -> None:
        check_choice("--round", self.rounds, SftRounds)
        if not 0.5 <= self.p_chosen <= 1.0:
            raise CaitoolError(f"--p-chosen must be between 0.5 and 1, got {self.p_chosen}")
        object.__setattr__(self, "exclude_flags", tuple(self.exclude_flags or ()))

    def as_params(self) -> dict[str, Any]:
        return {**asdict(self), "exclude_flags": list(self.exclude_flags)}


@dataclass
class PairCounts:
    records: int = 0
    pairs: int = 0
    records_without_revision: int = 0
    flagged_revisions_skipped: int = 0
    same_as_initial: int = 0
    by_round: dict[int, int] = field(default_factory=dict)


def revision_pairs(
    record: RevisionRecord, settings: PairsConfig, counts: PairCounts
) -> list[RevisionPairRecord]:
    """``final``: the last usable revision against the initial response; ``all``: every usable one.

    A revision with the same text as the initial response is no comparison and is skipped.
    """
    usable, skipped = usable_revisions(record, settings.exclude_flags)
    counts.flagged_revisions_skipped += skipped
    if not usable:
        counts.records_without_revision += 1
        return []
    chosen = usable[-1:] if settings.rounds == "final" else usable
    pairs = []
    for number, round_ in chosen:
        revision = round_.revision or ""
        if revision.strip() == record.initial_response.strip():
            counts.same_as_initial += 1
            continue
        pairs.append(
            RevisionPairRecord(
                id=record.id if settings.rounds == "final" else f"{record.id}/r{number}",
                prompt=record.prompt,
                chosen=[Message(role="assistant", content=revision)],
                rejected=[Message(role="assistant", content=record.initial_response)],
                p_chosen=settings.p_chosen,
                source_id=record.id,
                round=number,
                principle_id=round_.principle_id,
                principle_ids=[r.principle_id for r in record.rounds[:number]],
                flags=list(round_.flags),
                model=round_.model or record.model,
                constitution=record.constitution,
                **record.user_fields(),
            )
        )
        counts.by_round[number] = counts.by_round.get(number, 0) + 1
    return pairs


def run_pairs_from_revisions(
    input_path: str | Path, output: str | Path, *, config: PairsConfig | None = None
) -> PairCounts:
    """Write one pair per record (``final``) or per usable round (``all``), with a manifest."""
    settings = config or PairsConfig()
    started = now_iso()
    source = validate_input(input_path, parse_revision)
    counts = PairCounts()
    pairs: list[RevisionPairRecord] = []
    constitution = None
    for record in read_records(source.path, source.parse):
        counts.records += 1
        constitution = constitution or record.constitution
        pairs.extend(revision_pairs(record, settings, counts))
    if not pairs:
        raise CaitoolError(
            "no revision differs from its initial response, so there is no pair to write "
            "(run caitool revise first)",
            where=str(input_path),
        )
    counts.pairs = len(pairs)
    # The transformation takes milliseconds: a killed run is simply redone, never resumed.
    with ResumableWriter(
        output, {"phase": "pairs-from-revisions", **settings.as_params()}, resume=False
    ) as writer:
        writer.write_batch(pairs)
        writer.manifest = build_manifest(
            phase="pairs-from-revisions",
            params=settings.as_params(),
            started_at=started,
            inputs=[input_path],
            constitution=constitution,
            counts=_manifest_counts(counts),
        )
    print_summary(_summary(counts, output))
    return counts


def _manifest_counts(counts: PairCounts) -> dict[str, Any]:
    plain = asdict(counts)
    plain["by_round"] = {str(k): v for k, v in sorted(counts.by_round.items())}
    return plain


def _summary(counts: PairCounts, output: str | Path) -> str:
    rounds: Sequence[str] = [f"round {k}: {v}" for k, v in sorted(counts.by_round.items())]
    return (
        f"pairs-from-revisions: {counts.pairs} pairs from {counts.records} records ({', '.join(rounds)}); "
        f"records without a usable revision: {counts.records_without_revision}; "
        f"empty or excluded revisions: {counts.flagged_revisions_skipped}; "
        f"revisions identical to the initial response: {counts.same_as_initial}; output: {output}"
    )
