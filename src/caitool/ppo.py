"""``caitool ppo``: PPO against a reward model with a per-token KL penalty to a frozen reference.

TRL 1.16 no longer ships PPO, so this is a compact implementation on torch, following the
RLHF recipe (Ziegler et al. 2019; Ouyang et al. 2022) that Constitutional AI's RL phase uses.
One step:

1. **Rollout.** Sample one response per prompt from the policy, exactly from
   softmax(logits / temperature) whatever the model's generation config adds
   (:mod:`caitool.sampling`), left-padded prompts; a response ends at the first end-of-turn token.
2. **Score.** The reward model scores prompt + response (the chat rendering it was trained
   on); a response cut off at ``response_length`` loses ``missing_eot_penalty``.
3. **Per-token rewards.** ``-kl_coef * (log pi(a) - log pi_ref(a))`` at every response token,
   plus the score at the last one.
4. **Advantages.** Generalised advantage estimation (``gamma``, ``lam``) against the value
   model's estimates, whitened over the batch's response tokens.
5. **Update.** ``ppo_epochs`` passes over ``mini_batches`` mini-batches: clipped policy loss,
   clipped value loss, one optimiser over the trained weights of policy and value model. A
   mini-batch is run ``forward_batch_size`` sequences at a time with its gradients accumulated,
   the same update as in one pass; the rollout's passes are split the same way.

Under ``torchrun`` or ``accelerate launch`` (DDP) each process rolls out ``batch_size`` prompts
of the step's global batch; whitening, the losses' normalisation and the logged metrics are
taken over every process's rows, so N processes with b prompts each take the step one process
with N*b prompts takes (exactly so with one mini-batch).

Which models play which role, in which precision, and how LoRA and the shared value model save
memory is :mod:`caitool.ppo_models`; this module holds the algorithm and the run.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from caitool.backends import derive_seed
from caitool.errors import CaitoolError
from caitool.jsonl_io import read_records
from caitool.pipeline import Runtime, validate_input
from caitool.ppo_config import PPOConfig
from caitool.ppo_models import (
    PPOModels,
    classifier_of,
    inference,
    keep_trainable_weights,
    reference_of,
    save_policy,
)
from caitool.processes import Processes, current_processes, launch_sharding
from caitool.progress import print_summary
from caitool.provenance import build_manifest, now_iso
from caitool.records import Conversation, PromptRecord, parse_prompt_input
from caitool.reward import truncated_count, truncation_note
from caitool.sampling import plain_generation_config, sample
from caitool.tokens import cut_at_stop, decode, encode, left_padded, render_chat
from caitool.training import (
    CHECKPOINTS,
    TRAINING_LOG,
    JsonlLog,
    atomic_model_dir,
    check_output_dir,
    checkpoint_step,
    gathered_state_dict,
    keep_log_until,
    release_freed_memory,
    resume_checkpoint,
    reward_trend,
    training_params,
    training_run_key,
    write_model_manifest,
)

SAMPLES_FILE = "samples.jsonl"


# ---------------------------------------------------------------------------
# Tensor helpers


def one_process(tensor: Any) -> Any:
    """The sum of ``tensor`` over the processes of a single-process run: itself."""
    return tensor


def masked_mean(values: Any, mask: Any, total: Callable[[Any], Any] = one_process) -> Any:
    """The mean over ``mask``; ``total`` sums a tensor over every process (the mean of the global batch)."""
    return total((values * mask).sum()) / total(mask.sum()).clamp(min=1)


def masked_whiten(values: Any, mask: Any, total: Callable[[Any], Any] = one_process) -> Any:
    """Whitened over the response tokens of the whole batch: ``total`` sums over every process,
    so N processes whiten with the mean and variance one process with all the rows would use."""
    mean = masked_mean(values, mask, total)
    variance = masked_mean((values - mean) ** 2, mask, total)
    return (values - mean) * (variance + 1e-8).rsqrt() * mask


def gae(rewards: Any, values: Any, mask: Any, gamma: float, lam: float) -> tuple[Any, Any]:
    """Advantages and returns by generalised advantage estimation over the response tokens.

    ``values`` and ``rewards`` are zero outside ``mask``, so the step after the last token
    bootstraps from zero: the episode ends with the response.
    """
    import torch

    values = values * mask
    length = rewards.shape[1]
    running = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        reversed_advantages.append(running)
    advantages = torch.stack(reversed_advantages[::-1], dim=1) * mask
    return advantages, advantages + values


def position_ids_for(attention_mask: Any) -> Any:
    """Positions that skip left padding, as generation used them."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def response_logprobs(
    model: Any,
    input_ids: Any,
    attention_mask: Any,
    context: int,
    temperature: float,
    *,
    with_entropy: bool = False,
) -> tuple[Any, Any]:
    """Log-probabilities of the response tokens (``input_ids[:, context:]``); per-token entropy if asked."""
    import torch

    # Only the positions that predict response tokens need the (vocabulary-sized) output layer.
    keep = input_ids.shape[1] - context + 1
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        use_cache=False,
        logits_to_keep=keep,
    ).logits
    logits = logits[:, -keep:-1].float() / temperature
    all_logprobs = torch.log_softmax(logits, dim=-1)
    chosen = torch.gather(all_logprobs, 2, input_ids[:, context:].unsqueeze(-1)).squeeze(-1)
    entropy = -(all_logprobs.exp() * all_logprobs).sum(-1) if with_entropy else None
    return chosen, entropy


def token_values(value_model: Any, input_ids: Any, attention_mask: Any, context: int) -> Any:
    """The value head read at every position that predicts a response token."""
    classifier = classifier_of(value_model)
    backbone = getattr(classifier, classifier.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return classifier.score(hidden[:, context - 1 : -1]).squeeze(-1).float()


def micro_batches(rows: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` rows (0: one slice of every row)."""
    size = size or rows
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def in_pieces(read: Callable[[Any, Any], Any], input_ids: Any, attention_mask: Any, size: int) -> Any:
    """``read(input_ids, attention_mask)`` run ``size`` rows at a time and concatenated."""
    import torch

    return torch.cat([read(input_ids[s], attention_mask[s]) for s in micro_batches(len(input_ids), size)])


# ---------------------------------------------------------------------------
# Rollouts and the trainer


@dataclass
class Rollout:
    """One batch of sampled responses with everything PPO needs from the models that made them."""

    prompts: list[Conversation]
    responses: list[str]
    finished: list[bool]
    rm_scores: list[float]  # the reward model's scores as it gave them
    scores: Any  # [B] rm score minus the missing-end-of-turn penalty
    input_ids: Any  # [B, Q+R] prompt (left-padded) then response
    attention_mask: Any
    response_mask: Any  # [B, R] 1 on the response tokens up to and including end-of-turn
    context: int  # Q
    logprobs: Any  # [B, R] under the policy that sampled
    ref_logprobs: Any
    values: Any
    entropy: Any

    @property
    def kl(self) -> Any:
        """Per-token log-ratio to the reference (zero outside the response)."""
        return (self.logprobs - self.ref_logprobs) * self.response_mask


def per_token_rewards(rollout: Rollout, kl_coef: float) -> Any:
    """The KL penalty at every response token, plus the (penalised) reward-model score at the last one."""
    import torch

    rewards = -kl_coef * rollout.kl
    last = (rollout.response_mask.sum(dim=1) - 1).long()
    rewards[torch.arange(len(last), device=rewards.device), last] += rollout.scores
    return rewards


@functools.cache
def policy_and_value_class() -> type:
    """The class of :func:`policy_and_value` (built on first use: torch is imported lazily)."""
    import torch

    class PolicyAndValue(torch.nn.Module):
        """The policy and the value model as one module, prepared by accelerate as one model.

        Under DDP the update's forward pass goes through the wrapper, so the gradients of both
        are all-reduced (a value model read through its unwrapped module would train apart on
        every process); DeepSpeed, which takes one model per accelerator, can hold both.
        """

        def __init__(self, policy: Any, value_model: Any):
            super().__init__()
            self.policy = policy
            self.value_model = value_model

        def forward(self, input_ids: Any, attention_mask: Any, context: int, temperature: float) -> Any:
            logprobs, _ = response_logprobs(self.policy, input_ids, attention_mask, context, temperature)
            return logprobs, token_values(self.value_model, input_ids, attention_mask, context)

    return PolicyAndValue


def policy_and_value(policy: Any, value_model: Any) -> Any:
    return policy_and_value_class()(policy, value_model)


def unsupported_sharding(accelerator: Any) -> str | None:
    """What shards the weights in the accelerator's launch (ppo cannot run with it), or None."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return "FSDP"
    if state.distributed_type == DistributedType.DEEPSPEED and state.deepspeed_plugin.zero_stage == 3:
        return "DeepSpeed ZeRO-3"
    return None


def refuse_sharding(sharding: str | None) -> None:
    if sharding:
        raise CaitoolError(
            f"ppo cannot run under {sharding}: rollouts sample from the whole policy and the reward is "
            "read from the whole reward model on every process; launch it with DDP "
            "(configs/accelerate/multi-gpu.yaml) or DeepSpeed ZeRO-2 "
            "(configs/accelerate/deepspeed-zero2.yaml)"
        )


def check_accelerator(accelerator: Any, config: PPOConfig) -> None:
    """Refuse in one line what the accelerator's launch cannot run."""
    from accelerate.utils import DistributedType

    refuse_sharding(unsupported_sharding(accelerator))
    mini_batch = -(-config.batch_size // min(config.mini_batches, config.batch_size))
    if (
        accelerator.state.distributed_type == DistributedType.DEEPSPEED
        and 0 < config.forward_batch_size < mini_batch
    ):
        raise CaitoolError(
            "ppo --forward-batch-size below the mini-batch size is not supported under DeepSpeed "
            "(its engine steps the optimiser at every backward pass); leave it at 0"
        )


def clip_like_deepspeed(accelerator: Any, config: PPOConfig) -> None:
    """Under DeepSpeed, make its engine clip at ``--max-grad-norm``.

    The engine clips gradients itself, at its config's ``gradient_clipping`` (accelerate fills an
    "auto" one with 1.0, and DeepSpeed's own default is no clipping), and accelerate's
    ``clip_grad_norm_`` then only reads the norm. A value the user's DeepSpeed config sets
    explicitly and --max-grad-norm contradicts is refused rather than silently overridden.
    """
    from accelerate.utils import DistributedType

    if accelerator.state.distributed_type != DistributedType.DEEPSPEED:
        return
    deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
    clipping = deepspeed_config.get("gradient_clipping")
    if clipping in (None, "auto"):
        deepspeed_config["gradient_clipping"] = config.max_grad_norm
    elif float(clipping) != config.max_grad_norm:
        raise CaitoolError(
            f"the DeepSpeed config clips gradients at {clipping}, and DeepSpeed's engine clips them itself: "
            f'set its gradient_clipping to "auto" (then ppo --max-grad-norm {config.max_grad_norm} is used) '
            f"or pass --max-grad-norm {clipping}"
        )


class PPOTrainer:
    """The trained models (policy and value model, prepared by accelerate as one module) and the
    frozen ones around them.

    Under a multi-process launch each process rolls out its own prompts; advantages are whitened
    over the whole batch, the losses are normalised by the whole mini-batch's token count (so the
    gradients DDP averages are the gradients of the whole batch) and the metrics are taken over
    every process's rows.
    """

    def __init__(self, *, models: PPOModels, config: PPOConfig, accelerator: Any | None = None):
        import torch
        from accelerate import Accelerator

        from caitool.models import end_of_turn_ids

        self.config = config
        self.models = models
        # caitool autocasts every forward pass itself (models.precision), the rollout's as the
        # update's; a launch config's mixed_precision (bf16 in multi-gpu.yaml) would autocast the
        # update alone, and the ratio to the rollout's log-probs would not start at 1.
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        check_accelerator(self.accelerator, config)
        clip_like_deepspeed(self.accelerator, config)
        self.processes = Processes(self.accelerator.process_index, self.accelerator.num_processes)
        device = self.accelerator.device
        self.tokenizer = models.tokenizer
        self.stop_ids = end_of_turn_ids(models.tokenizer, models.policy)
        for frozen in models.frozen_modules():
            frozen.to(device)
        models.reward.device = str(device)
        self.ref = models.ref
        self.reward_model = models.reward
        # The modules themselves (generation and the rollout's reads need no gradient sync).
        self.policy, self.value_model = models.policy, models.value_model
        self.trainable = models.trainable_parameters()
        optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, eps=1e-5)
        self.trained, self.optimizer = self.accelerator.prepare(
            policy_and_value(models.policy, models.value_model), optimizer
        )
        self.accelerator.register_save_state_pre_hook(keep_trainable_weights)

    @property
    def device(self) -> Any:
        return self.accelerator.device

    def _unwrapped(self) -> tuple[Any, Any]:
        return self.policy, self.value_model

    def total(self, tensor: Any) -> Any:
        """``tensor`` summed over every process (itself on one)."""
        if not self.processes.distributed:
            return tensor
        import torch.distributed

        summed = tensor.detach().clone()
        torch.distributed.all_reduce(summed)
        return summed

    def gather(self, tensor: Any) -> Any:
        """Every process's rows of ``tensor``, in process order (float64, for exact means)."""
        return self.accelerator.gather(tensor.detach().double().contiguous())

    # -- rollout ---------------------------------------------------------------
    def rollout(self, prompts: list[Conversation], seed: int, first_row: int = 0) -> Rollout:
        """Responses to ``prompts``, rows ``first_row``... of the step's global batch."""
        import torch

        config = self.config
        rows = [encode(self.tokenizer, render_chat(self.tokenizer, p)) for p in prompts]
        query_ids, query_mask = left_padded(rows, self.tokenizer.pad_token_id, self.device)
        context = query_ids.shape[1]
        policy, value_model = self._unwrapped()
        with inference(policy, value_model), self.models.precision.autocast():
            response_ids = self._sample(policy, query_ids, query_mask, seed, first_row)
            response_mask, finished = self._response_mask(response_ids)
            input_ids = torch.cat(
                [
                    query_ids,
                    torch.where(response_mask.bool(), response_ids, self.tokenizer.pad_token_id),
                ],
                dim=1,
            )
            attention_mask = torch.cat([query_mask, response_mask], dim=1)
            responses = self._decode(response_ids)
            rm_scores = self.reward_model.score(prompts, responses)
            logprobs, ref_logprobs, values, entropy = self.read(input_ids, attention_mask, context)
        penalty = torch.tensor(
            [0.0 if f else config.missing_eot_penalty for f in finished], device=self.device
        )
        mask = response_mask.float()
        return Rollout(
            prompts=prompts,
            responses=responses,
            finished=finished,
            rm_scores=rm_scores,
            scores=torch.tensor(rm_scores, device=self.device) - penalty,
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=mask,
            context=context,
            logprobs=logprobs * mask,
            ref_logprobs=ref_logprobs * mask,
            values=values * mask,
            entropy=entropy,
        )

    def _sample(self, policy: Any, query_ids: Any, query_mask: Any, seed: int, first_row: int) -> Any:
        """Response tokens drawn from softmax(logits / T), ``forward_batch_size`` prompts at a time.

        Each piece is seeded by the global index of its first prompt, so N processes with b
        prompts each draw what one process with N*b prompts draws, at a forward batch size of b.
        """
        import torch

        pad = self.tokenizer.pad_token_id
        config = plain_generation_config(
            policy,
            temperature=self.config.temperature,
            max_new_tokens=self.config.response_length,
            eos_token_id=self.stop_ids,
            pad_token_id=pad,
        )
        context = query_ids.shape[1]
        pieces = []
        for rows in micro_batches(len(query_ids), self.config.forward_batch_size):
            torch.manual_seed(derive_seed(seed, "rows", first_row + rows.start))
            pieces.append(sample(policy, query_ids[rows], query_mask[rows], config)[:, context:])
        width = max(piece.shape[1] for piece in pieces)
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad) for p in pieces])

    def read(self, input_ids: Any, attention_mask: Any, context: int) -> tuple[Any, Any, Any, Any]:
        """Policy and reference log-probabilities, values and entropy of sampled responses (no gradients)."""
        import torch

        policy, value_model = self._unwrapped()
        temperature = self.config.temperature

        def pieces(read: Callable[[Any, Any], Any]) -> Any:
            return in_pieces(read, input_ids, attention_mask, self.config.forward_batch_size)

        def policy_read(ids: Any, mask: Any) -> Any:
            chosen, entropy = response_logprobs(policy, ids, mask, context, temperature, with_entropy=True)
            return torch.stack([chosen, entropy], dim=1)

        both = pieces(policy_read)
        with reference_of(policy, self.ref) as ref:
            ref_logprobs = pieces(
                lambda ids, mask: response_logprobs(ref, ids, mask, context, temperature)[0]
            )
        values = pieces(lambda ids, mask: token_values(value_model, ids, mask, context))
        return both[:, 0], ref_logprobs, values, both[:, 1]

    def _response_mask(self, response_ids: Any) -> tuple[Any, list[bool]]:
        """1 up to and including the first end-of-turn token; whether each response has one."""
        import torch

        is_stop = torch.isin(response_ids, torch.tensor(self.stop_ids, device=response_ids.device))
        finished = is_stop.any(dim=1)
        width = response_ids.shape[1]
        first_stop = torch.where(
            finished, is_stop.int().argmax(dim=1), torch.full_like(finished, width - 1, dtype=torch.long)
        )
        positions = torch.arange(width, device=response_ids.device).unsqueeze(0)
        return (positions <= first_stop.unsqueeze(1)).long(), finished.tolist()

    def _decode(self, response_ids: Any) -> list[str]:
        pad = self.tokenizer.pad_token_id
        return [
            decode(self.tokenizer, cut_at_stop(row.tolist(), self.stop_ids, pad)[0]) for row in response_ids
        ]

    # -- optimisation -------------------------------------------------------------
    def step(
        self, prompts: list[Conversation], seed: int, first_row: int = 0
    ) -> tuple[Rollout, dict[str, float]]:
        """One PPO step: a rollout, then ``ppo_epochs`` x ``mini_batches`` updates on it.

        ``prompts`` are this process's share of the step's batch, from row ``first_row`` on. Each
        process shuffles its own rows into ``mini_batches`` mini-batches; an update's mini-batch
        is the union of every process's (with one mini-batch, the whole batch, as on one process).
        """
        import torch

        config = self.config
        started = time.perf_counter()
        rollout = self.rollout(prompts, seed, first_row)
        release_freed_memory()
        mask = rollout.response_mask
        rewards = per_token_rewards(rollout, config.kl_coef)
        advantages, returns = gae(rewards, rollout.values, mask, config.gamma, config.lam)
        advantages = masked_whiten(advantages, mask, self.total)

        losses: dict[str, list[float]] = {
            "policy_loss": [],
            "value_loss": [],
            "clip_fraction": [],
            "approx_kl": [],
        }
        generator = torch.Generator().manual_seed(seed)
        groups = min(config.mini_batches, len(prompts))
        for _ in range(config.ppo_epochs):
            order = torch.randperm(len(prompts), generator=generator).to(self.device)
            for indices in torch.tensor_split(order, groups):
                for key, value in self.update(rollout, advantages, returns, indices).items():
                    losses[key].append(value)
                release_freed_memory()
        return rollout, self._metrics(rollout, losses, time.perf_counter() - started)

    def _metrics(self, rollout: Rollout, losses: dict[str, list[float]], seconds: float) -> dict[str, float]:
        """The step's metrics over every process's rows (the same numbers on every process)."""
        import torch

        mask = rollout.response_mask
        kl = self.gather(rollout.kl.sum(dim=1))
        missing = torch.tensor([0.0 if f else 1.0 for f in rollout.finished], device=self.device)
        # Each process's loss is its share of the mini-batch's mean times the number of processes.
        local_losses = torch.tensor([sum(v) / len(v) for v in losses.values()], device=self.device)
        mean_losses = (self.total(local_losses.double()) / self.processes.count).tolist()
        metrics = {
            "reward": self.gather(torch.tensor(rollout.rm_scores, dtype=torch.float64, device=self.device))
            .mean()
            .item(),
            "score": self.gather(rollout.scores).mean().item(),
            "kl": kl.mean().item(),
            "kl_penalty": (-self.config.kl_coef * kl).mean().item(),
            "entropy": masked_mean(rollout.entropy.double(), mask.double(), self.total).item(),
            **dict(zip(losses, mean_losses, strict=True)),
            "response_length": self.gather(mask.sum(dim=1)).mean().item(),
            "missing_eot": self.gather(missing).mean().item(),
            "seconds": seconds,
        }
        if self.device.type == "cuda":
            metrics["gpu_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        return metrics

    def update(self, rollout: Rollout, advantages: Any, returns: Any, indices: Any) -> dict[str, float]:
        """One optimiser step on the mini-batch ``indices``, ``forward_batch_size`` rows per pass.

        Every loss is a sum over the pass's response tokens divided by the token count of the
        mini-batch on every process, times the number of processes (which DDP's average of the
        gradients divides out again): the accumulated, averaged gradient is the one a single
        pass over the whole mini-batch gives on one process.
        """
        from contextlib import nullcontext

        tokens = self.total(rollout.response_mask[indices].sum()).clamp(min=1) / self.processes.count
        totals = dict.fromkeys(("policy_loss", "value_loss", "clip_fraction", "approx_kl"), 0.0)
        self.optimizer.zero_grad()
        parts = micro_batches(len(indices), self.config.forward_batch_size)
        for number, part in enumerate(parts):
            # Gradients are all-reduced once, after the mini-batch's last pass.
            last = number == len(parts) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.trained):
                for key, value in self._accumulate(
                    rollout, advantages, returns, indices[part], tokens
                ).items():
                    totals[key] += value
        self.accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        return totals

    def _accumulate(
        self, rollout: Rollout, advantages: Any, returns: Any, rows: Any, tokens: Any
    ) -> dict[str, float]:
        """Backpropagate the losses of ``rows`` (their share of the mini-batch's ``tokens``)."""
        import torch

        config = self.config
        input_ids, attention = rollout.input_ids[rows], rollout.attention_mask[rows]
        mask = rollout.response_mask[rows]
        old_logprobs, old_values = rollout.logprobs[rows], rollout.values[rows]
        adv, ret = advantages[rows], returns[rows]

        with self.models.precision.autocast():
            logprobs, values = self.trained(input_ids, attention, rollout.context, config.temperature)

        def share(per_token: Any) -> Any:
            return (per_token * mask).sum() / tokens

        log_ratio = (logprobs - old_logprobs) * mask
        ratio = torch.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - config.clip_range, 1.0 + config.clip_range)
        policy_loss = share(torch.max(unclipped, clipped))
        values_clipped = old_values + torch.clamp(
            values - old_values, -config.clip_range_value, config.clip_range_value
        )
        value_loss = 0.5 * share(torch.max((values - ret) ** 2, (values_clipped - ret) ** 2))
        self.accelerator.backward(policy_loss + config.vf_coef * value_loss)
        with torch.no_grad():
            return {
                "policy_loss": policy_loss.item(),
                "value_loss": value_loss.item(),
                "clip_fraction": share((clipped > unclipped).float()).item(),
                "approx_kl": (0.5 * share(log_ratio**2)).item(),
            }


# ---------------------------------------------------------------------------
# Loading and the ppo phase


def build_trainer(
    *,
    policy: str,
    reward_model: str,
    ref: str | None,
    config: PPOConfig,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> tuple[PPOTrainer, dict[str, Any]]:
    """Check and load the models (policy, reference, reward, value) and the trainer around them."""
    from caitool.models import force_offline, model_info, pick_device, quiet_transformers, require_full_model
    from caitool.ppo_models import build_models

    infos = {"policy": model_info(policy), "reward": model_info(reward_model)}
    require_full_model(infos["reward"], "the reward model (--rm)")
    if config.value_model == "separate" and config.value_from == "policy":
        require_full_model(infos["policy"], "--value-from policy")
    if config.lora and not config.merge:
        # A new adapter names one base directory; on top of another adapter that base would be wrong.
        require_full_model(infos["policy"], "ppo --lora --no-merge")
    if ref is not None:
        infos["ref"] = model_info(ref)
    force_offline()
    quiet_transformers()
    paths = {role: info.path for role, info in infos.items()}
    models = build_models(paths, config, device=pick_device(), seed=seed, trust_remote_code=trust_remote_code)
    return PPOTrainer(models=models, config=config), infos


def prompt_batches(records: list[PromptRecord], config: PPOConfig, seed: int, processes: int = 1):
    """``steps`` global batches of prompts (``batch_size`` per process): the file shuffled
    (seeded), cycled as often as needed. N processes with ``batch_size`` b see the batches one
    process with ``batch_size`` N*b sees."""
    size = config.batch_size * processes
    rng = random.Random(derive_seed(seed, "prompt-order"))
    order: list[PromptRecord] = []
    for _ in range(config.steps):
        while len(order) < size:
            epoch = list(records)
            rng.shuffle(epoch)
            order.extend(epoch)
        yield order[:size]
        order = order[size:]


def share_of(batch: list[PromptRecord], processes: Processes) -> tuple[list[PromptRecord], int]:
    """This process's consecutive share of a global batch and the global index of its first row."""
    size = len(batch) // processes.count
    first = processes.index * size
    return batch[first : first + size], first


def step_line(step: int, total: int, metrics: dict[str, float]) -> str:
    return (
        f"ppo step {step}/{total}: reward {metrics['reward']:+.3f}  kl {metrics['kl']:.4f}  "
        f"entropy {metrics['entropy']:.3f}  policy loss {metrics['policy_loss']:+.4f}  "
        f"value loss {metrics['value_loss']:.4f}  clip {metrics['clip_fraction']:.3f}  "
        f"length {metrics['response_length']:.1f}  no-eot {metrics['missing_eot']:.2f}  "
        f"{metrics['seconds']:.1f}s"
        + (f"  gpu peak {metrics['gpu_peak_gb']:.1f} GB" if "gpu_peak_gb" in metrics else "")
    )


def sample_lines(step: int, records: list[PromptRecord], rollout: Rollout) -> list[dict[str, Any]]:
    kl = rollout.kl.sum(dim=1).tolist()
    return [
        {
            "step": step,
            "id": record.id,
            "prompt": [m.model_dump() for m in record.prompt],
            "response": response,
            "reward": reward,
            "finished": finished,
            "kl": kl_value,
        }
        for record, response, reward, finished, kl_value in zip(
            records, rollout.responses, rollout.rm_scores, rollout.finished, kl, strict=True
        )
    ]


def save_checkpoint(trainer: PPOTrainer, staging: Path, step: int, processes: Processes) -> Path:
    """Policy, value model and optimiser state after ``step`` (accelerate's format, so a
    DeepSpeed or multi-GPU run saves its shards too). Only the newest checkpoint is kept; it
    appears under its final name only when complete.

    Every process takes part (accelerate saves each one's random state); the main process
    clears, renames and deletes.
    """
    checkpoints = staging / CHECKPOINTS
    final = checkpoints / f"checkpoint-{step}"
    unfinished = checkpoints / f".checkpoint-{step}.tmp"
    if processes.is_main:
        shutil.rmtree(unfinished, ignore_errors=True)
        unfinished.mkdir(parents=True)
    processes.wait()
    trainer.accelerator.save_state(str(unfinished), safe_serialization=False)
    processes.wait()
    if processes.is_main:
        os.replace(unfinished, final)
        for older in checkpoints.glob("checkpoint-*"):
            if older != final:
                shutil.rmtree(older, ignore_errors=True)
    processes.wait()
    return final


def gathered_policy_weights(trainer: PPOTrainer) -> dict[str, Any]:
    """The policy's full weights through the accelerator's state dict (a collective)."""
    state = gathered_state_dict(trainer.accelerator, trainer.trained)
    return {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}


def ppo_run_key(
    input_path: str | Path, infos: dict[str, Any], config: PPOConfig, seed: int, processes: int = 1
) -> dict[str, Any]:
    """What a run trains on and with: a checkpoint is reused only by a run with the same key.

    The number of steps is left out: step k's prompts and randomness do not depend on it, so
    a killed run can be resumed with more steps than it was started with. Neither do how often
    samples are saved nor whether activations are recomputed. The number of processes does
    (``batch_size`` is per process).
    """
    unshaping = ("steps", "sample_every", "gradient_checkpointing")
    settings = {k: v for k, v in asdict(config).items() if k not in unshaping}
    return training_run_key(input_path, infos, settings, seed, processes=processes)


def run_ppo(
    input_path: str | Path,
    output: str | Path,
    *,
    policy: str,
    reward_model: str,
    ref: str | None = None,
    config: PPOConfig | None = None,
    runtime: Runtime | None = None,
) -> list[dict[str, float]]:
    """Train and save the policy (HF directory: tokenizer, manifest, log, samples); return step metrics.

    With ``runtime.checkpoint_every`` the run saves its state every N steps; the same command
    run again after a kill continues from the last one (``runtime.resume``). Every step's
    randomness is derived from the seed, the step number and the prompts' places in the step's
    batch, so a resumed run takes the same steps as an uninterrupted one.

    Under ``torchrun`` or ``accelerate launch`` every process runs this on its own
    ``batch_size`` prompts of each step; the main process alone writes.
    """
    config = config or PPOConfig()
    runtime = runtime or Runtime()
    seed, checkpoint_every = runtime.seed, runtime.checkpoint_every
    started = now_iso()
    source = validate_input(input_path, parse_prompt_input)
    records = list(read_records(source.path, parse_prompt_input))
    check_output_dir(output)
    refuse_sharding(launch_sharding())
    processes = current_processes()
    trainer, infos = build_trainer(
        policy=policy,
        reward_model=reward_model,
        ref=ref,
        config=config,
        trust_remote_code=runtime.trust_remote_code,
        seed=seed,
    )
    with atomic_model_dir(output, processes) as staging:
        run_key = ppo_run_key(input_path, infos, config, seed, processes.count)
        checkpoint = resume_checkpoint(staging, run_key, runtime.resume, processes)
        if checkpoint and checkpoint_step(checkpoint) >= config.steps:
            raise CaitoolError(
                f"{checkpoint} holds a killed run already past step {config.steps}; rerun with "
                f"--steps above {checkpoint_step(checkpoint)} to continue it, or --no-resume to start over"
            )
        done = checkpoint_step(checkpoint) if checkpoint else 0
        history = [
            {k: v for k, v in entry.items() if k != "step"}
            for entry in keep_log_until(staging / TRAINING_LOG, done, processes)
        ]
        keep_log_until(staging / SAMPLES_FILE, done, processes)
        if checkpoint:
            # Checkpoints hold trained weights only (keep_trainable_weights); frozen ones are loaded.
            trainer.accelerator.load_state(checkpoint, strict=False)
            print_summary(f"ppo: resuming after step {done} from {checkpoint}")
        log = JsonlLog(staging / TRAINING_LOG, append=True, enabled=processes.is_main)
        samples = JsonlLog(staging / SAMPLES_FILE, append=True, enabled=processes.is_main)
        for step, batch in enumerate(prompt_batches(records, config, seed, processes.count), start=1):
            if step <= done:
                continue
            mine, first_row = share_of(batch, processes)
            step_seed = derive_seed(seed, "step", step)
            rollout, metrics = trainer.step([r.prompt for r in mine], step_seed, first_row)
            history.append(metrics)
            log.write({"step": step, **metrics})
            print_summary(step_line(step, config.steps, metrics))
            if step == 1 or step % config.sample_every == 0 or step == config.steps:
                for line in every_process_lines(sample_lines(step, mine, rollout), processes):
                    samples.write(line)
            if checkpoint_every and step % checkpoint_every == 0 and step < config.steps:
                saving = time.perf_counter()
                saved = save_checkpoint(trainer, staging, step, processes)
                print_summary(f"ppo: saved {saved.name} in {time.perf_counter() - saving:.1f}s")
        weights = gathered_policy_weights(trainer)
        truncated = sum(every_process_lines([truncated_count(trainer.reward_model)], processes))
        if processes.is_main:
            saved_dtype = save_policy(
                trainer.policy,
                staging,
                config=config,
                base_path=infos["policy"].path,
                precision=trainer.models.precision,
                trust_remote_code=runtime.trust_remote_code,
                state_dict=weights,
            )
            trainer.tokenizer.save_pretrained(staging)
            write_model_manifest(
                staging,
                build_manifest(
                    phase="ppo",
                    params=training_params(
                        asdict(config),
                        runtime,
                        checkpoint,
                        processes,
                        ref=ref
                        or ("the starting policy, adapters off" if config.lora else "the starting policy"),
                        precision=trainer.models.precision.name,
                        device=str(trainer.device),
                    ),
                    started_at=started,
                    models=infos,
                    inputs=[input_path],
                    counts={
                        "prompts": len(records),
                        "steps": config.steps,
                        "prompts_per_step": config.batch_size * processes.count,
                        **reward_trend(history),
                        "saved_dtype": saved_dtype,
                        "rm_truncated": truncated,
                    },
                ),
            )
    print_summary(
        f"ppo: {config.steps} steps; reward {history[0]['reward']:+.3f} -> {history[-1]['reward']:+.3f}; "
        f"kl {history[-1]['kl']:.4f}{truncation_note(trainer.reward_model, truncated)}; saved to {output}"
    )
    return history


def every_process_lines(lines: list[dict[str, Any]], processes: Processes) -> list[dict[str, Any]]:
    """Every process's lines, in process order (so in the order of the global batch); a collective."""
    if not processes.distributed:
        return lines
    from accelerate.utils import gather_object

    return gather_object(lines)
