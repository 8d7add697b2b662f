"""``caitool sft``: fine-tune a model on its own revisions (the SL-CAI step).

Revised records become TRL conversational prompt-completion examples (the prompt turns,
then the revision as one assistant turn), optionally mixed with helpful prompt/response
records so the model does not forget how to help. SFTTrainer trains with the loss on
completion tokens only. The result is a complete Hugging Face model directory (safetensors
weights, tokenizer and chat template, ``caitool_manifest.json``, ``training_log.jsonl``)
that appears in one rename when everything is written.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from caitool.choices import SftRounds, check_choice
from caitool.errors import CaitoolError
from caitool.hygiene import REVISION_EMPTY
from caitool.jsonl_io import read_records
from caitool.pipeline import Runtime, validate_input
from caitool.processes import current_processes
from caitool.progress import print_summary
from caitool.provenance import build_manifest, file_sha256, now_iso
from caitool.records import (
    ConstitutionRef,
    Conversation,
    PromptRecord,
    RevisionRecord,
    Round,
    parse_prompt_input,
    parse_revision,
)
from caitool.tokens import fitted_to_template
from caitool.trainers import (
    check_lora_saving,
    epoch_arguments,
    fit_policy,
    load_policy,
    policy_trainer,
)
from caitool.training import (
    CHECKPOINTS,
    atomic_model_dir,
    check_output_dir,
    publish_files,
    training_params,
    training_run_key,
)

RoundsMode = SftRounds


@dataclass
class SftData:
    examples: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    constitution: ConstitutionRef | None = None


def _example(prompt: Conversation, response: str) -> dict[str, Any]:
    return {
        "prompt": [m.model_dump() for m in prompt],
        "completion": [{"role": "assistant", "content": response}],
    }


def _parse_helpful(raw: dict[str, Any]) -> PromptRecord:
    record = parse_prompt_input(raw)
    if not record.response or not record.response.strip():
        raise CaitoolError(
            'a --mix record needs a response ("completion", "response" or a final assistant turn)'
        )
    return record


def usable_revisions(
    record: RevisionRecord, exclude_flags: Sequence[str] = ()
) -> tuple[list[tuple[int, Round]], int]:
    """(round number from 1, round) of every revision fit to train on, and how many revisions were not.

    A revision is usable unless it is empty or carries one of ``exclude_flags``.
    """
    excluded = {REVISION_EMPTY, *exclude_flags}
    revised = [(number, r) for number, r in enumerate(record.rounds, start=1) if r.revision is not None]
    usable = [(number, r) for number, r in revised if not excluded.intersection(r.flags)]
    return usable, len(revised) - len(usable)


def revision_examples(
    records: Sequence[RevisionRecord], rounds: RoundsMode, exclude_flags: Sequence[str] = ()
) -> SftData:
    """``final``: one example per record (its last usable revision); ``all``: one per usable round."""
    data = SftData(examples=[], counts={"records_without_revision": 0, "flagged_revisions_skipped": 0})
    for record in records:
        usable, skipped = usable_revisions(record, exclude_flags)
        data.counts["flagged_revisions_skipped"] += skipped
        if not usable:
            data.counts["records_without_revision"] += 1
            continue
        targets = usable[-1:] if rounds == "final" else usable
        data.examples.extend(_example(record.prompt, r.revision or "") for _, r in targets)
    return data


def helpful_examples(records: Sequence[PromptRecord], count: int, seed: int) -> list[dict[str, Any]]:
    """A seeded sample of ``count`` helpful records, in file order."""
    chosen = sorted(random.Random(seed).sample(range(len(records)), min(count, len(records))))
    return [_example(records[i].prompt, records[i].response or "") for i in chosen]


def load_sft_data(
    input_path: str | Path,
    *,
    rounds: RoundsMode,
    mix: str | Path | None,
    mix_ratio: float,
    seed: int,
    exclude_flags: Sequence[str] = (),
) -> SftData:
    """Read and check every input before anything is written."""
    check_choice("--rounds", rounds, SftRounds)
    source = validate_input(input_path, parse_revision)
    records = list(read_records(source.path, source.parse))
    data = revision_examples(records, rounds, exclude_flags)
    data.constitution = records[0].constitution
    if not data.examples:
        raise CaitoolError("no revised records to train on (run caitool revise first)", where=str(input_path))
    data.counts["revision_examples"] = len(data.examples)
    data.counts["helpful_examples"] = 0
    if mix is not None:
        helpful_source = validate_input(mix, _parse_helpful)
        helpful = list(read_records(helpful_source.path, helpful_source.parse))
        extra = helpful_examples(helpful, round(mix_ratio * len(data.examples)), seed)
        data.examples.extend(extra)
        data.counts["helpful_examples"] = len(extra)
    random.Random(seed).shuffle(data.examples)
    return data


@dataclass(frozen=True)
class SftConfig:
    """What sft trains on and how; the seed and checkpointing come with the shared Runtime."""

    rounds: RoundsMode = "final"
    exclude_flags: tuple[str, ...] = ()
    mix_ratio: float = 1.0
    lora: bool = False
    lora_rank: int = 16
    merge: bool = True  # with lora: save the merged model (False: the adapter alone)
    epochs: float = 1.0
    lr: float = 5e-5
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024

    def __post_init__(self) -> None:
        check_choice("--rounds", self.rounds, SftRounds)
        if not self.merge and not self.lora:
            raise CaitoolError("--no-merge only applies to --lora (a full fine-tune has no adapter to keep)")
        object.__setattr__(self, "exclude_flags", tuple(self.exclude_flags or ()))

    def as_params(self) -> dict[str, Any]:
        return {**asdict(self), "exclude_flags": list(self.exclude_flags)}


SftSettings = SftConfig  # the name sft's config had before every phase had one


def sft_config(settings: SftConfig, runtime: Runtime, output_dir: Path, device: str) -> Any:
    from trl import SFTConfig

    return SFTConfig(**epoch_arguments(settings, runtime, output_dir, device), completion_only_loss=True)


def run_sft(
    input_path: str | Path,
    output_dir: str | Path,
    *,
    model: str = "default",
    mix: str | Path | None = None,
    config: SftConfig | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Fine-tune and publish ``output_dir``; returns the manifest written inside it.

    Under ``torchrun`` or ``accelerate launch`` every process runs this: the Trainer gives each
    its share of every batch (``batch_size`` examples per process), and the main process writes.
    """
    from trl import SFTTrainer

    settings = config or SftConfig()
    runtime = runtime or Runtime()
    started = now_iso()
    data = load_sft_data(
        input_path,
        rounds=settings.rounds,
        mix=mix,
        mix_ratio=settings.mix_ratio,
        seed=runtime.seed,
        exclude_flags=settings.exclude_flags,
    )
    check_output_dir(output_dir)
    check_lora_saving("sft", model, settings)
    processes = current_processes()
    info, tokenizer, policy, device = load_policy(model, runtime.trust_remote_code)
    data.examples = [fitted_to_template(e, tokenizer) for e in data.examples]
    # The number of processes shapes the run: each takes batch_size examples per step.
    run_key = training_run_key(
        input_path,
        {},
        settings.as_params(),
        runtime.seed,
        mix=file_sha256(mix) if mix is not None else None,
        model=info.sha256,
        processes=processes.count,
    )
    with atomic_model_dir(output_dir, processes) as staging:
        trainer, result, seconds, saved_dtype, checkpoint = fit_policy(
            staging,
            run_key,
            runtime,
            processes,
            build=lambda resuming: policy_trainer(
                SFTTrainer,
                model=policy,
                args=sft_config(settings, runtime, staging / CHECKPOINTS, device),
                processing_class=tokenizer,
                examples=data.examples,
                settings=settings,
                staging=staging,
                resuming=resuming,
                processes=processes,
            ),
            settings=settings,
            base_path=info.path,
            phase="sft",
            examples=len(data.examples),
        )
        counts = {
            **data.counts,
            "examples": len(data.examples),
            "steps": result.global_step,
            "mean_train_loss": result.training_loss,
            "train_tokens_per_epoch": sum(len(ids) for ids in trainer.train_dataset["input_ids"]),
            "train_seconds": round(seconds, 2),
            "saved_dtype": saved_dtype,
        }
        manifest = build_manifest(
            phase="sft",
            params=training_params(settings.as_params(), runtime, checkpoint, processes),
            started_at=started,
            models={"base": info},
            inputs=[input_path, *([mix] if mix is not None else [])],
            constitution=data.constitution,
            counts=counts,
        )
        publish_files(staging, tokenizer, manifest, processes)
    print_summary(_summary(output_dir, counts, settings))
    return manifest


def _summary(output_dir: str | Path, counts: dict[str, Any], settings: SftConfig) -> str:
    seconds = counts["train_seconds"]
    tokens = counts["train_tokens_per_epoch"] * settings.epochs
    return (
        f"sft: {counts['examples']} examples ({counts['revision_examples']} revisions, "
        f"{counts['helpful_examples']} helpful) in {counts['steps']} steps, {seconds:.1f}s "
        f"({tokens / max(seconds, 1e-9):.0f} train tok/s); mean train loss {counts['mean_train_loss']:.4f}; "
        f"records without a revision: {counts['records_without_revision']}; "
        f"empty or excluded revisions skipped: {counts['flagged_revisions_skipped']}; output: {output_dir}"
    )
