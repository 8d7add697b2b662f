"""``caitool rloo``: REINFORCE leave-one-out against the reward model, with no value model.

TRL's RLOOTrainer samples ``k`` responses to every prompt, scores them, and uses the mean
score of a prompt's *other* responses as the baseline of each one (Ahmadian et al. 2024):
the critic PPO trains is replaced by the group itself, so one model fewer is held and trained.
caitool gives it the same reward ``ppo`` uses: the reward model's score of the chat rendering
of prompt + response (:meth:`caitool.reward.RewardModel.score`, the tokens ``train-rm``
trained on), less ``missing_eot_penalty`` for a response cut off before its end-of-turn
token. The KL to the frozen reference (the starting policy, ``--ref``, or the policy with its
new LoRA adapter off) is subtracted from that reward, summed over the response, with weight
``kl_coef``, as in PPO.

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
from caitool.records import Message, PromptRecord, parse_prompt_input
from caitool.tokens import fitted_to_template

SAMPLES_FILE = "samples.jsonl"
RECORD_PROMPT = "record_prompt"  # the dataset column with the prompt as the record has it

# TRL's log names -> the names ppo's training_log.jsonl uses for the same figures.
PPO_NAMES = {
    "reward": "score",
    "kl": "kl_per_token",
    "caitool/rm_score": "reward",
    "caitool/kl": "kl",
    "caitool/missing_eot": "missing_eot",
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
# The reward


@dataclass
class ScoredBatch:
    """The last batch the reward function scored, in TRL's order (each prompt's k samples together)."""

    ids: list[str]
    prompts: list[list[dict[str, str]]]
    responses: list[str]
    rm_scores: list[float]
    finished: list[bool]


class RewardFunction:
    """caitool's reward model as a TRL reward function: the score of prompt + response, less the
    missing-end-of-turn penalty for a response that never ended its turn."""

    def __init__(self, scorer: Any, stop_ids: list[int], missing_eot_penalty: float):
        self.scorer = scorer
        self.stop_ids = stop_ids
        self.missing_eot_penalty = missing_eot_penalty
        self.last: ScoredBatch | None = None  # what samples.jsonl shows
        self.__name__ = "reward_model"  # TRL names the reward's log entries after it

    def __call__(self, prompts, completions, completion_ids, log_metric=None, **columns) -> list[float]:
        # The record's own turns (the policy saw them fitted to its template): the reward model
        # renders them through its template, as in ppo.
        prompts = columns.get(RECORD_PROMPT, prompts)
        conversations = [[Message(**m) for m in prompt] for prompt in prompts]
        responses = [completion[-1]["content"].strip() for completion in completions]
        rm_scores = self.scorer.score(conversations, responses)
        stops = set(self.stop_ids)
        finished = [any(token in stops for token in ids) for ids in completion_ids]
        self.last = ScoredBatch(
            ids=[str(i) for i in columns.get("id", [""] * len(prompts))],
            prompts=prompts,
            responses=responses,
            rm_scores=rm_scores,
            finished=finished,
        )
        if log_metric is not None:
            log_metric("caitool/rm_score", sum(rm_scores) / len(rm_scores))
            log_metric("caitool/missing_eot", sum(not f for f in finished) / len(finished))
        return [
            s - (0.0 if done else self.missing_eot_penalty)
            for s, done in zip(rm_scores, finished, strict=True)
        ]


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
        on_rollout: Any = None  # called with (step, ScoredBatch, per-response KL or None)
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


def log_callback(log: training.JsonlLog, steps: int) -> Any:
    """Write each step's figures to training_log.jsonl under ppo's names, and a line to stderr."""
    from transformers import TrainerCallback

    class _RlooLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward" not in logs:
                return  # the Trainer's closing summary goes to the manifest
            entry = {"step": state.global_step, **{PPO_NAMES.get(k, k): v for k, v in logs.items()}}
            if entry.get("kl") is not None:
                entry["kl_penalty"] = -args.beta * entry["kl"]
            log.write(entry)
            print_summary(step_line(state.global_step, steps, entry))

    return _RlooLog()


def sample_writer(samples: training.JsonlLog, reward: RewardFunction, config: RlooConfig):
    """Write the rollouts of step 1, every ``sample_every`` steps and the last, as ppo does."""

    def write(step: int, kl: list[float] | None) -> None:
        if not (step == 1 or step % config.sample_every == 0 or step == config.steps):
            return
        batch = reward.last
        assert batch is not None  # TRL scores every rollout before it reports the KL
        for index, record_id in enumerate(batch.ids):
            samples.write(
                {
                    "step": step,
                    "id": record_id,
                    "sample": index % config.k,
                    "prompt": batch.prompts[index],
                    "response": batch.responses[index],
                    "reward": batch.rm_scores[index],
                    "finished": batch.finished[index],
                    "kl": None if kl is None else kl[index],
                }
            )

    return write


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
    reward_model: str,
    ref: str | None,
    config: RlooConfig,
    runtime: Runtime,
    staging: Path,
) -> tuple[Any, dict[str, Any], RewardFunction]:
    """The policy, its reference, the reward function and TRL's trainer around them."""
    from datasets import Dataset, disable_progress_bars

    from caitool.models import end_of_turn_ids
    from caitool.reward import load_reward_model
    from caitool.sampling import plain_generation_config

    infos = {"policy": model_info(policy), "reward": model_info(reward_model)}
    require_full_model(infos["reward"], "the reward model (--rm)")
    if is_adapter_dir(infos["policy"].path) and ref is None and not config.lora:
        # TRL would load the reference from the adapter's base, which is not the starting policy.
        raise CaitoolError(
            "rloo from a LoRA adapter policy needs --lora (the reference is then the policy with the new "
            "adapter off) or --ref with a merged copy of it"
        )
    trust_remote_code = runtime.trust_remote_code
    info, tokenizer, policy_model, device = trainers.load_policy(policy, trust_remote_code)
    infos.update(reference_source(policy_model, ref, config))
    scorer = load_reward_model(infos["reward"].path, device=device, trust_remote_code=trust_remote_code)
    reward = RewardFunction(scorer, end_of_turn_ids(tokenizer, policy_model), config.missing_eot_penalty)
    # TRL stops a response at the model's configured end-of-turn ids; ppo stops at every one caitool knows.
    saved_eos = policy_model.generation_config.eos_token_id
    policy_model.generation_config.eos_token_id = reward.stop_ids
    disable_progress_bars()
    trainer = rloo_trainer_class()(
        model=policy_model,
        reward_funcs=reward,
        args=rloo_config(config, runtime, staging / training.CHECKPOINTS, device),
        train_dataset=Dataset.from_list([rollout_example(r, tokenizer) for r in records]),
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
    trainer.on_rollout = sample_writer(training.JsonlLog(staging / SAMPLES_FILE, append=True), reward, config)
    return trainer, infos, reward


def rloo_run_key(
    input_path: str | Path, infos: dict[str, Any], config: RlooConfig, seed: int
) -> dict[str, Any]:
    """What a run trains on and with; how often it saves samples does not change what it trains."""
    settings = {k: v for k, v in asdict(config).items() if k != "sample_every"}
    return training.training_run_key(input_path, infos, settings, seed)


def run_rloo(
    input_path: str | Path,
    output: str | Path,
    *,
    policy: str,
    reward_model: str,
    ref: str | None = None,
    config: RlooConfig | None = None,
    runtime: Runtime | None = None,
) -> list[dict[str, Any]]:
    """Train and save the policy (model directory, manifest, log, samples); return the logged steps.

    One process, as ppo: the samples, the log and the reward are written as the rollouts come.
    """
    from caitool.reward import truncated_count, truncation_note

    config = config or RlooConfig()
    runtime = runtime or Runtime()
    if launched_world_size() > 1:
        raise CaitoolError(
            "rloo runs as one process, like ppo; start it without torchrun or accelerate launch"
        )
    started, clock = now_iso(), time.perf_counter()
    source = validate_input(input_path, parse_prompt_input)
    records = list(read_records(source.path, parse_prompt_input))
    training.check_output_dir(output)
    trainers.check_lora_saving("rloo", policy, config)
    with training.atomic_model_dir(output) as staging:
        trainer, infos, reward = build_trainer(
            records=records,
            policy=policy,
            reward_model=reward_model,
            ref=ref,
            config=config,
            runtime=runtime,
            staging=staging,
        )
        run_key = rloo_run_key(input_path, infos, config, runtime.seed)
        checkpoint = training.resume_checkpoint(staging, run_key, runtime.resume)
        done = training.checkpoint_step(checkpoint) if checkpoint else 0
        training.keep_log_until(staging / training.TRAINING_LOG, done)
        training.keep_log_until(staging / SAMPLES_FILE, done)
        if checkpoint:
            print_summary(f"rloo: resuming after step {done} from {checkpoint}")
        result = trainer.train(resume_from_checkpoint=checkpoint)
        history = [json.loads(line) for line in (staging / training.TRAINING_LOG).read_text().splitlines()]
        saved_dtype = trainers.save_trained(
            trainer, staging, infos["policy"].path, Processes(), lora=config.lora, merge=config.merge
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
