"""The models ppo trains and reads, built apart from the trainer that uses them.

Four roles:

* **policy** (trained): full weights kept in fp32 for the optimiser, or with ``lora`` LoRA
  adapters (fp32) on a frozen base held in the frozen precision.
* **reference** (frozen): with ``lora`` and no ``--ref``, the policy itself with its adapters
  switched off, so there is no second copy; otherwise a copy of the starting policy, or ``--ref``.
* **value model** (trained): ``shared`` puts LoRA adapters and a trainable copy of the reward
  head on the frozen reward model, so it starts as the reward model and needs no backbone of its
  own; ``separate`` is a whole second backbone with a scalar head, every weight trained,
  started from the reward model or the policy (``value_from``).
* **reward** (frozen): the reward model; with the shared value model, the same module with its
  adapters switched off.

Frozen weights are held in the precision ``--dtype`` picks (``auto``: bf16 on GPUs that have it,
fp32 on CPUs), and forward passes then run under autocast to it; trained weights stay fp32 and
log-softmax is taken in fp32. The reference copy of a full policy keeps the policy's fp32
embeddings and norms and holds only its linear weights in bf16, which is what autocast does to
the policy's own weights, so the two compute the same numbers and the KL is exactly zero before
the first update.

Trained models are in train mode with every dropout probability set to 0: the update then
computes what the rollout computed, and gradient checkpointing (which transformers runs only in
training mode) works. Generation and the rollout's reads run in eval mode, the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caitool.backends import derive_seed
from caitool.errors import CaitoolError
from caitool.reward import RewardModel
from caitool.training import lora_config

if TYPE_CHECKING:
    from caitool.ppo_config import PPOConfig

# Attributes that hold a dropout probability or training-only noise (Llama's attention_dropout,
# GPT-2's attn_pdrop, Mixtral's router_jitter_noise); nn.Dropout modules are handled apart.
TRAINING_NOISE = ("dropout", "pdrop", "jitter")


@dataclass(frozen=True)
class Precision:
    """The dtype frozen weights are held in and forward passes autocast to (fp32: no autocast)."""

    dtype: Any
    device_type: str

    @property
    def mixed(self) -> bool:
        import torch

        return self.dtype != torch.float32

    def autocast(self) -> AbstractContextManager[Any]:
        import torch

        return torch.autocast(self.device_type, dtype=self.dtype) if self.mixed else nullcontext()

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def ppo_precision(device: str, requested: str) -> Precision:
    import torch

    from caitool.models import pick_dtype

    dtype = pick_dtype(device, requested)
    if dtype == torch.float16:
        raise CaitoolError(
            "ppo --dtype float16 is not supported (it would need loss scaling); use bfloat16 or float32"
        )
    return Precision(dtype=dtype, device_type=device.split(":")[0])


# ---------------------------------------------------------------------------
# Training mode without dropout


def disable_dropout(model: Any) -> None:
    """Set every dropout probability (modules, attention attributes, config) and router noise to 0."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and any(word in name for word in TRAINING_NOISE):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for section in (config, getattr(config, "text_config", None)):
        if section is None:
            continue
        for name, value in section.to_dict().items():
            if isinstance(value, float) and any(word in name for word in TRAINING_NOISE):
                setattr(section, name, 0.0)


def prepare_for_training(model: Any, *, gradient_checkpointing: bool) -> None:
    """Train mode with dropout off; activations recomputed in the backward pass if asked."""
    disable_dropout(model)
    model.train()
    if gradient_checkpointing:
        # transformers 5 renamed it; peft forwards either name to the model it wraps.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def freeze(model: Any) -> None:
    disable_dropout(model)
    model.eval()


@contextmanager
def inference(*modules: Any) -> Iterator[None]:
    """Eval mode (generation keeps its key/value cache) and no gradients, then back to train mode."""
    import torch

    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


def keep_trainable_in_fp32(model: Any) -> None:
    """Adam's master weights in fp32, even when a trained copy started from a bf16 module."""
    import torch

    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


# ---------------------------------------------------------------------------
# Mixed model families


def load_vocabulary(path: str, option: str, trust_remote_code: bool) -> dict[str, int]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise CaitoolError(f"{option} {path}: no tokenizer to check against the policy's ({error})") from None
    return tokenizer.get_vocab()


def check_same_tokenizer(
    policy_vocab: dict[str, int], other_vocab: dict[str, int], *, option: str, path: str, reason: str
) -> None:
    """Refuse a model that reads the policy's token ids with a vocabulary of its own."""
    if policy_vocab == other_vocab:
        return
    differing = sum(policy_vocab.get(token) != index for token, index in other_vocab.items())
    raise CaitoolError(
        f"{option} {path} does not share the policy's tokenizer ({len(other_vocab)} tokens against "
        f"{len(policy_vocab)}, {differing} of them with other ids); {reason}"
    )


def check_families(paths: dict[str, str], config: PPOConfig, trust_remote_code: bool) -> None:
    """The value model read at the policy's token ids, and the reference, need the policy's vocabulary."""
    if config.value_from != "rm" and "ref" not in paths:
        return
    policy_vocab = load_vocabulary(paths["policy"], "--policy", trust_remote_code)
    if config.value_from == "rm":
        check_same_tokenizer(
            policy_vocab,
            load_vocabulary(paths["reward"], "--rm", trust_remote_code),
            option="--rm",
            path=paths["reward"],
            reason="the value model starts from the reward model and reads the policy's token ids, so "
            "use a reward model of the policy's family or --value-model separate --value-from policy",
        )
    if "ref" in paths:
        check_same_tokenizer(
            policy_vocab,
            load_vocabulary(paths["ref"], "--ref", trust_remote_code),
            option="--ref",
            path=paths["ref"],
            reason="the KL penalty reads the reference's log-probabilities at the policy's token ids",
        )


# ---------------------------------------------------------------------------
# The models


class AdapterOffRewardModel(RewardModel):
    """The reward read from the shared value model's module with its adapters switched off."""

    def __init__(self, critic: Any, reward: RewardModel):
        super().__init__(
            critic.get_base_model(),
            reward.tokenizer,
            device=reward.device,
            batch_size=reward.batch_size,
            info=reward.info,
            max_length=reward.max_length,
        )
        self.critic = critic

    def score_token_ids(self, rows: Any) -> list[float]:
        with self.critic.disable_adapter():
            return super().score_token_ids(rows)


@dataclass
class PPOModels:
    """Everything ppo runs; ``ref`` is None when the reference is the policy with its adapters off."""

    policy: Any
    value_model: Any
    reward: RewardModel
    tokenizer: Any
    precision: Precision
    ref: Any | None = None

    def frozen_modules(self) -> list[Any]:
        """The frozen models that live outside the trained ones (placed on the device by the trainer)."""
        separate_reward = not isinstance(self.reward, AdapterOffRewardModel)
        return [m for m in (self.ref, self.reward.model if separate_reward else None) if m is not None]

    def trainable_parameters(self) -> list[Any]:
        return [p for m in (self.policy, self.value_model) for p in m.parameters() if p.requires_grad]


@contextmanager
def reference_of(policy: Any, ref: Any | None) -> Iterator[Any]:
    """The module to run as the reference: ``ref``, or the LoRA policy with its adapters off."""
    if ref is not None:
        yield ref
        return
    with policy.disable_adapter():
        yield policy


def classifier_of(value_model: Any) -> Any:
    """The sequence classifier (backbone and ``score`` head) inside a value model, peft or not."""
    get_base_model = getattr(value_model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else value_model


def half_linear_weights(model: Any, dtype: Any) -> None:
    """Hold linear weights in ``dtype`` (autocast's own cast of them), other weights as they are.

    A linear layer tied to the input embeddings keeps fp32, as the embeddings must.
    """
    import torch

    embeddings = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not embeddings:
            module.to(dtype)


def load_policy(
    path: str, config: PPOConfig, precision: Precision, seed: int, trust_remote_code: bool
) -> Any:
    import torch

    from caitool.models import load_full_causal_lm

    if not config.lora:
        return load_full_causal_lm(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    from peft import get_peft_model

    base = load_full_causal_lm(path, dtype=precision.dtype, trust_remote_code=trust_remote_code)
    torch.manual_seed(derive_seed(seed, "policy-lora"))
    return get_peft_model(base, lora_config(config.lora_rank, "CAUSAL_LM"))


def load_reference(
    policy: Any, path: str | None, config: PPOConfig, precision: Precision, trust_remote_code: bool
) -> Any | None:
    import copy

    import torch

    from caitool.models import load_full_causal_lm

    if path is None and config.lora:
        return None
    # The reference keeps requires_grad like the policy (it is only ever run under no_grad and no
    # optimiser holds it): CPU kernels for frozen and trainable weights differ in rounding, which
    # would make the KL to an identical reference 1e-5 instead of exactly zero.
    if path is None:
        ref = copy.deepcopy(policy)
    else:
        ref = load_full_causal_lm(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if precision.mixed:
        half_linear_weights(ref, precision.dtype)
    freeze(ref)
    return ref


def load_separate_value_model(
    config: PPOConfig, *, policy_path: str, reward_path: str, trust_remote_code: bool
) -> Any:
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    source = reward_path if config.value_from == "rm" else policy_path
    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=1,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            dtype=torch.float32,
        )
    if config.value_from == "policy":
        torch.nn.init.zeros_(model.score.weight)
    return model


def load_value_and_reward(
    paths: dict[str, str], config: PPOConfig, precision: Precision, seed: int, trust_remote_code: bool
) -> tuple[Any, RewardModel]:
    import torch

    from caitool.reward import load_reward_model

    reward = load_reward_model(
        paths["reward"],
        device="cpu",
        dtype=precision.dtype,
        batch_size=config.forward_batch_size or config.batch_size,
        trust_remote_code=trust_remote_code,
    )
    if config.value_model == "separate":
        freeze(reward.model)
        value_model = load_separate_value_model(
            config,
            policy_path=paths["policy"],
            reward_path=paths["reward"],
            trust_remote_code=trust_remote_code,
        )
        return value_model, reward
    from peft import get_peft_model

    reward.model.requires_grad_(False)
    torch.manual_seed(derive_seed(seed, "value-lora"))
    critic = get_peft_model(reward.model, lora_config(config.lora_rank, "SEQ_CLS", modules_to_save=["score"]))
    keep_trainable_in_fp32(critic)
    return critic, AdapterOffRewardModel(critic, reward)


def build_models(
    paths: dict[str, str], config: PPOConfig, *, device: str, seed: int, trust_remote_code: bool
) -> PPOModels:
    """Load and prepare every model of a run from local directories (``paths``: policy, reward, ref)."""
    from caitool.models import load_tokenizer

    check_families(paths, config, trust_remote_code)
    precision = ppo_precision(device, config.dtype)
    policy = load_policy(paths["policy"], config, precision, seed, trust_remote_code)
    ref = load_reference(policy, paths.get("ref"), config, precision, trust_remote_code)
    value_model, reward = load_value_and_reward(paths, config, precision, seed, trust_remote_code)
    for trained in (policy, value_model):
        prepare_for_training(trained, gradient_checkpointing=config.gradient_checkpointing)
    return PPOModels(
        policy=policy,
        value_model=value_model,
        reward=reward,
        tokenizer=load_tokenizer(paths["policy"], trust_remote_code=trust_remote_code),
        precision=precision,
        ref=ref,
    )


# ---------------------------------------------------------------------------
# Saving the policy


def merged_policy(policy: Any, base_path: str, precision: Precision, trust_remote_code: bool) -> Any:
    """The LoRA policy merged into full weights, merged in fp32 even when the base was held in bf16."""
    import torch

    if not precision.mixed:
        return policy.merge_and_unload()
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from caitool.models import load_full_causal_lm

    base = load_full_causal_lm(base_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    adapter = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(policy).items()}
    full = get_peft_model(base, policy.peft_config["default"])
    set_peft_model_state_dict(full, adapter)
    return full.merge_and_unload()


def save_policy(
    policy: Any,
    directory: Path,
    *,
    config: PPOConfig,
    base_path: str,
    precision: Precision,
    trust_remote_code: bool,
    state_dict: dict[str, Any] | None = None,
) -> str:
    """Save the trained policy: full weights in the base's precision, or the adapter alone.

    ``state_dict``: the full policy's weights as the accelerator gathered them (a LoRA policy is
    read from its module: ppo runs only where every process holds whole weights). Returns the
    dtype saved, or "adapter".
    """
    from caitool.training import save_like_base

    if not config.lora:
        return save_like_base(policy, directory, base_path, state_dict)
    if not config.merge:
        # The adapter names the base directory it was trained on (the policy's, a full model).
        policy.save_pretrained(directory)
        return "adapter"
    return save_like_base(
        merged_policy(policy, base_path, precision, trust_remote_code), directory, base_path
    )


def keep_trainable_weights(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
    """An accelerate save-state hook: a checkpoint holds trained weights only, not frozen bases."""
    for index, model in enumerate(models):
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        if frozen:
            weights[index] = {k: v for k, v in weights[index].items() if k not in frozen}
