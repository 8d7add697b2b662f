"""What every training phase (sft, train-rm, ppo) shares: an output directory that appears
atomically, a JSONL training log, and the provenance manifest saved inside the model.

A run trains into ``.NAME.partial/`` beside the target and renames it into place only when
the model, tokenizer, manifest and log are all written, so a killed run never leaves a
directory that looks complete. The staging directory is kept after a kill so the same
command, run again, resumes from the last checkpoint it left there (``checkpoints/checkpoint-N``);
``run_key.json`` records what that run was, so a different command never resumes from it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from caitool.errors import CaitoolError
from caitool.jsonl_io import write_json_atomic
from caitool.provenance import MODEL_MANIFEST

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
def atomic_model_dir(out: str | Path) -> Iterator[Path]:
    """Yield a staging directory; on success it replaces ``out`` in one rename."""
    out = check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out)
    staging.mkdir(exist_ok=True)
    yield staging
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


def resume_checkpoint(staging: Path, run_key: dict[str, Any], resume: bool) -> str | None:
    """The latest checkpoint a killed run of the same command left in ``staging``, if any.

    Checkpoints of a different command (another ``run_key``) are refused rather than thrown
    away, since a mistyped option should not cost hours of training; ``resume=False``
    deletes them and starts over.
    """
    from transformers.trainer_utils import get_last_checkpoint

    key_file = staging / RUN_KEY
    checkpoints = staging / CHECKPOINTS
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.exists() else None
    if last is not None and resume:
        killed_key = json.loads(key_file.read_text()) if key_file.exists() else {}
        differing = sorted(k for k in {*killed_key, *run_key} if killed_key.get(k) != run_key.get(k))
        if differing:
            raise CaitoolError(
                f"{staging} holds {Path(last).name} of a killed run with other settings "
                f"({', '.join(differing)}); rerun that command to continue it, "
                "or pass --no-resume to discard it"
            )
    if not resume and checkpoints.exists():
        shutil.rmtree(checkpoints)
        last = None
    write_json_atomic(key_file, run_key)
    return last


def checkpoint_step(checkpoint: str | Path) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def keep_log_until(log_path: Path, step: int) -> list[dict[str, Any]]:
    """Drop entries a killed run logged after its last checkpoint (the resumed run redoes
    those steps) and return the entries kept."""
    if not log_path.exists():
        return []
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    kept = [e for e in entries if e.get("step", 0) <= step]
    log_path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept))
    return kept


HALF_PRECISION = ("bfloat16", "float16")


def config_dtype(model_dir: str | Path) -> str | None:
    """The dtype a model directory's config declares (None for adapter directories and old configs)."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.exists():
        return None
    config = json.loads(config_file.read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if isinstance(dtype, str) else None


def save_like_base(model: Any, directory: Path, base_dir: str | Path) -> str:
    """Save ``model`` in its base model's precision and return the dtype saved.

    Training keeps fp32 weights (the optimiser needs them); a bf16 or fp16 base is saved back in
    its own precision, so a fine-tuned 7B model is the size of its base, not twice that.
    """
    import torch

    base = config_dtype(base_dir)
    if base in HALF_PRECISION:
        model = model.to(getattr(torch, base))
    model.save_pretrained(directory)
    return str(model.dtype).removeprefix("torch.")


def lora_config(rank: int) -> Any:
    """LoRA on every linear layer of a causal LM (the output layer excepted), alpha twice the rank."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def save_policy(model: Any, directory: Path, base_dir: str | Path, *, lora: bool, merge: bool) -> str:
    """Save a trained policy and return what was saved: its dtype, or "adapter".

    A full fine-tune is saved in its base's precision; a LoRA run merged into full weights, or
    with ``merge=False`` as the adapter alone (a PeftModel saves only its adapter, which names
    the base directory it was trained on).
    """
    if lora and not merge:
        model.save_pretrained(directory)
        return "adapter"
    trained = model.merge_and_unload() if lora else model
    return save_like_base(trained, directory, base_dir)


def write_model_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(directory / MODEL_MANIFEST, manifest)


def read_model_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MODEL_MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


class JsonlLog:
    """Append-only JSONL log of training steps (one object per logged step)."""

    def __init__(self, path: Path, *, append: bool = False):
        self.path = path
        if not append:
            path.unlink(missing_ok=True)

    def write(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")


def jsonl_log_callback(path: Path, *, append: bool = False) -> Any:
    """A transformers TrainerCallback writing each ``on_log`` event to ``path`` as JSONL.

    ``append`` keeps the entries already there (a run resumed from a checkpoint).
    """
    from transformers import TrainerCallback

    log = JsonlLog(path, append=append)

    class _JsonlLogCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                log.write({"step": state.global_step, "epoch": state.epoch, **logs})

    return _JsonlLogCallback()


def cpu_training_kwargs(device: str) -> dict[str, Any]:
    """TrainingArguments that keep a CPU run quiet and correct (no bf16, no checkpointing)."""
    if device.startswith("cuda"):
        import torch

        return {"bf16": torch.cuda.is_bf16_supported(), "use_cpu": False}
    return {"use_cpu": True, "bf16": False, "fp16": False, "activation_checkpointing": False}
