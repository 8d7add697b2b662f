"""The shared skeleton of every record-to-record phase (generate, critique, revise, label-preferences).

validate the whole input (no output yet) -> load the model -> stream chunks of pending
records through ``process`` -> append each chunk's output and flush -> rename into place
and write the manifest -> print the summary. Chunks are formed from the full input in file
order, so a resumed run sees the same chunks (and seeds) as an uninterrupted one.

A phase module keeps only what is its own: how to parse an input record, what
``process(records, chunk_index)`` does with a chunk, and which counts its summary shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from caitool.backends import BackendOptions, GenerationBackend, is_served, load_backend
from caitool.jsonl_io import ResumableWriter, batched, check_input, open_input, read_records
from caitool.progress import PhaseProgress, phase_progress, print_summary, summary_line
from caitool.provenance import build_manifest, now_iso
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
    backend_stats: Callable[[], dict[str, int]] = dict,
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
        counts.update(backend_stats())
        writer.manifest = spec.manifest(tracker, counts)
    return PhaseResult(tracker=tracker, counts=counts, output=str(output))


@dataclass(frozen=True)
class Runtime:
    """The options every phase shares, beside its own config: how to reach or load the model, the
    seed, whether a killed run is continued, and how often a training phase saves a checkpoint
    (record phases flush after every chunk instead)."""

    backend: BackendOptions = field(default_factory=BackendOptions)
    seed: int = 0
    resume: bool = True
    checkpoint_every: int = 0

    @property
    def trust_remote_code(self) -> bool:
        return self.backend.trust_remote_code


def backend_params(model: str, runtime: Runtime) -> dict[str, Any]:
    """The runtime options that shape a phase's output, for its run key and manifest.

    A local model's batches (and so its sampled outputs) follow ``batch_size`` and ``dtype``;
    a served model's chunks follow ``concurrency``. Timeouts, retries and replica addresses
    change how the answers arrive, not what they are.
    """
    options = runtime.backend
    shaping: dict[str, Any] = {"batch_size": options.batch_size, "dtype": options.dtype, "seed": runtime.seed}
    if is_served(model):
        shaping["concurrency"] = options.concurrency
        shaping["tokenizer"] = options.tokenizer
    elif options.engine != "transformers":
        # Another engine's kernels give other samples; named only then, so existing run keys stand.
        shaping["engine"] = options.engine
    return shaping


Process = Callable[[list[In], int], ChunkResult]


def api_usage(counts: dict[str, Any]) -> dict[str, object]:
    """The requests and billed tokens a hosted API reported, for a summary line (empty when none)."""
    if "prompt_tokens" not in counts:
        return {}
    return {
        "requests": counts.get("requests", 0),
        "prompt_tokens": counts["prompt_tokens"],
        "completion_tokens": counts.get("completion_tokens", 0),
    }


@dataclass
class BackendPhase(Generic[In]):
    """A record phase that talks to a model: what is its own, apart from any one run of it.

    ``make_process(backend, seed)`` returns the phase's ``process(records, chunk_index)``;
    ``summary_counts(result)`` the counts its closing line shows. ``chunk_factor`` times the
    backend's parallelism records make one chunk (one write, one flush). :meth:`run` does the
    rest, the same for every phase: check the input, load the model, resume or start the
    output, stream the chunks, write the manifest and print the summary.
    """

    phase: str
    parse: Callable[[dict[str, Any]], In]
    params: dict[str, Any]
    make_process: Callable[[GenerationBackend, int], Process]
    summary_counts: Callable[[PhaseResult], dict[str, object]]
    constitution: ConstitutionRef | None = None
    role: str = "policy"
    chunk_factor: int = 4

    def run(
        self,
        input_path: str | Path,
        output: str | Path,
        *,
        model: str,
        runtime: Runtime | None = None,
        backend: GenerationBackend | None = None,
    ) -> PhaseResult:
        """One run; ``backend``, when given, is used instead of loading ``model`` (tests, eval)."""
        runtime = runtime or Runtime()
        started = now_iso()
        source = validate_input(input_path, self.parse)
        backend = backend or load_backend(model, runtime.backend)
        spec = PhaseSpec(
            phase=self.phase,
            model_spec=model,
            params={**self.params, **backend_params(model, runtime)},
            models={self.role: backend.describe()},
            inputs=[input_path],
            started_at=started,
            constitution=self.constitution,
        )
        result = run_record_phase(
            spec=spec,
            source=source,
            output=output,
            resume=runtime.resume,
            chunk_size=self.chunk_factor * backend.parallelism,
            process=self.make_process(backend, runtime.seed),
            backend_stats=backend.stats,
        )
        retried = result.counts.get("retried_requests", 0)
        print_summary(
            summary_line(
                self.phase,
                result.tracker,
                **self.summary_counts(result),
                **({"retried_requests": retried} if retried else {}),
                **api_usage(result.counts),
                output=output,
            )
        )
        return result
