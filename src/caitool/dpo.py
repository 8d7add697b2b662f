"""``caitool dpo``: direct preference optimisation on labelled pairs, with no reward model and no rollouts.

TRL's DPOTrainer tokenises the pairs, holds the frozen reference (a copy of the starting
policy, the base weights under a LoRA adapter, or ``--ref``) and runs the loop. caitool adds
one thing: the soft labels. ``label-preferences`` gives every pair a probability ``p`` that
the chosen response is better, and with ``soft`` (the default) that probability is the target
of the loss, pair by pair:

    loss = -p log sigmoid(beta h) - (1 - p) log sigmoid(-beta h)
    h    = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))

This is conservative DPO (Mitchell 2023) with a per-pair label smoothing ``1 - p`` instead of
one constant for the whole set, and the same cross-entropy ``train-rm`` fits its reward
margin to (:func:`caitool.reward.soft_preference_loss`). Its gradient in ``h`` is
``beta (sigmoid(beta h) - p)``: a pair labelled 1 pushes the margin up without limit (plain
DPO), a pair labelled 0.7 until the policy prefers the chosen response with probability 0.7,
and a pair labelled 0.5 (the labeller could not tell the two apart) gives no gradient at all
while the policy agrees with the reference. ``hard`` trains with p = 1 through TRL's own loss,
which also offers the other DPO variants (``loss``: ipo, hinge, robust, ...).

The output is what ``sft`` writes: a Hugging Face model directory (or a LoRA adapter with
``merge=False``), ``caitool_manifest.json`` and ``training_log.jsonl``, built in
``.DIR.partial/`` and renamed into place; a killed run resumes from its last checkpoint.
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from caitool import trainers, training
from caitool.choices import DpoLoss, check_choice
from caitool.errors import CaitoolError
from caitool.jsonl_io import read_records
from caitool.models import model_info
from caitool.pipeline import Runtime, validate_input
from caitool.processes import Processes, current_processes
from caitool.progress import print_summary
from caitool.provenance import build_manifest, now_iso
from caitool.records import ConstitutionRef, PairRecord, parse_pair
from caitool.tokens import fitted_to_template

# The losses whose TRL implementation reads label_smoothing.
SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")
# A label this close to 0.5 says the labeller could not choose: such a pair carries no preference.
UNDECIDED = 0.005


@dataclass(frozen=True)
class DpoConfig:
    """What dpo trains and how; the seed and checkpointing come with the shared Runtime."""

    soft: bool = True  # each pair's p_chosen is its target (False: every pair surely preferred)
    beta: float = 0.1  # strength of the pull towards the reference
    loss: DpoLoss = "sigmoid"
    label_smoothing: float = 0.0  # --hard: robust's flip rate, exo_pair's epsilon (aot, aot_unpaired too)
    lora: bool = False
    lora_rank: int = 16
    merge: bool = True  # with lora: save the merged model (False: the adapter alone)
    epochs: float = 1.0
    lr: float = 1e-6
    batch_size: int = 4  # pairs per batch (per process when launched on several)
    grad_accum: int = 1
    max_length: int = 1024

    def __post_init__(self) -> None:
        check_choice("--loss", self.loss, DpoLoss)
        if self.soft and self.loss != "sigmoid":
            raise CaitoolError(
                f"soft labels are defined for the sigmoid (DPO) loss; train --loss {self.loss} with --hard"
            )
        if not self.merge and not self.lora:
            raise CaitoolError("--no-merge only applies to --lora (a full fine-tune has no adapter to keep)")
        self._check_label_smoothing()

    def _check_label_smoothing(self) -> None:
        """TRL reads ``label_smoothing`` in these losses alone; robust without it is plain DPO, and
        exo_pair needs it above 0 (its target distribution is (1 - eps, eps))."""
        smoothing = self.label_smoothing
        if self.loss not in SMOOTHED_LOSSES:
            if smoothing != 0.0:
                raise CaitoolError(
                    f"--label-smoothing has no effect on --loss {self.loss}; it applies to --hard with "
                    f"{', '.join(SMOOTHED_LOSSES)} (soft labels carry their own per pair)"
                )
            return
        if self.loss in ("robust", "exo_pair"):
            upper = 0.5 if self.loss == "robust" else 1.0
            if not 0.0 < smoothing < upper:
                raise CaitoolError(
                    f"--loss {self.loss} needs --label-smoothing above 0 and below {upper} (robust: the "
                    f"share of flipped labels, e.g. 0.1; exo_pair: EXO's epsilon, e.g. 0.001), "
                    f"got {smoothing}"
                )
        elif smoothing >= 0.5:
            raise CaitoolError(f"--loss {self.loss} needs --label-smoothing below 0.5, got {smoothing}")

    def as_params(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DpoData:
    examples: list[dict[str, Any]]
    counts: dict[str, Any] = field(default_factory=dict)
    constitution: ConstitutionRef | None = None


def dpo_example(record: PairRecord) -> dict[str, Any]:
    """TRL's conversational preference example, with the pair's label."""
    return {
        "prompt": [m.model_dump() for m in record.prompt],
        "chosen": [m.model_dump() for m in record.chosen],
        "rejected": [m.model_dump() for m in record.rejected],
        "p_chosen": record.p_chosen,
    }


def load_dpo_data(input_path: str | Path, seed: int) -> DpoData:
    """Read and check every pair (label-preferences or pairs-from-revisions output) before writing."""
    source = validate_input(input_path, parse_pair)
    records = list(read_records(source.path, source.parse))
    labels = [r.p_chosen for r in records]
    examples = [dpo_example(r) for r in records]
    random.Random(seed).shuffle(examples)
    counts = {
        "pairs": len(records),
        "kinds": dict(Counter(r.kind for r in records)),
        "mean_p_chosen": sum(labels) / len(labels),
        "undecided_pairs": sum(abs(p - 0.5) < UNDECIDED for p in labels),
    }
    return DpoData(examples=examples, counts=counts, constitution=getattr(records[0], "constitution", None))


def soft_label_dpo_trainer_class() -> tuple[type, type]:
    """TRL's DPOTrainer with each pair's p_chosen as its target (trl is imported only here)."""
    import torch
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from caitool.reward import soft_preference_loss

    class SoftLabelCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            batch["p_chosen"] = torch.tensor([e["p_chosen"] for e in examples], dtype=torch.float)
            return batch

    class SoftLabelDPOTrainer(DPOTrainer):
        """``soft``: the cross-entropy of sigmoid(beta h) against p_chosen; otherwise TRL's loss (p = 1)."""

        soft = True

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "p_chosen" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "p_chosen"]

        def _compute_loss(self, model, inputs, return_outputs):
            p_chosen = inputs.pop("p_chosen")
            if not self.soft:
                return super()._compute_loss(model, inputs, return_outputs)
            completion_mask = inputs["completion_mask"]
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            # A mixture-of-experts policy returns its router load-balancing loss when asked, which
            # TRL adds to its own losses (weighted by the architecture's coefficient): so does this one.
            router = {"output_router_logits": True} if self.aux_loss_enabled else {}
            outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                labels=labels,
                use_cache=False,
                fused_lm_head=True,
                **router,
            )
            logps = outputs.log_probs[:, -(completion_mask.size(1) - 1) :].sum(dim=1)
            chosen_logps, rejected_logps = logps.chunk(2, dim=0)
            reference = self.ref_model if self.ref_model is not None else self.model
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(reference, inputs)
            chosen_rewards = self.beta * (chosen_logps - ref_chosen_logps)
            rejected_rewards = self.beta * (rejected_logps - ref_rejected_logps)
            loss = soft_preference_loss(chosen_rewards - rejected_rewards, p_chosen)
            self._log_pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, p_chosen)
            if self.aux_loss_enabled:
                loss = loss + self.router_aux_loss_coef * outputs.aux_loss
                mode = "train" if self.model.training else "eval"
                aux = self.accelerator.gather_for_metrics(outputs.aux_loss.detach())
                self._metrics[mode]["aux_loss"].append(aux.mean().item())
            return (loss, outputs) if return_outputs else loss

        def _log_pair_metrics(self, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, p_chosen):
            """The implicit-reward figures TRL logs for its own losses, under the same names."""
            mode = "train" if self.model.training else "eval"
            gather = self.accelerator.gather
            chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
            metrics = self._metrics[mode]
            metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
            metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
            margins = gather(chosen_rewards - rejected_rewards)
            metrics["rewards/margins"].append(margins.mean().item())
            metrics["rewards/accuracies"].append((margins > 0).float().mean().item())
            metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
            metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
            metrics["labels/p_chosen"].append(gather(p_chosen).mean().item())

    return SoftLabelDPOTrainer, SoftLabelCollator


def dpo_config(settings: DpoConfig, runtime: Runtime, output_dir: Path, device: str) -> Any:
    from trl import DPOConfig

    return DPOConfig(
        **trainers.epoch_arguments(settings, runtime, output_dir, device),
        beta=settings.beta,
        loss_type=[settings.loss],
        label_smoothing=settings.label_smoothing,
    )


def load_reference(spec: str | None, policy: Any, settings: DpoConfig, trust_remote_code: bool):
    """The frozen reference and its info: ``spec``, else a copy of the starting policy.

    Under LoRA without ``spec`` there is no second model: TRL reads the reference by switching
    the adapter off, which is the starting policy.
    """
    if spec is None:
        return None, (None if settings.lora else copy.deepcopy(policy))
    import torch

    from caitool.models import load_full_causal_lm

    info = model_info(spec)
    ref = load_full_causal_lm(info.path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if ref.config.vocab_size != policy.config.vocab_size:
        raise CaitoolError(
            f"the reference {spec} has another vocabulary ({ref.config.vocab_size} tokens) than the policy "
            f"({policy.config.vocab_size}); it must share the policy's tokenizer"
        )
    return info, ref


def build_trainer(
    policy: Any,
    ref: Any,
    tokenizer: Any,
    data: DpoData,
    settings: DpoConfig,
    runtime: Runtime,
    staging: Path,
    device: str,
    resuming: bool,
    processes: Processes,
) -> Any:
    """DPOTrainer logging to ``training_log.jsonl``; caitool's progress replaces the Trainer's printers."""
    trainer_class, collator_class = soft_label_dpo_trainer_class()
    args = dpo_config(settings, runtime, staging / training.CHECKPOINTS, device)
    trainer = trainers.policy_trainer(
        trainer_class,
        model=policy,
        ref_model=ref,
        args=args,
        processing_class=tokenizer,
        data_collator=collator_class(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length),
        examples=data.examples,
        settings=settings,
        staging=staging,
        resuming=resuming,
        processes=processes,
    )
    trainer.soft = settings.soft
    return trainer


def run_dpo(
    input_path: str | Path,
    output_dir: str | Path,
    *,
    policy: str = "default",
    ref: str | None = None,
    config: DpoConfig | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Train on the pairs and publish ``output_dir``; returns the manifest written inside it.

    Under ``torchrun`` or ``accelerate launch`` every process runs this, as in sft: each takes
    ``batch_size`` pairs of every step, and the main process writes.
    """
    settings = config or DpoConfig()
    runtime = runtime or Runtime()
    started = now_iso()
    data = load_dpo_data(input_path, runtime.seed)
    training.check_output_dir(output_dir)
    trainers.check_lora_saving("dpo", policy, settings)
    processes = current_processes()
    info, tokenizer, policy_model, device = trainers.load_policy(policy, runtime.trust_remote_code)
    data.examples = [fitted_to_template(e, tokenizer) for e in data.examples]
    ref_info, ref_model = load_reference(ref, policy_model, settings, runtime.trust_remote_code)
    models = {"policy": info, **({"ref": ref_info} if ref_info is not None else {})}
    run_key = training.training_run_key(
        input_path, models, settings.as_params(), runtime.seed, processes=processes.count
    )
    with training.atomic_model_dir(output_dir, processes) as staging:
        trainer, result, seconds, saved_dtype, checkpoint = trainers.fit_policy(
            staging,
            run_key,
            runtime,
            processes,
            build=lambda resuming: build_trainer(
                policy_model,
                ref_model,
                tokenizer,
                data,
                settings,
                runtime,
                staging,
                device,
                resuming,
                processes,
            ),
            settings=settings,
            base_path=info.path,
            phase="dpo",
        )
        log = trainer.state.log_history
        counts = {
            **data.counts,
            "trained_pairs": len(trainer.train_dataset),
            "steps": result.global_step,
            "mean_train_loss": result.training_loss,
            "last_margin": next(
                (e["rewards/margins"] for e in reversed(log) if "rewards/margins" in e), None
            ),
            "train_seconds": round(seconds, 2),
            "saved_dtype": saved_dtype,
        }
        manifest = build_manifest(
            phase="dpo",
            params=training.training_params(
                settings.as_params(),
                runtime,
                checkpoint,
                processes,
                ref=ref or "the starting policy",
                device=device,
            ),
            started_at=started,
            models=models,
            inputs=[input_path],
            constitution=data.constitution,
            counts=counts,
        )
        training.publish_files(staging, tokenizer, manifest, processes)
    print_summary(_summary(output_dir, counts, settings))
    return manifest


def _summary(output_dir: str | Path, counts: dict[str, Any], settings: DpoConfig) -> str:
    margin = counts["last_margin"]
    return (
        f"dpo: {counts['trained_pairs']} pairs ({'soft' if settings.soft else 'hard'} labels, mean p_chosen "
        f"{counts['mean_p_chosen']:.3f}, {counts['undecided_pairs']} undecided) in {counts['steps']} steps, "
        f"{counts['train_seconds']:.1f}s; mean train loss {counts['mean_train_loss']:.4f}"
        + (f"; last reward margin {margin:+.4f}" if margin is not None else "")
        + f"; output: {output_dir}"
    )
