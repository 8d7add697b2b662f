"""``caitool train-rm`` and reward scoring: a sequence-classification model with one output.

Training uses TRL's RewardTrainer with one change: the loss is the cross-entropy of
sigmoid(r_chosen - r_rejected) against the soft label ``p_chosen`` (``--soft``, default);
with hard labels (``--hard``, p = 1) that is exactly the Bradley-Terry loss TRL uses.

Texts are the chat-template rendering of prompt + response, tokenised by
:func:`encode_conversation` both in training and in :class:`RewardModel.score`, so the
reward read at scoring time is the one that was trained. A sequence-classification model
pools the last token that is not the pad token; when the pad token can end a real sequence
(many chat models pad with their end-of-turn token) the reward would be read one token too
early, so :func:`reward_pad_token` picks a pad token that never ends a rendered turn.

Other phases import :func:`load_reward_model` and call ``.score(prompts, responses)``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from caitool.errors import CaitoolError
from caitool.jsonl_io import read_records, write_json_atomic
from caitool.pipeline import Runtime, validate_input
from caitool.processes import current_processes, launch_sharding
from caitool.progress import print_summary
from caitool.provenance import build_manifest, now_iso
from caitool.records import Conversation, Message, PairRecord, parse_pair
from caitool.tokens import encode, encode_conversation, right_padded
from caitool.trainers import (
    quiet_trainer,
    trainer_arguments,
)
from caitool.training import (
    CHECKPOINTS,
    TRAINING_LOG,
    atomic_model_dir,
    continue_run,
    gathered_state_dict,
    jsonl_log_callback,
    lora_config,
    read_model_manifest,
    save_like_base,
    training_params,
    training_run_key,
    write_model_manifest,
)

METRICS_FILE = "metrics.json"
CALIBRATION_BINS = 10


# ---------------------------------------------------------------------------
# Encoding and the pad token


def _turn_ending_ids(tokenizer: Any) -> set[int]:
    """The tokens a rendered conversation ends with (after the response text)."""
    probe = encode_conversation(tokenizer, [Message(role="user", content="x")], "y")
    text_ids = set(encode(tokenizer, "y"))
    ending: set[int] = set()
    for token in reversed(probe):
        if token in text_ids:
            break
        ending.add(token)
    return ending or {probe[-1]}


def reward_pad_token(tokenizer: Any) -> str:
    """A pad token that never ends a rendered conversation, so pooling reads the real last token."""
    ending = _turn_ending_ids(tokenizer)
    candidates = [
        tokenizer.pad_token,
        tokenizer.unk_token,
        tokenizer.bos_token,
        *tokenizer.all_special_tokens,
    ]
    for token in candidates:
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id not in ending:
            return token
    raise CaitoolError(
        "the tokenizer has no special token that can pad without hiding the end of a turn; "
        "add a pad token to the model first"
    )


def prepare_reward_tokenizer(tokenizer: Any, model: Any) -> None:
    tokenizer.pad_token = reward_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id


# ---------------------------------------------------------------------------
# Scoring


class RewardModel:
    """A trained reward model: ``score(prompts, responses)`` gives one float per response.

    A text longer than ``max_length`` tokens (the longest ``train-rm`` trained on) is cut from the
    left: the reward is read at the last token, so the end of the response is what must stay, and
    a longer text would be scored where the model never learned to score. ``truncated`` counts them.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str,
        batch_size: int = 8,
        info: Any = None,
        max_length: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.info = info
        self.max_length = max_length
        self.truncated = 0

    def score(self, prompts: Sequence[Conversation], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError("score() needs one prompt per response")
        rows = [encode_conversation(self.tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
        return self.score_token_ids(rows)

    def score_token_ids(self, rows: Sequence[list[int]]) -> list[float]:
        import torch

        if self.max_length is not None:
            self.truncated += sum(len(row) > self.max_length for row in rows)
            rows = [row[-self.max_length :] for row in rows]
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            input_ids, mask = right_padded(batch, self.tokenizer.pad_token_id, self.device)
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores


def truncated_count(scorer: Any) -> int:
    """The texts ``scorer`` cut to its reward model's training length (0 for a scorer that cuts
    none, such as a scripted reward)."""
    return getattr(scorer, "truncated", 0)


def truncation_note(scorer: Any, count: int | None = None) -> str:
    """A clause for a phase's summary line on the ``count`` texts cut (default: the scorer's own),
    "" when none was."""
    count = truncated_count(scorer) if count is None else count
    if not count:
        return ""
    return (
        f"; {count} scored texts were longer than the reward model's {scorer.max_length} tokens "
        "and were cut from the left"
    )


def load_reward_model(
    directory: str | Path,
    *,
    device: str | None = None,
    batch_size: int = 8,
    trust_remote_code: bool = False,
    dtype: Any = None,
) -> RewardModel:
    """Load a reward model written by ``train-rm`` (or any one-output sequence classifier);
    ``dtype`` None keeps the precision it was saved in."""
    from caitool.models import (
        force_offline,
        load_tokenizer,
        model_info,
        pick_device,
        quiet_transformers,
        require_full_model,
    )

    info = model_info(str(directory))
    require_full_model(info, "a reward model")
    force_offline()
    quiet_transformers()
    from transformers import AutoModelForSequenceClassification

    device = pick_device(device)
    tokenizer = load_tokenizer(info.path, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        info.path, local_files_only=True, trust_remote_code=trust_remote_code, dtype=dtype or "auto"
    )
    if model.config.num_labels != 1:
        raise CaitoolError(
            f"{directory} is not a reward model (it has {model.config.num_labels} outputs, not 1)"
        )
    prepare_reward_tokenizer(tokenizer, model)
    model.to(device).eval()
    return RewardModel(
        model,
        tokenizer,
        device=device,
        batch_size=batch_size,
        info=info,
        max_length=trained_max_length(info.path),
    )


def trained_max_length(directory: str | Path) -> int | None:
    """The longest text (in tokens) ``train-rm`` trained the model in ``directory`` on, from its
    manifest (None for a model caitool did not train)."""
    manifest = read_model_manifest(directory)
    if manifest is None or manifest.get("phase") != "train-rm":
        return None
    return manifest["params"].get("max_length")


# ---------------------------------------------------------------------------
# Metrics


def preference_probability(reward_chosen: float, reward_rejected: float) -> float:
    """The reward model's P(chosen is better): sigmoid of the reward margin."""
    margin = reward_chosen - reward_rejected
    return 1.0 / (1.0 + math.exp(-margin)) if margin >= 0 else math.exp(margin) / (1.0 + math.exp(margin))


def calibration_table(predicted: Sequence[float], labelled: Sequence[float], bins: int = CALIBRATION_BINS):
    """Pairs grouped by predicted P(chosen), with the mean label in each group (well calibrated: equal)."""
    table = []
    for index in range(bins):
        low, high = index / bins, (index + 1) / bins
        members = [i for i, p in enumerate(predicted) if low <= p < high or (index == bins - 1 and p == 1.0)]
        if members:
            table.append(
                {
                    "bin": f"{low:.1f}-{high:.1f}",
                    "count": len(members),
                    "mean_predicted": sum(predicted[i] for i in members) / len(members),
                    "mean_label": sum(labelled[i] for i in members) / len(members),
                }
            )
    return table


def evaluate_pairs(reward_model: RewardModel, pairs: Sequence[PairRecord]) -> dict[str, Any]:
    """Held-out accuracy (reward of the side the label favours above the other's), log-loss
    against the labels, calibration."""
    if not pairs:
        return {"pairs": 0, "decided_pairs": 0, "accuracy": None, "log_loss": None, "calibration": []}
    prompts = [p.prompt for p in pairs]
    chosen = reward_model.score(prompts, [p.chosen[-1].content for p in pairs])
    rejected = reward_model.score(prompts, [p.rejected[-1].content for p in pairs])
    predicted = [preference_probability(c, r) for c, r in zip(chosen, rejected, strict=True)]
    labels = [p.p_chosen for p in pairs]
    eps = 1e-7
    log_loss = -sum(
        y * math.log(max(q, eps)) + (1 - y) * math.log(max(1 - q, eps))
        for q, y in zip(predicted, labels, strict=True)
    ) / len(pairs)
    # A pair labelled 0.5 (a tie) has no right answer: accuracy is over the decided pairs, each
    # judged by the side its label favours.
    decided = [(c > r) == (y > 0.5) for c, r, y in zip(chosen, rejected, labels, strict=True) if y != 0.5]
    return {
        "pairs": len(pairs),
        "decided_pairs": len(decided),
        "accuracy": sum(decided) / len(decided) if decided else None,
        "log_loss": log_loss,
        "mean_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(pairs),
        "calibration": calibration_table(predicted, labels),
    }


# ---------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class RewardTrainingConfig:
    """What train-rm trains on and how; the seed and checkpointing come with the shared Runtime."""

    soft: bool = True
    eval_fraction: float = 0.1
    epochs: float = 1.0
    lr: float = 1e-5
    lora: bool = False
    batch_size: int = 4
    max_length: int = 1024


def parse_preference(raw: dict[str, Any]) -> PairRecord:
    """Labelled pairs (``label-preferences``) and revision pairs (``pairs-from-revisions``) alike."""
    return parse_pair(raw)


def split_held_out(records: list[PairRecord], fraction: float, seed: int):
    """A fixed-seed split by prompt: every pair of one prompt is on the same side.

    Several pairs are often made for one prompt (every round of ``pairs-from-revisions --round
    all``, several samples of a prompt); split pair by pair, the held-out accuracy would be
    measured on prompts the model trained on. At least one prompt is on each side whenever a
    fraction is asked for.
    """
    if fraction <= 0.0:
        return records, []
    prompt_of = [prompt_key(r) for r in records]
    prompts = list(dict.fromkeys(prompt_of))
    if len(prompts) < 2:
        raise CaitoolError(
            f"--eval-fraction holds out whole prompts and needs pairs of at least 2 prompts, the input has "
            f"{len(prompts)} (use --eval-fraction 0 to train on every pair)"
        )
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: min(max(1, round(fraction * len(prompts))), len(prompts) - 1)])
    train = [r for r, key in zip(records, prompt_of, strict=True) if key not in held]
    return train, [r for r, key in zip(records, prompt_of, strict=True) if key in held]


def prompt_key(record: PairRecord) -> str:
    return json.dumps([(m.role, m.content) for m in record.prompt])


def tokenized_rows(tokenizer: Any, records: Sequence[PairRecord], soft: bool, max_length: int):
    rows = []
    for record in records:
        chosen = encode_conversation(tokenizer, record.prompt, record.chosen[-1].content)
        rejected = encode_conversation(tokenizer, record.prompt, record.rejected[-1].content)
        if max(len(chosen), len(rejected)) <= max_length:
            rows.append(
                {"chosen_ids": chosen, "rejected_ids": rejected, "p_chosen": record.p_chosen if soft else 1.0}
            )
    return rows


def soft_preference_loss(margin: Any, p_chosen: Any) -> Any:
    """Cross-entropy of sigmoid(margin) against the label; with p_chosen = 1 it is -log sigmoid(margin)."""
    import torch

    return torch.nn.functional.binary_cross_entropy_with_logits(margin, p_chosen.to(margin.dtype))


def soft_label_trainer_class():
    """TRL's RewardTrainer with the soft-label loss (built lazily: trl is imported only here)."""
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class SoftLabelCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            batch["p_chosen"] = torch.tensor([e["p_chosen"] for e in examples], dtype=torch.float)
            return batch

    class SoftLabelRewardTrainer(RewardTrainer):
        """Cross-entropy of sigmoid(r_chosen - r_rejected) against p_chosen; p = 1 is Bradley-Terry."""

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "p_chosen"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            labels = inputs.pop("p_chosen")
            outputs = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
            )
            rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            margin = rewards_chosen - rewards_rejected
            loss = soft_preference_loss(margin, labels)
            with torch.no_grad():
                # Over every process's pairs, so a multi-process run logs what one process would.
                margins = self.accelerator.gather_for_metrics(margin.detach())
                rewards = self.accelerator.gather_for_metrics(outputs.logits.detach())
                self._metrics[mode]["accuracy"].append((margins > 0).float().mean().item())
                self._metrics[mode]["margin"].append(margins.mean().item())
                self._metrics[mode]["mean_reward"].append(rewards.mean().item())
            return (loss, outputs) if return_outputs else loss

    return SoftLabelRewardTrainer, SoftLabelCollator


def load_reward_init(spec: str, *, lora: bool, seed: int, trust_remote_code: bool):
    """A one-output sequence classifier initialised from a causal LM (or reward model) directory.

    The new scalar head is drawn from ``seed``, so the same command trains the same model.
    """
    import torch

    from caitool.models import (
        force_offline,
        load_tokenizer,
        model_info,
        quiet_transformers,
        require_full_model,
    )

    info = model_info(spec)
    require_full_model(info, "train-rm --model")
    force_offline()
    quiet_transformers()
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    tokenizer = load_tokenizer(info.path, trust_remote_code=trust_remote_code)
    torch.manual_seed(seed)
    with suppress_seqcls_warning():
        # fp32 master weights whatever the base's precision (transformers 5 would load a bf16 base in
        # bf16, where Adam's updates round away); save_like_base writes the base's precision back.
        model = AutoModelForSequenceClassification.from_pretrained(
            info.path,
            num_labels=1,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            dtype=torch.float32,
        )
    prepare_reward_tokenizer(tokenizer, model)
    # The new scalar head is trained whole beside the adapters.
    peft_config = lora_config(16, "SEQ_CLS", modules_to_save=["score"]) if lora else None
    return model, tokenizer, info, peft_config


def reward_training_args(config: RewardTrainingConfig, runtime: Runtime, staging: Path, device: str) -> Any:
    from trl import RewardConfig

    return RewardConfig(
        output_dir=str(staging / CHECKPOINTS),
        num_train_epochs=config.epochs,
        learning_rate=config.lr,
        per_device_train_batch_size=config.batch_size,
        eval_strategy="no",
        max_length=None,  # tokenized_rows already dropped the pairs over --max-length
        disable_dropout=True,
        **trainer_arguments(runtime, device),
    )


def save_reward_model(
    trainer: Any, config: RewardTrainingConfig, tokenizer: Any, staging: Path, base_dir: str
) -> str:
    """Gather the trained weights (every process) and save them with the tokenizer (the main process)."""
    state = gathered_state_dict(trainer.accelerator, trainer.model_wrapped)
    if not trainer.accelerator.is_main_process:
        return ""
    trained = trainer.model.merge_and_unload() if config.lora else trainer.model
    trained.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.save_pretrained(staging)
    return save_like_base(trained, staging, base_dir, None if config.lora else state)


def run_train_rm(
    input_path: str | Path,
    output: str | Path,
    *,
    model: str = "default",
    config: RewardTrainingConfig | None = None,
    runtime: Runtime | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Train, save atomically (model, tokenizer, manifest, log, metrics.json) and return the metrics.

    With ``runtime.checkpoint_every`` the Trainer saves every N steps, and the same command run
    again after a kill continues from the last checkpoint (``runtime.resume``). Under ``torchrun``
    or ``accelerate launch`` each process trains on ``batch_size`` pairs of every step and the
    main process writes; the held-out metrics are those of the trained fp32 weights.
    """
    config = config or RewardTrainingConfig()
    runtime = runtime or Runtime()
    seed = runtime.seed
    started, clock = now_iso(), time.perf_counter()
    source = validate_input(input_path, parse_preference)
    records = list(read_records(source.path, parse_preference))
    train_records, held_out = split_held_out(records, config.eval_fraction, seed)

    from caitool.models import pick_device
    from caitool.training import check_output_dir

    check_output_dir(output)
    sharding = launch_sharding()
    if sharding and config.lora:
        raise CaitoolError(f"train-rm --lora cannot merge the adapter into weights sharded by {sharding}")
    processes = current_processes()
    device = pick_device(device)
    reward_init, tokenizer, info, peft_config = load_reward_init(
        model, lora=config.lora, seed=seed, trust_remote_code=runtime.trust_remote_code
    )
    rows = tokenized_rows(tokenizer, train_records, config.soft, config.max_length)
    if not rows:
        raise CaitoolError(f"no training pair is within --max-length {config.max_length} tokens")

    from datasets import Dataset

    trainer_class, collator_class = soft_label_trainer_class()
    run_key = training_run_key(
        input_path, {}, asdict(config), seed, model=info.sha256, processes=processes.count
    )
    with atomic_model_dir(output, processes) as staging:
        checkpoint = continue_run(staging, run_key, runtime, processes)
        log = jsonl_log_callback(staging / TRAINING_LOG, append=checkpoint is not None, processes=processes)
        trainer = trainer_class(
            model=reward_init,
            args=reward_training_args(config, runtime, staging, device),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            data_collator=collator_class(pad_token_id=tokenizer.pad_token_id),
            peft_config=peft_config,
        )
        quiet_trainer(trainer, log)
        trainer.train(resume_from_checkpoint=checkpoint)
        # Every process scores the held-out pairs through the prepared model (sharded weights are
        # gathered layer by layer as it runs); the main process writes what they agree on.
        scorer = RewardModel(
            trainer.model_wrapped.eval(),
            tokenizer,
            device=str(trainer.accelerator.device),
            max_length=config.max_length,
        )
        held_out_metrics = evaluate_pairs(scorer, held_out)
        saved_dtype = save_reward_model(trainer, config, tokenizer, staging, info.path)
        metrics = {
            "held_out": held_out_metrics,
            "train": {"pairs": len(rows), "skipped_too_long": len(train_records) - len(rows)},
            "labels": "soft" if config.soft else "hard",
            "saved_dtype": saved_dtype,
            "wall_seconds": round(time.perf_counter() - clock, 1),
        }
        if processes.is_main:
            write_json_atomic(staging / METRICS_FILE, metrics)
            write_model_manifest(
                staging,
                build_manifest(
                    phase="train-rm",
                    params=training_params(asdict(config), runtime, checkpoint, processes, device=device),
                    started_at=started,
                    models={"init": info},
                    inputs=[input_path],
                    counts={"pairs": len(records), "train": len(rows), "held_out": len(held_out)},
                ),
            )
    print_summary(_summary(metrics, output))
    return metrics


def _summary(metrics: dict[str, Any], output: str | Path) -> str:
    held = metrics["held_out"]
    parts = [
        f"train-rm: {metrics['train']['pairs']} training pairs ({metrics['labels']} labels) "
        f"in {metrics['wall_seconds']:.1f}s"
    ]
    if held["pairs"]:
        accuracy = "n/a" if held["accuracy"] is None else f"{held['accuracy']:.3f}"
        ties = held["pairs"] - held["decided_pairs"]
        parts.append(
            f"held-out accuracy {accuracy} on {held['decided_pairs']} pairs"
            + (f" ({ties} ties labelled 0.5 left out)" if ties else "")
            + f", log-loss {held['log_loss']:.3f}"
        )
        parts.append(
            "calibration (predicted -> labelled): "
            + ", ".join(
                f"{row['bin']}: {row['mean_predicted']:.2f} -> {row['mean_label']:.2f} (n={row['count']})"
                for row in held["calibration"]
            )
        )
    parts.append(f"saved to {output}")
    return "; ".join(parts)
