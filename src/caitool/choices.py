"""The closed sets of option values, each named once.

The command line offers them as choices (Typer reads the ``Literal``), and the phases called
from Python check them with :func:`check_choice`, so a new value is added in one place.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from caitool.errors import CaitoolError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
# How a local model runs: transformers in this process, or vLLM in this process (caitool[vllm]).
Engine = Literal["transformers", "vllm"]
# TRL's DPO losses (DPOConfig.loss_type); caitool's soft labels apply to the first.
DpoLoss = Literal[
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
]
# The verdict modes ask the same questions, answered in the judge's own turn (no prefill): for
# hosted chat APIs, which neither continue a prefilled assistant turn nor offer /v1/completions.
LabelMode = Literal["logprob", "cot", "score", "verdict", "verdict-cot", "verdict-score"]
SftRounds = Literal["final", "all"]  # also pairs-from-revisions' --round
ValueFrom = Literal["rm", "policy"]
ValueModel = Literal["shared", "separate"]
JudgeMode = Literal["score", "group"]  # how rloo's and grpo's judge reads a reward
RewardRule = Literal["refusal"]
GrpoLoss = Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo"]  # TRL's GRPO loss_type
ScaleRewards = Literal["group", "batch", "none"]
VllmMode = Literal["colocate", "server"]


def choices(kind: Any) -> tuple[str, ...]:
    return get_args(kind)


def check_choice(option: str, value: object, kind: Any) -> None:
    """The one check behind every closed set, for callers that bypass the command line."""
    allowed = choices(kind)
    if value not in allowed:
        raise CaitoolError(f'{option} must be one of {", ".join(allowed)}, got "{value}"')
