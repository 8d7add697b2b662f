"""``caitool generate``: sample responses to prompts, from a local or a served model."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from caitool.backends import GenerationBackend, SamplingParams, derive_seed
from caitool.errors import CaitoolError
from caitool.pipeline import BackendPhase, ChunkResult, PhaseResult, Runtime
from caitool.records import GenerationRecord, Message, PromptRecord, parse_prompt_input


def run_generate(
    input_path: str | Path,
    output: str | Path,
    *,
    model: str = "default",
    params: SamplingParams = SamplingParams(),
    runtime: Runtime | None = None,
    backend: GenerationBackend | None = None,
) -> PhaseResult:
    if params.n < 1:
        raise CaitoolError("-n must be at least 1")

    def make_process(backend: GenerationBackend, seed: int):
        def process(records: list[PromptRecord], chunk_index: int) -> ChunkResult:
            samples = backend.generate([r.prompt for r in records], params, derive_seed(seed, chunk_index))
            out = [
                _generation_record(r, s, backend.model_id, seed)
                for r, s in zip(records, samples, strict=True)
            ]
            unfinished = sum(not c.finished for s in samples for c in s)
            return ChunkResult(
                out, tokens=sum(c.num_tokens for s in samples for c in s), counts={"cut": unfinished}
            )

        return process

    phase = BackendPhase(
        phase="generate",
        parse=parse_prompt_input,
        params=asdict(params),
        make_process=make_process,
        summary_counts=lambda result: {"samples_cut_at_max_new_tokens": result.counts.get("cut", 0)},
    )
    return phase.run(input_path, output, model=model, runtime=runtime, backend=backend)


def _generation_record(record: PromptRecord, samples, model_id: str, seed: int) -> GenerationRecord:
    return GenerationRecord(
        id=record.id,
        prompt=record.prompt,
        completion=[Message(role="assistant", content=samples[0].text)],
        responses=[c.text for c in samples],
        finished=[c.finished for c in samples],
        model=model_id,
        seed=seed,
        **record.user_fields(),
    )
