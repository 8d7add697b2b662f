"""``caitool generate``: sample responses to prompts with a local model."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from caitool.backend import GenerationBackend, SamplingParams, TransformersBackend, derive_seed
from caitool.errors import CaitoolError
from caitool.pipeline import ChunkResult, PhaseResult, PhaseSpec, run_record_phase, validate_input
from caitool.progress import print_summary, summary_line
from caitool.provenance import now_iso
from caitool.records import GenerationRecord, Message, PromptRecord, parse_prompt_input


def run_generate(
    input_path: str | Path,
    output: str | Path,
    *,
    model: str = "default",
    params: SamplingParams | None = None,
    batch_size: int = 8,
    seed: int = 0,
    resume: bool = True,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    backend: GenerationBackend | None = None,
) -> PhaseResult:
    params = params or SamplingParams()
    if params.n < 1:
        raise CaitoolError("-n must be at least 1")
    started = now_iso()
    source = validate_input(input_path, parse_prompt_input)
    if backend is None:
        backend = TransformersBackend.load(
            model, batch_size=batch_size, dtype=dtype, trust_remote_code=trust_remote_code
        )

    def process(records: list[PromptRecord], chunk_index: int) -> ChunkResult:
        samples = backend.generate([r.prompt for r in records], params, derive_seed(seed, chunk_index))
        out = [
            _generation_record(r, s, backend.model_id, seed) for r, s in zip(records, samples, strict=True)
        ]
        unfinished = sum(not c.finished for s in samples for c in s)
        return ChunkResult(
            out, tokens=sum(c.num_tokens for s in samples for c in s), counts={"cut": unfinished}
        )

    spec = PhaseSpec(
        phase="generate",
        model_spec=model,
        params={**asdict(params), "batch_size": batch_size, "seed": seed, "dtype": dtype},
        models={"policy": getattr(backend, "info", backend.model_id)},
        inputs=[input_path],
        started_at=started,
    )
    result = run_record_phase(
        spec=spec, source=source, output=output, resume=resume, chunk_size=batch_size * 4, process=process
    )
    print_summary(
        summary_line(
            "generate",
            result.tracker,
            samples_cut_at_max_new_tokens=result.counts.get("cut", 0),
            output=output,
        )
    )
    return result


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
