"""``caitool sft``: fine-tune a model on its own revisions (the SL-CAI step).

Revised records become TRL conversational prompt-completion examples (the prompt turns,
then the revision as one assistant turn), optionally mixed with helpful prompt/response
records so the model does not forget how to help. SFTTrainer trains with the loss on
completion tokens only. The result is a complete Hugging Face model directory (safetensors
weights, tokenizer and chat template, ``caitool_manifest.json``, ``training_log.jsonl``)
that appears in one rename when everything is written.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from caitool.choices import SftRounds, check_choice
from caitool.errors import CaitoolError
from caitool.hygiene import REVISION_EMPTY
from caitool.jsonl_io import read_records
from caitool.models import model_info, require_full_model
from caitool.pipeline import Runtime, validate_input
from caitool.processes import Processes, current_processes, launch_sharding
from caitool.progress import phase_progress, print_summary
from caitool.provenance import build_manifest, file_sha256, now_iso
from caitool.records import (
    ConstitutionRef,
    Conversation,
    PromptRecord,
    RevisionRecord,
    parse_prompt_input,
    parse_record,
)
from caitool.training import (
    CHECKPOINTS,
    TRAINING_LOG,
    atomic_model_dir,
    check_output_dir,
    checkpoint_step,
    cpu_training_kwargs,
    gathered_state_dict,
    jsonl_log_callback,
    keep_log_until,
    resume_checkpoint,
    save_like_base,
    write_model_manifest,
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


def _parse_revision(raw: dict[str, Any]) -> RevisionRecord:
    if raw.get("kind") != "revision":
        raise CaitoolError('expected a "revision" record (the output of caitool revise)')
    record = parse_record(RevisionRecord, raw)
    assert isinstance(record, RevisionRecord)
    return record


def _parse_helpful(raw: dict[str, Any]) -> PromptRecord:
    record = parse_prompt_input(raw)
    if not record.response or not record.response.strip():
        raise CaitoolError(
            'a --mix record needs a response ("completion", "response" or a final assistant turn)'
        )
    return record


def revision_examples(
    records: Sequence[RevisionRecord], rounds: RoundsMode, exclude_flags: Sequence[str] = ()
) -> SftData:
    """``final``: one example per record (its last usable revision); ``all``: one per usable round.

    A revision is usable unless it is empty or carries one of ``exclude_flags``.
    """
    excluded = {REVISION_EMPTY, *exclude_flags}
    data = SftData(examples=[], counts={"records_without_revision": 0, "flagged_revisions_skipped": 0})
    for record in records:
        revised = [r for r in record.rounds if r.revision is not None]
        usable = [r for r in revised if not excluded.intersection(r.flags)]
        data.counts["flagged_revisions_skipped"] += len(revised) - len(usable)
        if not usable:
            data.counts["records_without_revision"] += 1
            continue
        targets = usable[-1:] if rounds == "final" else usable
        data.examples.extend(_example(record.prompt, r.revision or "") for r in targets)
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
    source = validate_input(input_path, _parse_revision)
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

    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=settings.epochs,
        learning_rate=settings.lr,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length,
        completion_only_loss=True,
        seed=runtime.seed,
        data_seed=runtime.seed,
        logging_steps=1,
        save_strategy="steps" if runtime.checkpoint_every else "no",
        save_steps=runtime.checkpoint_every or 500,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        **cpu_training_kwargs(device),
    )


def lora_config(settings: SftConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=2 * settings.lora_rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def progress_callback(tracker: Any) -> Any:
    """Advance caitool's stderr progress once per optimizer step (the Trainer's own printers are removed)."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            tracker.advance(1)

    return _Progress()


def load_policy(spec: str, trust_remote_code: bool) -> tuple[Any, Any, Any, str]:
    """Model info, tokenizer and fp32 weights (on a GPU the Trainer's bf16 autocast does mixed precision)."""
    from caitool.models import (
        force_offline,
        load_full_causal_lm,
        load_tokenizer,
        pick_device,
        quiet_transformers,
    )

    info = model_info(spec)
    force_offline()
    quiet_transformers()
    import torch

    tokenizer = load_tokenizer(info.path, trust_remote_code=trust_remote_code)
    policy = load_full_causal_lm(info.path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return info, tokenizer, policy, pick_device()


def build_trainer(
    policy: Any,
    tokenizer: Any,
    data: SftData,
    settings: SftConfig,
    runtime: Runtime,
    staging: Path,
    device: str,
    resuming: bool,
    processes: Processes,
) -> Any:
    """SFTTrainer logging to ``training_log.jsonl``; caitool's progress replaces the Trainer's printers."""
    from datasets import Dataset, disable_progress_bars
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    disable_progress_bars()  # TRL's dataset preparation bars would drown caitool's one-line progress
    trainer = SFTTrainer(
        model=policy,
        args=sft_config(settings, runtime, staging / CHECKPOINTS, device),
        train_dataset=Dataset.from_list(data.examples),
        processing_class=tokenizer,
        peft_config=lora_config(settings) if settings.lora else None,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(jsonl_log_callback(staging / TRAINING_LOG, append=resuming, processes=processes))
    return trainer


def train(
    trainer: Any, settings: SftConfig, examples: int, checkpoint: str | None, processes: Processes
) -> tuple[Any, float]:
    per_step = settings.batch_size * settings.grad_accum * processes.count
    steps = math.ceil(examples / per_step) * math.ceil(settings.epochs)
    started = time.perf_counter()
    with phase_progress("sft", steps) as tracker:
        trainer.add_callback(progress_callback(tracker))
        result = trainer.train(resume_from_checkpoint=checkpoint)
    return result, time.perf_counter() - started


def save_trained(
    trainer: Any, settings: SftConfig, staging: Path, base_dir: str, processes: Processes
) -> str:
    """Save the trained model (or, with --no-merge, the adapter) and return the dtype saved.

    Every process takes part in gathering the weights; the main process writes them.
    """
    state = gathered_state_dict(trainer.accelerator, trainer.model_wrapped)
    if not processes.is_main:
        return ""
    if settings.lora and not settings.merge:
        # A PeftModel saves only its adapter, which names the base directory it was trained on.
        trainer.model.save_pretrained(staging, state_dict=state)
        return "adapter"
    if settings.lora:
        return save_like_base(trainer.model.merge_and_unload(), staging, base_dir)
    return save_like_base(trainer.model, staging, base_dir, state)


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
    if settings.lora and not settings.merge:
        # A new adapter names one base directory; on top of another adapter that base would be wrong.
        require_full_model(model_info(model), "sft --lora --no-merge")
    sharding = launch_sharding()
    if sharding and settings.lora and settings.merge:
        raise CaitoolError(
            f"sft --lora cannot merge the adapter into weights sharded by {sharding}; "
            "pass --no-merge to save the adapter alone"
        )
    processes = current_processes()
    info, tokenizer, policy, device = load_policy(model, runtime.trust_remote_code)
    # How often a run saves does not change what it trains, so checkpoint_every is not in the key;
    # the number of processes does (each takes batch_size examples per step).
    run_key = {
        "input": file_sha256(input_path),
        "mix": file_sha256(mix) if mix is not None else None,
        "model": info.sha256,
        **settings.as_params(),
        "seed": runtime.seed,
        "processes": processes.count,
    }
    with atomic_model_dir(output_dir, processes) as staging:
        checkpoint = resume_checkpoint(staging, run_key, runtime.resume, processes)
        if checkpoint is not None:
            keep_log_until(staging / TRAINING_LOG, checkpoint_step(checkpoint), processes)
        resuming = checkpoint is not None
        trainer = build_trainer(
            policy, tokenizer, data, settings, runtime, staging, device, resuming, processes
        )
        result, seconds = train(trainer, settings, len(data.examples), checkpoint, processes)
        saved_dtype = save_trained(trainer, settings, staging, info.path, processes)
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
            params={
                **settings.as_params(),
                "seed": runtime.seed,
                "processes": processes.count,
                "checkpoint_every": runtime.checkpoint_every,
                "resumed_from": checkpoint,
            },
            started_at=started,
            models={"base": info},
            inputs=[input_path, *([mix] if mix is not None else [])],
            constitution=data.constitution,
            counts=counts,
        )
        if processes.is_main:
            tokenizer.save_pretrained(staging)
            write_model_manifest(staging, manifest)
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
