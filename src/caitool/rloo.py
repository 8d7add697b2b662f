"""``caitool rloo``: REINFORCE leave-one-out against the reward model, with no value model.

TRL's RLOOTrainer samples ``k`` responses to every prompt, scores them, and uses the mean
score of a prompt's *other* responses as the baseline of each one (Ahmadian et al. 2024):
the critic PPO trains is replaced by the group itself, so one model fewer is held and trained.
caitool gives it the same reward ``ppo`` uses: the reward model's score of the chat rendering
of prompt + response (:meth:`caitool.reward.RewardModel.score`, the tokens ``train-rm``
trained on), or any weighted sum of the reward sources of :mod:`caitool.rewards` (the
reward model, the constitution's judge, the refusal rule), less ``missing_eot_penalty`` for a
response cut off before its end-of-turn token. The KL to the frozen reference (the starting
policy, ``--ref``, or the policy with its new LoRA adapter off) is subtracted from that reward,
summed over the response, with weight ``kl_coef``, as in PPO.

The output directory matches ``ppo``'s: the policy as a Hugging Face model directory (or a
LoRA adapter), ``caitool_manifest.json``, ``training_log.jsonl`` with the same names for the
same figures (``reward`` the mean reward-model score, ``score`` the reward after the penalty,
``kl`` the summed log-ratio to the reference per response, ``entropy``, ``response_length``,
``missing_eot``, ``seconds``; TRL's own figures beside them) and ``samples.jsonl`` with
rollouts at step 1, every ``sample_every`` steps and at the end, so ``eval`` and ``report``
read it as they read a PPO run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from caitool import trainers, training
from caitool.errors import CaitoolError
from caitool.jsonl_io import read_records
from caitool.models import is_adapter_dir, model_info, require_full_model
from caitool.pipeline import Runtime, validate_input
from caitool.processes import Processes, launched_world_size
from caitool.progress import print_summary
from caitool.provenance import build_manifest, now_iso
from caitool.records import PromptRecord, parse_prompt_input
from caitool.rewards import RECORD_PROMPT, CombinedReward, RewardedBatch, RewardSpec
from caitool.tokens import fitted_to_template

SAMPLES_FILE = "samples.jsonl"

# TRL's log names -> the names ppo's training_log.jsonl uses for the same figures.
PPO_NAMES = {
    "reward": "score",
    "kl": "kl_per_token",
    "caitool/reward": "reward",  # the weighted sum of the reward sources (the RM score alone with --rm)
    "caitool/kl": "kl",
    "completions/mean_length": "response_length",
    "step_time": "seconds",
}


@dataclass(frozen=True)
class RlooConfig:
    """What rloo trains and how; the seed and checkpointing come with the shared Runtime."""

    kl_coef: float = 0.05  # weight of the KL to the reference, taken from the reward
    steps: int = 20  # one rollout batch each
    batch_size: int = 4  # prompts per step; each is sampled k times
    k: int = 2  # samples per prompt; each one's baseline is the others' mean
    response_length: int = 64  # tokens per response at most
    lr: float = 1e-6
    temperature: float = 0.7  # rollout sampling
    missing_eot_penalty: float = 1.0  # taken from the score of a response cut off before end-of-turn
    sample_every: int = 5  # steps between saved sample rollouts
    lora: bool = False  # the policy trains LoRA adapters; the reference is the policy with them off
    lora_rank: int = 16
    merge: bool = True  # with lora: save the merged model (False: the adapter alone)

    def __post_init__(self) -> None:
        if self.k < 2:
            raise CaitoolError("--k must be at least 2: each response's baseline is the mean of the others")
        if not self.merge and not self.lora:
            raise CaitoolError("--no-merge only applies to --lora (a full fine-tune has no adapter to keep)")


# ---------------------------------------------------------------------------
# The trainer


def rloo_trainer_class() -> type:
    """TRL's RLOOTrainer that also reports each response's KL to the reference (trl is imported only here).

    TRL computes the rollout's log-probabilities under the policy and then the reference, and
    subtracts their summed difference from the reward; it logs only the per-token mean. The
    two are kept here, so the per-response KL (ppo's ``kl``) and the samples come out exactly.
    """
    from trl import RLOOTrainer

    from caitool.sampling import only_this_config

    class CaitoolRLOOTrainer(RLOOTrainer):
        on_rollout: Any = None  # called with (step, per-response KL or None)
        rollout_generation: Any = None  # the policy's generation config while it samples
        _rollout_logps: list[Any] | None = None

        def _generate_single_turn(self, *args, **kwargs):
            # TRL sets temperature, top_p, top_k and repetition_penalty; transformers would fill
            # the rest (min_p, typical_p, no_repeat_ngram_size, a minimum length...) from the
            # model's generation config, and the rollout log-probs, softmax(logits / T), would
            # not be those of the distribution sampled.
            if self.rollout_generation is None:
                return super()._generate_single_turn(*args, **kwargs)
            with only_this_config(self.model, self.rollout_generation):
                return super()._generate_single_turn(*args, **kwargs)

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            if self._rollout_logps is not None:
                self._rollout_logps.append(result[0])
            return result

        def _generate_and_score_completions(self, inputs):
            self._rollout_logps = []
            try:
                output = super()._generate_and_score_completions(inputs)
            finally:
                captured, self._rollout_logps = self._rollout_logps, None
            mode = "train" if self.model.training else "eval"
            kl = None
            if self.beta != 0.0:
                if len(captured) != 2:
                    raise RuntimeError(
                        f"expected policy and reference log-probabilities, got {len(captured)} sets "
                        "(this TRL version computes its rollout differently)"
                    )
                policy_logps, ref_logps = captured
                kl = ((policy_logps - ref_logps) * output["completion_mask"]).sum(dim=1)
                self._metrics[mode]["caitool/kl"].append(self.accelerator.gather(kl).mean().item())
            if mode == "train" and self.on_rollout is not None:
                self.on_rollout(self.state.global_step + 1, None if kl is None else kl.tolist())
            return output

    return CaitoolRLOOTrainer


def rloo_config(config: RlooConfig, runtime: Runtime, output_dir: Path, device: str) -> Any:
    from trl import RLOOConfig

    return RLOOConfig(
        output_dir=str(output_dir),
        max_steps=config.steps,
        learning_rate=config.lr,
        lr_scheduler_type="constant",  # as ppo: every step moves the policy as much
        per_device_train_batch_size=config.batch_size * config.k,
        gradient_accumulation_steps=1,
        num_generations=config.k,
        max_completion_length=config.response_length,
        temperature=config.temperature,
        top_p=1.0,
        top_k=0,
        beta=config.kl_coef,
        num_iterations=1,
        disable_dropout=True,
        **trainers.trainer_arguments(runtime, device),
    )


def step_line(step: int, total: int, entry: dict[str, Any]) -> str:
    kl = entry.get("kl")
    return (
        f"rloo step {step}/{total}: reward {entry['reward']:+.3f}  "
        + (f"kl {kl:.4f}  " if kl is not None else "")
        + f"entropy {entry['entropy']:.3f}  loss {entry['loss']:+.4f}  "
        f"length {entry['response_length']:.1f}  no-eot {entry['missing_eot']:.2f}  {entry['seconds']:.1f}s"
    )


def log_name(trl_name: str, names: dict[str, str] = PPO_NAMES) -> str:
    """ppo's name for a figure, else caitool's own without its prefix (``caitool/judge_calls``)."""
    return names.get(trl_name, trl_name.removeprefix("caitool/"))


def log_entry(step: int, logs: dict[str, Any], beta: float) -> dict[str, Any]:
    entry = {"step": step, **{log_name(k): v for k, v in logs.items()}}
    if entry.get("kl") is not None:
        entry["kl_penalty"] = -beta * entry["kl"]
    return entry


def log_callback(log: training.JsonlLog, steps: int) -> Any:
    """Write each step's figures to training_log.jsonl under ppo's names, and a line to stderr."""
    from transformers import TrainerCallback

    class _RlooLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward" not in logs:
                return  # the Trainer's closing summary goes to the manifest
            entry = log_entry(state.global_step, logs, args.beta)
            log.write(entry)
            print_summary(step_line(state.global_step, steps, entry))

    return _RlooLog()


def write_samples(
    samples: training.JsonlLog, step: int, batch: RewardedBatch, kl: list[float] | None
) -> None:
    for index in range(len(batch.rollouts.responses)):
        samples.write({"step": step, **batch.sample_record(index), "kl": None if kl is None else kl[index]})


def sample_writer(samples: training.JsonlLog, reward: CombinedReward, sample_every: int, steps: int):
    """Write the rollouts of step 1, every ``sample_every`` steps and the last, as ppo does; and
    those of a step whose reward failed, whatever its number (the run stops there)."""

    def write(step: int, kl: list[float] | None) -> None:
        if not (step == 1 or step % sample_every == 0 or step == steps):
            return
        assert reward.last is not None  # TRL scores every rollout before it reports the KL
        write_samples(samples, step, reward.last, kl)

    reward.on_failure = lambda batch: write_samples(samples, batch.rollouts.step, batch, None)
    return write


def prompt_dataset(records: list[Any], tokenizer: Any) -> Any:
    """The prompts as TRL's dataset, fitted to the policy's template; the record's own turns and
    fields go along (the rewards read those; the rule reads ``set``)."""
    from datasets import Dataset

    rows = [rollout_example(r, tokenizer) for r in records]
    if any("set" in r.user_fields() for r in records):
        for row, record in zip(rows, records, strict=True):
            row["set"] = record.user_fields().get("set")
    return Dataset.from_list(rows)


def build_reward(
    rewards: RewardSpec,
    *,
    runtime: Runtime,
    device: str,
    policy_path: str,
    tokenizer: Any,
    policy_model: Any,
    group_size: int,
    missing_eot_penalty: float,
) -> tuple[CombinedReward, dict[str, Any], dict[str, Any] | None]:
    """The reward function of an online RL phase, the local models it reads and its judge."""
    from caitool.models import end_of_turn_ids
    from caitool.rewards import build_sources

    sources, infos, judge = build_sources(
        rewards,
        seed=runtime.seed,
        device=device,
        policy_path=policy_path,
        live_policy=(policy_model, tokenizer, device),
        trust_remote_code=runtime.trust_remote_code,
    )
    reward = CombinedReward(
        sources,
        stop_ids=end_of_turn_ids(tokenizer, policy_model),
        missing_eot_penalty=missing_eot_penalty,
        group_size=group_size,
    )
    return reward, infos, judge


# ---------------------------------------------------------------------------
# Loading and the rloo phase


def reference_source(policy: Any, ref: str | None, config: RlooConfig) -> dict[str, Any]:
    """Point TRL at the reference: it loads it from the policy config's ``_name_or_path``.

    Under LoRA TRL switches the new adapter off instead, which is the starting policy.
    """
    if config.lora:
        if ref is not None:
            raise CaitoolError(
                "--ref cannot be used with --lora: the reference is the policy with its adapter off"
            )
        return {}
    if ref is None:
        return {}
    info = model_info(ref)
    require_full_model(info, "rloo --ref")
    policy.config._name_or_path = info.path
    return {"ref": info}


def rollout_example(record: PromptRecord, tokenizer: Any) -> dict[str, Any]:
    """TRL's prompt, fitted to the policy's chat template, beside the record's own turns."""
    turns = [m.model_dump() for m in record.prompt]
    return {**fitted_to_template({"prompt": turns}, tokenizer), RECORD_PROMPT: turns, "id": record.id}


def build_trainer(
    *,
    records: list[Any],
    policy: str,
    rewards: RewardSpec,
    ref: str | None,
    config: RlooConfig,
    runtime: Runtime,
    staging: Path,
) -> tuple[Any, dict[str, Any], CombinedReward]:
    """The policy, its reference, the reward function and TRL's trainer around them."""
    from datasets import disable_progress_bars

    from caitool.sampling import plain_generation_config

    infos = {"policy": model_info(policy)}
    if is_adapter_dir(infos["policy"].path) and ref is None and not config.lora:
        # TRL would load the reference from the adapter's base, which is not the starting policy.
        raise CaitoolError(
            "rloo from a LoRA adapter policy needs --lora (the reference is then the policy with the new "
            "adapter off) or --ref with a merged copy of it"
        )
    trust_remote_code = runtime.trust_remote_code
    info, tokenizer, policy_model, device = trainers.load_policy(policy, trust_remote_code)
    infos.update(reference_source(policy_model, ref, config))
    reward, reward_infos, judge = build_reward(
        rewards,
        runtime=runtime,
        device=device,
        policy_path=info.path,
        tokenizer=tokenizer,
        policy_model=policy_model,
        group_size=config.k,
        missing_eot_penalty=config.missing_eot_penalty,
    )
    infos.update(reward_infos)
    reward.judge_description = judge
    # TRL stops a response at the model's configured end-of-turn ids; ppo stops at every one caitool knows.
    saved_eos = policy_model.generation_config.eos_token_id
    policy_model.generation_config.eos_token_id = reward.stop_ids
    disable_progress_bars()
    trainer = rloo_trainer_class()(
        model=policy_model,
        reward_funcs=reward,
        args=rloo_config(config, runtime, staging / training.CHECKPOINTS, device),
        train_dataset=prompt_dataset(records, tokenizer),
        processing_class=tokenizer,
        peft_config=training.lora_config(config.lora_rank) if config.lora else None,
    )
    policy_model.generation_config.eos_token_id = saved_eos  # the saved model keeps its own
    trainer.rollout_generation = plain_generation_config(
        policy_model,
        temperature=config.temperature,
        max_new_tokens=config.response_length,
        eos_token_id=reward.stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    policy_model.config._name_or_path = info.path
    trainers.quiet_trainer(
        trainer, log_callback(training.JsonlLog(staging / training.TRAINING_LOG, append=True), config.steps)
    )
    samples = training.JsonlLog(staging / SAMPLES_FILE, append=True)
    trainer.on_rollout = sample_writer(samples, reward, config.sample_every, config.steps)
    return trainer, infos, reward


def rloo_run_key(
    input_path: str | Path, infos: dict[str, Any], config: Any, seed: int, rewards: RewardSpec | None = None
) -> dict[str, Any]:
    """What a run trains on and with; how often it saves samples does not change what it trains."""
    settings = {k: v for k, v in asdict(config).items() if k != "sample_every"}
    if rewards is not None:
        settings["rewards"] = rewards.settings()
    return training.training_run_key(input_path, infos, settings, seed)


def train_and_save(
    phase: str,
    trainer: Any,
    staging: Path,
    input_path: str | Path,
    infos: dict[str, Any],
    config: Any,
    runtime: Runtime,
    rewards: RewardSpec,
) -> tuple[str | None, Any, list[dict[str, Any]], Any]:
    """Train from the last checkpoint of the same run (if any) and save the policy; shared by rloo
    and grpo. Returns the checkpoint resumed from, TRL's result, the logged steps and the saved dtype."""
    run_key = rloo_run_key(input_path, infos, config, runtime.seed, rewards)
    checkpoint = training.resume_checkpoint(staging, run_key, runtime.resume)
    done = training.checkpoint_step(checkpoint) if checkpoint else 0
    training.keep_log_until(staging / training.TRAINING_LOG, done)
    training.keep_log_until(staging / SAMPLES_FILE, done)
    if checkpoint:
        print_summary(f"{phase}: resuming after step {done} from {checkpoint}")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    history = [json.loads(line) for line in (staging / training.TRAINING_LOG).read_text().splitlines()]
    saved_dtype = trainers.save_trained(
        trainer, staging, infos["policy"].path, Processes(), lora=config.lora, merge=config.merge
    )
    return checkpoint, result, history, saved_dtype


def run_rloo(
    input_path: str | Path,
    output: str | Path,
    *,
    policy: str,
    reward_model: str | None = None,
    ref: str | None = None,
    config: RlooConfig | None = None,
    runtime: Runtime | None = None,
    rewards: RewardSpec | None = None,
) -> list[dict[str, Any]]:
    """Train and save the policy (model directory, manifest, log, samples); return the logged steps.

    The reward is ``rewards`` (any weighted sum of sources), or the reward model ``reward_model``.
    One process, as ppo: the samples, the log and the reward are written as the rollouts come.
    """
    from caitool.reward import truncated_count, truncation_note
    from caitool.rewards import check_judge_spec, check_rule_fields

    config = config or RlooConfig()
    runtime = runtime or Runtime()
    rewards = rewards or RewardSpec(rm=reward_model)
    if launched_world_size() > 1:
        raise CaitoolError(
            "rloo runs as one process, like ppo; start it without torchrun or accelerate launch"
        )
    started, clock = now_iso(), time.perf_counter()
    source = validate_input(input_path, parse_prompt_input)
    records = list(read_records(source.path, parse_prompt_input))
    check_rule_fields(rewards, records)
    check_judge_spec(rewards)
    training.check_output_dir(output)
    trainers.check_lora_saving("rloo", policy, config)
    with training.atomic_model_dir(output) as staging:
        trainer, infos, reward = build_trainer(
            records=records,
            policy=policy,
            rewards=rewards,
            ref=ref,
            config=config,
            runtime=runtime,
            staging=staging,
        )
        checkpoint, result, history, saved_dtype = train_and_save(
            "rloo", trainer, staging, input_path, infos, config, runtime, rewards
        )
        trainer.processing_class.save_pretrained(staging)
        training.write_model_manifest(
            staging,
            build_manifest(
                phase="rloo",
                params=training.training_params(
                    asdict(config),
                    runtime,
                    checkpoint,
                    ref=ref or "the starting policy",
                    device=str(trainer.accelerator.device),
                    rewards=rewards.settings(),
                    judge=reward.judge_description,
                ),
                started_at=started,
                models=infos,
                inputs=[input_path],
                counts={
                    "prompts": len(records),
                    "steps": result.global_step,
                    "samples_per_step": config.batch_size * config.k,
                    **training.reward_trend(history),
                    "train_seconds": round(time.perf_counter() - clock, 2),
                    "saved_dtype": saved_dtype,
                    "rm_truncated": truncated_count(reward.scorer),
                },
            ),
        )
    last_kl = history[-1].get("kl")
    print_summary(
        f"rloo: {result.global_step} steps of {config.batch_size} prompts x {config.k} samples; reward "
        f"{history[0]['reward']:+.3f} -> {history[-1]['reward']:+.3f}"
        + (f"; kl {last_kl:.4f}" if last_kl is not None else "")
        + truncation_note(reward.scorer)
        + f"; saved to {output}"
    )
    return history
