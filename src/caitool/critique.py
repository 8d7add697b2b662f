"""``caitool critique``: the model critiques its current response against one drawn principle.

Input may be plain prompts (the initial response is generated first, in the same run),
records that already carry a response (``generate`` output, prompt + completion), or
``revise`` output, which starts the next round. Each record gets one new round holding
the principle id, the critique request and the critique; ``revise`` fills in the rest.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from caitool.backends import GenerationBackend, SamplingParams, derive_seed
from caitool.constitution import Constitution, CritiquePrinciple, draw, load_constitution
from caitool.errors import CaitoolError
from caitool.hygiene import clean_critique, count_flags
from caitool.pipeline import BackendPhase, ChunkResult, PhaseResult, Runtime
from caitool.prompts import critique_conversation, pick_examples
from caitool.records import (
    ConstitutionRef,
    Message,
    PromptRecord,
    RevisionRecord,
    Round,
    parse_prompt_input,
    parse_record,
)

CritiqueInput = PromptRecord | RevisionRecord


def check_constitution(record: RevisionRecord, expected: ConstitutionRef) -> None:
    """A record's rounds only make sense under the constitution that started them."""
    have = record.constitution
    if have != expected:
        raise CaitoolError(
            f'record "{record.id}" was critiqued under constitution {have.name} {have.version} '
            f"(hash {have.hash}), not {expected.name} {expected.version} (hash {expected.hash}); "
            "pass the same --constitution as its earlier rounds"
        )


def critique_input_parser(constitution: Constitution) -> Callable[[dict[str, Any]], CritiqueInput]:
    ref = constitution.ref

    def parse(raw: dict[str, Any]) -> CritiqueInput:
        if raw.get("kind") != "revision":
            return parse_prompt_input(raw)
        record = parse_record(RevisionRecord, raw)
        assert isinstance(record, RevisionRecord)
        check_constitution(record, ref)
        if record.pending_critique is not None:
            raise CaitoolError(
                f'record "{record.id}" already has a critique waiting for its revision; '
                "run caitool revise first"
            )
        return record

    return parse


def draw_principle(
    principles: Sequence[CritiquePrinciple], record: RevisionRecord, seed: int
) -> CritiquePrinciple:
    """Seeded by (seed, record id, round number) alone, so batching and resuming never change a draw."""
    round_number = len(record.rounds) + 1
    rng = random.Random(derive_seed(seed, "principle", record.id, round_number))
    return draw(principles, rng, avoid={r.principle_id for r in record.rounds})


def start_revision_record(
    record: PromptRecord, generated: dict[str, str], ref: ConstitutionRef, model_id: str
) -> RevisionRecord:
    """Round zero: the response the input carried, or the one generated for it in this run."""
    response = record.response if record.response is not None else generated[record.id]
    return RevisionRecord(
        id=record.id,
        prompt=record.prompt,
        initial_response=response,
        rounds=[],
        completion=[Message(role="assistant", content=response)],
        constitution=ref,
        model=model_id,
        **record.user_fields(),
    )


def run_critique(
    input_path: str | Path,
    output: str | Path,
    *,
    constitution: str = "harmless",
    model: str = "default",
    principles: Sequence[str] = (),
    few_shot: int = 2,
    params: SamplingParams = SamplingParams(),
    response_max_new_tokens: int | None = None,
    runtime: Runtime | None = None,
    backend: GenerationBackend | None = None,
) -> PhaseResult:
    response_params = SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        max_new_tokens=response_max_new_tokens or params.max_new_tokens,
    )
    loaded = load_constitution(constitution)
    allowed = loaded.restrict_critiques(principles)

    def make_process(backend: GenerationBackend, seed: int):
        model_id = backend.model_id

        def initial_responses(
            records: list[CritiqueInput], chunk_index: int
        ) -> tuple[list[RevisionRecord], int]:
            needing = [r for r in records if isinstance(r, PromptRecord) and r.response is None]
            generated: dict[str, str] = {}
            tokens = 0
            if needing:
                samples = backend.generate(
                    [r.prompt for r in needing], response_params, derive_seed(seed, "response", chunk_index)
                )
                for record, (completion,) in zip(needing, samples, strict=True):
                    generated[record.id] = completion.text
                    tokens += completion.num_tokens
            started_records = [
                r
                if isinstance(r, RevisionRecord)
                else start_revision_record(r, generated, loaded.ref, model_id)
                for r in records
            ]
            return started_records, tokens

        def process(records: list[CritiqueInput], chunk_index: int) -> ChunkResult:
            revision_records, tokens = initial_responses(records, chunk_index)
            drawn = [draw_principle(allowed, r, seed) for r in revision_records]
            conversations = [
                critique_conversation(
                    loaded, p, r.prompt, r.current_response, pick_examples(loaded, p.id, few_shot)
                )
                for r, p in zip(revision_records, drawn, strict=True)
            ]
            samples = backend.generate(conversations, params, derive_seed(seed, "critique", chunk_index))
            out: list[RevisionRecord] = []
            flag_lists: list[list[str]] = []
            for record, principle, (completion,) in zip(revision_records, drawn, samples, strict=True):
                cleaned = clean_critique(
                    completion.text, record.current_response, finished=completion.finished
                )
                new_round = Round(
                    principle_id=principle.id,
                    critique_request=principle.critique,
                    critique=cleaned.text,
                    flags=cleaned.flags,
                    model=model_id,
                )
                out.append(record.model_copy(update={"rounds": [*record.rounds, new_round]}))
                flag_lists.append(cleaned.flags)
                tokens += completion.num_tokens
            counts = count_flags(flag_lists)
            counts["initial_responses_generated"] = sum(
                isinstance(r, PromptRecord) and r.response is None for r in records
            )
            return ChunkResult(out, tokens=tokens, counts=counts)

        return process

    phase = BackendPhase(
        phase="critique",
        parse=critique_input_parser(loaded),
        params={
            **asdict(params),
            "response_max_new_tokens": response_params.max_new_tokens,
            "few_shot": few_shot,
            "principles": list(principles),
        },
        make_process=make_process,
        summary_counts=lambda result: _summary_counts(result.counts),
        constitution=loaded.ref,
    )
    return phase.run(input_path, output, model=model, runtime=runtime, backend=backend)


def _summary_counts(counts: dict[str, int]) -> dict[str, int]:
    keys = (
        "initial_responses_generated",
        "critique-lead-in-stripped",
        "critique-empty",
        "critique-is-revision",
    )
    summary = {key.replace("-", "_"): counts.get(key, 0) for key in keys}
    summary["critiques_cut_at_max_new_tokens"] = counts.get("critique-cut", 0)
    return summary
