"""``caitool revise``: rewrite each response according to its pending critique.

Reads ``critique`` output. A record whose last round has a critique but no revision gets
the same principle's revision request; the revision is stored in that round and becomes
the record's current response (``completion``). Records with nothing pending are passed
through unchanged and counted, so running ``revise`` twice is harmless and its output is
always a valid input of the next ``critique``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from caitool.backends import GenerationBackend, SamplingParams, derive_seed
from caitool.constitution import Constitution, load_constitution
from caitool.critique import check_constitution
from caitool.errors import CaitoolError
from caitool.hygiene import REVISION_EMPTY, clean_revision, count_flags
from caitool.pipeline import BackendPhase, ChunkResult, PhaseResult, Runtime
from caitool.prompts import pick_examples, revision_conversation
from caitool.records import Conversation, Message, RevisionRecord, Round, parse_record


def revise_input_parser(constitution: Constitution) -> Callable[[dict[str, Any]], RevisionRecord]:
    ref = constitution.ref

    def parse(raw: dict[str, Any]) -> RevisionRecord:
        if raw.get("kind") != "revision":
            raise CaitoolError('expected a "revision" record (the output of caitool critique)')
        record = parse_record(RevisionRecord, raw)
        assert isinstance(record, RevisionRecord)
        check_constitution(record, ref)
        return record

    return parse


def apply_revision(record: RevisionRecord, revised: Round) -> RevisionRecord:
    # An empty revision is recorded and flagged, but the record keeps its previous response.
    current = record.current_response if REVISION_EMPTY in revised.flags else revised.revision
    return record.model_copy(
        update={
            "rounds": [*record.rounds[:-1], revised],
            "completion": [Message(role="assistant", content=current or "")],
        }
    )


def run_revise(
    input_path: str | Path,
    output: str | Path,
    *,
    constitution: str = "harmless",
    model: str = "default",
    few_shot: int = 2,
    params: SamplingParams = SamplingParams(),
    runtime: Runtime | None = None,
    backend: GenerationBackend | None = None,
) -> PhaseResult:
    loaded = load_constitution(constitution)

    def make_process(backend: GenerationBackend, seed: int):
        model_id = backend.model_id

        def process(records: list[RevisionRecord], chunk_index: int) -> ChunkResult:
            pending = [r for r in records if r.pending_critique is not None]
            conversations = [_revision_request(loaded, record, few_shot) for record in pending]
            revision_seed = derive_seed(seed, "revision", chunk_index)
            samples = backend.generate(conversations, params, revision_seed) if pending else []
            revised: dict[str, RevisionRecord] = {}
            flag_lists: list[list[str]] = []
            tokens = 0
            for record, (completion,) in zip(pending, samples, strict=True):
                critique_round = record.rounds[-1]
                cleaned = clean_revision(
                    completion.text, record.current_response, finished=completion.finished
                )
                new_round = critique_round.model_copy(
                    update={
                        "revision_request": loaded.critique(critique_round.principle_id).revision,
                        "revision": cleaned.text,
                        "flags": [*critique_round.flags, *cleaned.flags],
                        "model": _round_model(critique_round.model, model_id),
                    }
                )
                revised[record.id] = apply_revision(record, new_round)
                flag_lists.append(cleaned.flags)
                tokens += completion.num_tokens
            counts = count_flags(flag_lists)
            counts["revised"] = len(pending)
            counts["skipped_nothing_pending"] = len(records) - len(pending)
            return ChunkResult([revised.get(r.id, r) for r in records], tokens=tokens, counts=counts)

        return process

    phase = BackendPhase(
        phase="revise",
        parse=revise_input_parser(loaded),
        params={**asdict(params), "few_shot": few_shot},
        make_process=make_process,
        summary_counts=lambda result: _summary_counts(result.counts),
        constitution=loaded.ref,
    )
    return phase.run(input_path, output, model=model, runtime=runtime, backend=backend)


def _revision_request(constitution: Constitution, record: RevisionRecord, few_shot: int) -> Conversation:
    critique_round = record.rounds[-1]
    principle = constitution.critique(critique_round.principle_id)
    return revision_conversation(
        constitution,
        principle,
        record.prompt,
        record.current_response,
        critique_round.critique,
        pick_examples(constitution, principle.id, few_shot),
    )


def _round_model(critic: str | None, reviser: str) -> str:
    """A round critiqued by one model and revised by another names both, critic first."""
    return reviser if critic in (None, reviser) else f"{critic} + {reviser}"


def _summary_counts(counts: dict[str, int]) -> dict[str, int]:
    summary = {
        "revised": counts.get("revised", 0),
        "skipped_with_no_pending_critique": counts.get("skipped_nothing_pending", 0),
    }
    for key in ("revision-lead-in-stripped", "revision-empty", "revision-unchanged", "revision-is-critique"):
        summary[key.replace("-", "_")] = counts.get(key, 0)
    summary["revisions_cut_at_max_new_tokens"] = counts.get("revision-cut", 0)
    return summary
