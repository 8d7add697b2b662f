"""What ``caitool ppo`` trains and how, apart from the algorithm so that the model builders
(:mod:`caitool.ppo_models`) and the run (:mod:`caitool.ppo`) can both read it."""

from __future__ import annotations

from dataclasses import dataclass

from caitool.choices import Dtype, ValueFrom, ValueModel, check_choice
from caitool.errors import CaitoolError


@dataclass(frozen=True)
class PPOConfig:
    """What ppo trains and how; the seed and checkpointing come with the shared Runtime."""

    kl_coef: float = 0.05  # weight of the per-token KL penalty to the reference
    steps: int = 20  # one rollout batch each
    batch_size: int = 8  # prompts per rollout
    mini_batches: int = 2  # per PPO epoch
    ppo_epochs: int = 2  # passes over each rollout
    response_length: int = 64  # tokens per response at most
    lr: float = 1e-6
    temperature: float = 0.7  # rollout sampling (the log-probabilities are read at it too)
    value_from: ValueFrom = "rm"  # the separate value model starts from the reward model or the policy
    value_model: ValueModel = "shared"  # LoRA on the reward model's frozen backbone, or a backbone of its own
    lora: bool = False  # the policy trains LoRA adapters; the reference is the base with them off
    lora_rank: int = 16  # of the policy's adapters and the shared value model's
    merge: bool = True  # with lora: save the merged model (False: the adapter alone)
    dtype: Dtype = "auto"  # frozen weights and autocast: bf16 on GPUs that have it, fp32 on CPUs
    gradient_checkpointing: bool = False  # recompute activations in the backward pass
    forward_batch_size: int = 0  # sequences per forward pass (0: a whole batch or mini-batch at once)
    missing_eot_penalty: float = 1.0  # taken from the score of a response cut off before end-of-turn
    sample_every: int = 5  # steps between saved sample rollouts
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    clip_range: float = 0.2  # of the policy ratio
    clip_range_value: float = 0.2  # of the value update
    vf_coef: float = 0.1  # weight of the value loss
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        check_choice("--value-from", self.value_from, ValueFrom)
        check_choice("--value-model", self.value_model, ValueModel)
        check_choice("--dtype", self.dtype, Dtype)
        if self.value_model == "shared" and self.value_from != "rm":
            raise CaitoolError(
                "--value-from policy needs --value-model separate "
                "(the shared value model lives on the reward model's backbone)"
            )
        if not self.merge and not self.lora:
            raise CaitoolError("--no-merge only applies to --lora (a full fine-tune has no adapter to keep)")
        if self.forward_batch_size < 0:
            raise CaitoolError("--forward-batch-size must be 0 (whole batches) or more")
