"""What every training phase (sft, train-rm, ppo, dpo, rloo) shares: an output directory that appears
atomically, a JSONL training log, and the provenance manifest saved inside the model.

A run trains into ``.NAME.partial/`` beside the target and renames it into place only when
the model, tokenizer, manifest and log are all written, so a killed run never leaves a
directory that looks complete. The staging directory is kept after a kill so the same
command, run again, resumes from the last checkpoint it left there (``checkpoints/checkpoint-N``);
``run_key.json`` records what that run was, so a different command never resumes from it.

Under a multi-process launch (:mod:`caitool.processes`) every process runs these functions;
the main process alone creates, writes, deletes and renames, and the others wait at a barrier
wherever they go on to read what it wrote. Weights are taken through the accelerator's state
dict, which gathers DeepSpeed ZeRO-3 and FSDP shards, and saved by the main process.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caitool.errors import CaitoolError
from caitool.jsonl_io import write_json_atomic
from caitool.processes import Processes
from caitool.provenance import MODEL_MANIFEST, file_sha256
from caitool.run_key import KeyFile, differing_settings

if TYPE_CHECKING:
    from caitool.pipeline import Runtime

TRAINING_LOG = "training_log.jsonl"
CHECKPOINTS = "checkpoints"
RUN_KEY = "run_key.json"


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def check_output_dir(out: str | Path) -> Path:
    """Refuse to replace a directory caitool did not write (nothing the user gave is lost)."""
    out = Path(out)
    if out.exists() and not (out / MODEL_MANIFEST).exists():
        if not out.is_dir() or any(out.iterdir()):
            raise CaitoolError(f"{out} exists and is not a caitool model directory; choose another -o")
    return out


@contextmanager
def atomic_model_dir(out: str | Path, processes: Processes | None = None) -> Iterator[Path]:
    """Yield a staging directory; on success it replaces ``out`` in one rename.

    Every process enters and leaves together: the staging directory exists before any process
    uses it, and ``out`` is in place (renamed by the main process once every process has finished
    writing into the staging directory) before any returns.
    """
    processes = processes or Processes()
    out = check_output_dir(out)
    staging = staging_dir(out)
    if processes.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir(exist_ok=True)
    processes.wait()
    yield staging
    processes.wait()
    if processes.is_main:
        publish(staging, out)
    processes.wait()


def publish(staging: Path, out: Path) -> None:
    if not (staging / MODEL_MANIFEST).exists():
        raise CaitoolError(f"internal error: {staging} has no {MODEL_MANIFEST}; not publishing it")
    shutil.rmtree(staging / CHECKPOINTS, ignore_errors=True)
    (staging / RUN_KEY).unlink(missing_ok=True)
    if out.exists():
        retired = out.parent / f".{out.name}.old"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(out, retired)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)


def resume_checkpoint(
    staging: Path, run_key: dict[str, Any], resume: bool, processes: Processes | None = None
) -> str | None:
    """The latest checkpoint a killed run of the same command left in ``staging``, if any.

    Checkpoints of a different command (another ``run_key``) are refused rather than thrown
    away, since a mistyped option should not cost hours of training; ``resume=False``
    deletes them and starts over. Every process reads the same files and so comes to the
    same answer before the main process changes anything.
    """
    from transformers.trainer_utils import get_last_checkpoint

    processes = processes or Processes()
    key_file = KeyFile(staging / RUN_KEY)
    checkpoints = staging / CHECKPOINTS
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.exists() else None
    if last is not None and resume:
        # A checkpoint without a key cannot be told apart from another command's: refused too.
        differing = differing_settings(key_file.read() or {}, run_key)
        if differing:
            raise CaitoolError(
                f"{staging} holds {Path(last).name} of a killed run with other settings "
                f"({', '.join(differing)}); rerun that command to continue it, "
                "or pass --no-resume to discard it"
            )
    if not resume:
        last = None
    processes.wait()
    if processes.is_main:
        if not resume and checkpoints.exists():
            shutil.rmtree(checkpoints)
        key_file.write(run_key)
    processes.wait()
    return last


def checkpoint_step(checkpoint: str | Path) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def keep_log_until(log_path: Path, step: int, processes: Processes | None = None) -> list[dict[str, Any]]:
    """Drop entries a killed run logged after its last checkpoint (the resumed run redoes
    those steps) and return the entries kept (to every process; the main one rewrites the log)."""
    processes = processes or Processes()
    entries = (
        [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        if log_path.exists()
        else []
    )
    kept = [e for e in entries if e.get("step", 0) <= step]
    processes.wait()
    if processes.is_main and log_path.exists():
        log_path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept))
    return kept


HALF_PRECISION = ("bfloat16", "float16")


def config_dtype(model_dir: str | Path) -> str | None:
    """The dtype a model directory's config declares (for a LoRA adapter directory, its base's;
    None for old configs)."""
    from caitool.models import adapter_base, is_adapter_dir

    if is_adapter_dir(model_dir):
        # The adapter's own directory has no config.json: a merged model is its base's weights.
        model_dir = adapter_base(model_dir)
    config_file = Path(model_dir) / "config.json"
    if not config_file.exists():
        return None
    config = json.loads(config_file.read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if isinstance(dtype, str) else None


def save_like_base(
    model: Any, directory: Path, base_dir: str | Path, state_dict: dict[str, Any] | None = None
) -> str:
    """Save ``model`` (or the full ``state_dict`` gathered for it) in its base model's precision
    and return the dtype saved.

    Training keeps fp32 weights (the optimiser needs them); a bf16 or fp16 base is saved back in
    its own precision, so a fine-tuned 7B model is the size of its base, not twice that. Weights
    gathered in 16 bits (DeepSpeed ZeRO-3) stay in 16 bits.
    """
    import torch

    state = model.state_dict() if state_dict is None else state_dict
    base = config_dtype(base_dir)
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    dtype = getattr(torch, base) if base in HALF_PRECISION else (floating[0] if floating else model.dtype)
    state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    model.to(dtype)  # save_pretrained writes the model's own dtype into config.json
    save_keeping_generation_config(model, directory, state)
    return str(dtype).removeprefix("torch.")


def save_keeping_generation_config(model: Any, directory: Path, state: dict[str, Any]) -> None:
    """``model.save_pretrained``, with the base's generation config written back as it was.

    transformers before 5.2x refuses to save a generation config that its strict validation
    flags (``min_p`` without ``do_sample``, as some checkpoints ship), though it loads one; the
    trained model would then not be saved at all. It is the user's config: keep it unchanged."""
    generation = getattr(model, "generation_config", None)
    if generation is None or _saves_as_is(generation):
        model.save_pretrained(directory, state_dict=state)
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig()
    try:
        model.save_pretrained(directory, state_dict=state)
    finally:
        model.generation_config = generation
    generation.to_json_file(Path(directory) / "generation_config.json", use_diff=True)


def _saves_as_is(generation: Any) -> bool:
    try:
        generation.validate(strict=True)
    except ValueError:
        return False
    return True


def gathered_state_dict(accelerator: Any, prepared: Any) -> dict[str, Any]:
    """The full weights of a model prepared by ``accelerator`` (DeepSpeed ZeRO-3 and FSDP shards
    gathered). A collective: every process calls it; only the main process's copy is used."""
    return accelerator.get_state_dict(prepared)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    import ctypes

    return ctypes.CDLL(None).malloc_trim


def release_freed_memory() -> None:
    """Give the pages of memory freed by torch back to the system (glibc only; elsewhere nothing).

    glibc keeps blocks below its mmap threshold, which it raises to 32 MB as large blocks are
    freed, in its heap, and a freed block is reused only by one that fits it. Phases of a training
    step (sampling, scoring, forward and backward passes) allocate tensors of different shapes, so
    the holes one phase leaves are not what the next one asks for, and the resident size grows by
    them (the demo's ppo step on the default model, probed per phase: 2.4 GB in its first step,
    2.9 GB by its third). ``malloc_trim`` returns every free page, so a phase starts from its live
    tensors.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def lora_config(rank: int, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None) -> Any:
    """LoRA on every linear layer (a causal LM's output layer excepted), alpha twice the rank."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def write_model_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(directory / MODEL_MANIFEST, manifest)


def read_model_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MODEL_MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


class JsonlLog:
    """Append-only JSONL log of training steps (one object per logged step).

    ``enabled=False`` (every process but the main one) writes nothing.
    """

    def __init__(self, path: Path, *, append: bool = False, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if enabled and not append:
            path.unlink(missing_ok=True)

    def write(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")


def jsonl_log_callback(path: Path, *, append: bool = False, processes: Processes | None = None) -> Any:
    """A transformers TrainerCallback writing each ``on_log`` event to ``path`` as JSONL.

    ``append`` keeps the entries already there (a run resumed from a checkpoint). The Trainer
    logs on every process, with the loss already averaged over them; the main process writes.
    """
    from transformers import TrainerCallback

    log = JsonlLog(path, append=append, enabled=(processes or Processes()).is_main)

    class _JsonlLogCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                log.write({"step": state.global_step, "epoch": state.epoch, **logs})

    return _JsonlLogCallback()


# ---------------------------------------------------------------------------
# The run key, manifest and files every training phase writes alike


def training_run_key(
    input_path: str | Path, models: dict[str, Any], settings: dict[str, Any], seed: int, **extra: Any
) -> dict[str, Any]:
    """What a run trains on and with (a checkpoint is reused only under the same key): the input,
    each model's weights as ``ROLE_sha256``, the settings that shape the result, the seed and
    ``extra``. How often a run saves is left out: it does not change what the run trains."""
    return {
        "input": file_sha256(input_path),
        **{f"{role}_sha256": info.sha256 for role, info in sorted(models.items())},
        **settings,
        "seed": seed,
        **extra,
    }


def continue_run(
    staging: Path, run_key: dict[str, Any], runtime: Runtime, processes: Processes | None = None
) -> str | None:
    """:func:`resume_checkpoint`, with training_log.jsonl cut back to the checkpoint's step."""
    checkpoint = resume_checkpoint(staging, run_key, runtime.resume, processes)
    if checkpoint is not None:
        keep_log_until(staging / TRAINING_LOG, checkpoint_step(checkpoint), processes)
    return checkpoint


def training_params(
    settings: dict[str, Any],
    runtime: Runtime,
    checkpoint: str | None,
    processes: Processes | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A training manifest's params: the settings, the shared runtime's (with checkpoint_every,
    which the run key leaves out), ``extra`` and the checkpoint the run resumed from."""
    counted = {} if processes is None else {"processes": processes.count}
    return {
        **settings,
        "seed": runtime.seed,
        **counted,
        "checkpoint_every": runtime.checkpoint_every,
        **extra,
        "resumed_from": checkpoint,
    }


def reward_trend(history: list[dict[str, Any]]) -> dict[str, float]:
    """The mean reward of the first and the last logged step of an RL run (ppo, rloo): whether
    training moved the reward at all, read at a glance in the manifest."""
    return {"first_reward": history[0]["reward"], "last_reward": history[-1]["reward"]}


def publish_files(staging: Path, tokenizer: Any, manifest: dict[str, Any], processes: Processes) -> None:
    """The tokenizer and manifest beside the saved weights, written by the main process."""
    if processes.is_main:
        tokenizer.save_pretrained(staging)
        write_model_manifest(staging, manifest)
