"""What the phases built on a TRL Trainer (sft, dpo, rloo, train-rm) set up and run alike: the
Trainer's arguments, its logging to training_log.jsonl in place of its printers, the policy it
starts from, caitool's progress while it trains, and the trained policy saved as asked.

:mod:`caitool.training` holds what every training phase, ppo's own loop included, shares: the
output directory, checkpoints and their run key, the logs and the manifest.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caitool.choices import VllmMode, check_choice
from caitool.errors import CaitoolError
from caitool.models import model_info, require_full_model
from caitool.processes import Processes, launch_sharding
from caitool.progress import phase_progress
from caitool.training import (
    TRAINING_LOG,
    continue_run,
    gathered_state_dict,
    jsonl_log_callback,
    lora_config,
    save_like_base,
)

if TYPE_CHECKING:
    from caitool.pipeline import Runtime


def trainer_arguments(runtime: Runtime, device: str) -> dict[str, Any]:
    """The TrainingArguments every caitool Trainer takes: seeded data order, a log entry every step
    (training_log.jsonl shows each), checkpoints every ``runtime.checkpoint_every`` steps of which
    only the last is kept (it is all a resumed run needs), and no reporting integration or tqdm bar
    (caitool prints its own progress)."""
    return {
        "seed": runtime.seed,
        "data_seed": runtime.seed,
        "logging_steps": 1,
        "save_strategy": "steps" if runtime.checkpoint_every else "no",
        "save_steps": runtime.checkpoint_every or 500,
        "save_total_limit": 1,
        "report_to": "none",
        "disable_tqdm": True,
        **cpu_training_kwargs(device),
    }


def check_vllm_rollout_options(config: Any) -> None:
    """The rollout options of an rloo or grpo config agree with each other; called when the config
    is made, so a wrong combination fails before any model is loaded."""
    check_choice("--vllm-mode", config.vllm_mode, VllmMode)
    if config.vllm_server_base_url and not config.use_vllm:
        raise CaitoolError("--vllm-server-base-url only applies with --use-vllm")
    if config.use_vllm and config.vllm_mode == "server" and not config.vllm_server_base_url:
        raise CaitoolError("--vllm-mode server needs --vllm-server-base-url (a 'trl vllm-serve' server)")


def vllm_rollout_arguments(config: Any, device: str) -> dict[str, Any]:
    """TRL's use_vllm arguments from an rloo or grpo config (``use_vllm``, ``vllm_mode``,
    ``vllm_server_base_url``, ``vllm_gpu_memory_utilization``); none when it does not ask for vLLM.

    vLLM must import here (checked now, one line if not, rather than deep inside TRL); on a CPU
    it gets caitool's CPU defaults (:func:`caitool.backends.vllm_engine.set_cpu_defaults`) and,
    colocated, weights that TRL's sync after each step can replace
    (:func:`caitool.backends.vllm_engine.keep_cpu_weights_loadable`)."""
    if not config.use_vllm:
        return {}
    from caitool.backends.vllm_engine import import_vllm, keep_cpu_weights_loadable, set_cpu_defaults

    import_vllm()
    if device == "cpu":
        set_cpu_defaults()
        if config.vllm_mode == "colocate":
            keep_cpu_weights_loadable()
    arguments: dict[str, Any] = {
        "use_vllm": True,
        "vllm_mode": config.vllm_mode,
        "vllm_gpu_memory_utilization": config.vllm_gpu_memory_utilization,
    }
    if config.vllm_server_base_url:
        arguments["vllm_server_base_url"] = config.vllm_server_base_url
    return arguments


def epoch_arguments(settings: Any, runtime: Runtime, output_dir: Path, device: str) -> dict[str, Any]:
    """:func:`trainer_arguments` and the epoch-based schedule sft and dpo share (``settings`` gives
    ``epochs``, ``lr``, ``batch_size``, ``grad_accum`` and ``max_length``)."""
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": settings.epochs,
        "learning_rate": settings.lr,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "max_length": settings.max_length,
        **trainer_arguments(runtime, device),
    }


def cpu_training_kwargs(device: str) -> dict[str, Any]:
    """TrainingArguments that keep a run quiet and correct: on CPU no bf16 and no checkpointing;
    under DDP no search for unused parameters (every trained weight takes part in every step)."""
    distributed = {"ddp_find_unused_parameters": False}
    if device.startswith("cuda"):
        import torch

        return {"bf16": torch.cuda.is_bf16_supported(), "use_cpu": False, **distributed}
    return {"use_cpu": True, "bf16": False, "fp16": False, checkpointing_argument(): False, **distributed}


def checkpointing_argument() -> str:
    """transformers 5.2x renamed ``gradient_checkpointing`` to ``activation_checkpointing``; vLLM's
    pins hold transformers below 5.20 (caitool[vllm]), so take whichever name is installed."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def quiet_trainer(trainer: Any, log: Any) -> Any:
    """``trainer`` with its printers replaced by ``log`` (a callback writing training_log.jsonl):
    they would put dicts on stdout and bars over caitool's one-line progress."""
    from transformers import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(log)
    return trainer


def policy_trainer(
    trainer_class: type,
    *,
    examples: list[dict[str, Any]],
    settings: Any,
    staging: Path,
    resuming: bool,
    processes: Processes,
    **arguments: Any,
) -> Any:
    """A TRL trainer of a policy on ``examples`` (LoRA adapters when ``settings.lora``), logging to
    ``training_log.jsonl`` (appended to when ``resuming``) instead of printing; ``arguments`` are
    the trainer's own (model, args, processing_class, ...)."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # TRL's dataset preparation bars would drown caitool's one-line progress
    trainer = trainer_class(
        train_dataset=Dataset.from_list(examples),
        peft_config=lora_config(settings.lora_rank) if settings.lora else None,
        **arguments,
    )
    return quiet_trainer(
        trainer, jsonl_log_callback(staging / TRAINING_LOG, append=resuming, processes=processes)
    )


def check_lora_saving(phase: str, model: str, settings: Any) -> None:
    """Refuse, before any model is loaded, a LoRA run whose result could not be saved as asked."""
    if settings.lora and not settings.merge:
        # A new adapter names one base directory; on top of another adapter that base would be wrong.
        require_full_model(model_info(model), f"{phase} --lora --no-merge")
    sharding = launch_sharding()
    if sharding and settings.lora and settings.merge:
        raise CaitoolError(
            f"{phase} --lora cannot merge the adapter into weights sharded by {sharding}; "
            "pass --no-merge to save the adapter alone"
        )


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


def progress_callback(tracker: Any) -> Any:
    """Advance caitool's stderr progress once per optimizer step (the Trainer's own printers are removed)."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            tracker.advance(1)

    return _Progress()


def train(
    trainer: Any,
    settings: Any,
    examples: int,
    checkpoint: str | None,
    processes: Processes,
    phase: str = "sft",
) -> tuple[Any, float]:
    """Run ``trainer`` (from ``checkpoint`` when resuming) with caitool's progress; ``settings``
    gives ``batch_size`` (per process), ``grad_accum`` and ``epochs``. Returns the Trainer's
    result and the seconds it took."""
    per_step = settings.batch_size * settings.grad_accum * processes.count
    steps = math.ceil(examples / per_step) * math.ceil(settings.epochs)
    started = time.perf_counter()
    with phase_progress(phase, steps) as tracker:
        trainer.add_callback(progress_callback(tracker))
        result = trainer.train(resume_from_checkpoint=checkpoint)
    return result, time.perf_counter() - started


def fit_policy(
    staging: Path,
    run_key: dict[str, Any],
    runtime: Runtime,
    processes: Processes,
    *,
    build: Any,
    settings: Any,
    base_path: str,
    phase: str,
    examples: int | None = None,
) -> tuple[Any, Any, float, str, str | None]:
    """The middle of an epoch-based policy run (sft, dpo) inside its staging directory: continue
    or start over, ``build(resuming)`` the Trainer, train it over ``examples`` (default: its
    dataset's rows) and save the policy as ``settings.lora``/``merge`` ask.

    Returns the trainer, its result, the seconds trained, the dtype saved and the checkpoint
    resumed from.
    """
    checkpoint = continue_run(staging, run_key, runtime, processes)
    trainer = build(checkpoint is not None)
    count = len(trainer.train_dataset) if examples is None else examples
    result, seconds = train(trainer, settings, count, checkpoint, processes, phase=phase)
    saved_dtype = save_trained(
        trainer, staging, base_path, processes, lora=settings.lora, merge=settings.merge
    )
    return trainer, result, seconds, saved_dtype, checkpoint


def save_trained(
    trainer: Any, staging: Path, base_dir: str, processes: Processes, *, lora: bool, merge: bool
) -> str:
    """Save a Trainer's policy (or, with ``lora`` and not ``merge``, the adapter alone) and return
    the dtype saved, or "adapter".

    Every process takes part in gathering the weights; the main process writes them.
    """
    state = gathered_state_dict(trainer.accelerator, trainer.model_wrapped)
    if not processes.is_main:
        return ""
    if lora and not merge:
        # A PeftModel saves only its adapter, which names the base directory it was trained on.
        trainer.model.save_pretrained(staging, state_dict=state)
        return "adapter"
    if lora:
        return save_like_base(trainer.model.merge_and_unload(), staging, base_dir)
    return save_like_base(trainer.model, staging, base_dir, state)
