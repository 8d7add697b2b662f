"""The rewards of the online RL phases (``rloo``, ``grpo``): one interface, several sources, weighted.

A source scores a step's rollouts (each prompt's samples together, a *group*) and returns, for
each sample, its reward and what it was read from (for samples.jsonl):

* :class:`RewardModelSource` (``--rm DIR``): the reward model's score of prompt + response;
* :class:`JudgeSource` (``--judge MODEL``): a feedback model, any spec :func:`load_backend`
  takes (a local directory, ``default``, ``openai:NAME``) or ``ref`` / ``policy`` (the starting
  policy, or the policy being trained: self-rewarding), judges each sample under a comparison
  principle drawn from the constitution for its prompt and step (seeded, recorded), through the
  :class:`~caitool.label.Labeller`:

  - ``score`` mode: the response alone, the yes/no question of ``label-preferences --mode score``;
    the reward is P(good) = sigmoid(log P(Yes) - log P(No)). One question per sample.
  - ``group`` mode: each sample against each other sample of its group, the letter question of
    ``label-preferences`` asked in both option orders (position bias cancels); the reward is the
    sample's mean probability of winning (RULER-like, relative to its group). k(k-1) questions for
    a group of k: k-1 times score mode's cost (3x at k=4, 7x at k=8).

* :class:`RuleSource` (``--rule refusal``): 1 when the response does what the rule prefers (a
  refusal, :func:`caitool.eval_stats.is_refusal`, to a prompt whose ``set`` field is
  ``red_team``, an answer to any other), else 0. A diagnostic whose optimum is known.

:class:`CombinedReward` is the one TRL reward function: the weighted sum of the sources, less the
missing-end-of-turn penalty; it keeps each component of the last batch for samples.jsonl and logs
per step the judge's questions and seconds and the spread of the reward within groups. A source
that fails (a request to a judge server that fails after all its retries) stops the run with one
line saying where, after the step's rollouts are written to samples.jsonl with the error: a long
run never dies silently, and resumes from its last checkpoint.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from caitool.backends import BackendOptions, derive_seed
from caitool.choices import JudgeMode, RewardRule, check_choice
from caitool.errors import CaitoolError
from caitool.records import Conversation, Message

RECORD_PROMPT = "record_prompt"  # the dataset column with the prompt as the record has it
SELF_JUDGES = ("ref", "policy")  # --judge names that mean the policy itself, not another model
RED_TEAM_SET = "red_team"


@dataclass(frozen=True)
class RewardSpec:
    """Which reward sources a run sums, with what weights; at least one is given."""

    rm: str | None = None
    rm_weight: float = 1.0
    judge: str | None = None
    judge_weight: float = 1.0
    judge_mode: JudgeMode = "score"
    constitution: str = "harmless"
    principles: tuple[str, ...] = ()
    rule: RewardRule | None = None
    rule_weight: float = 1.0
    judge_options: BackendOptions = field(default_factory=BackendOptions)

    def __post_init__(self) -> None:
        if self.rm is None and self.judge is None and self.rule is None:
            raise CaitoolError(
                "give a reward: --rm DIR, --judge MODEL or --rule refusal (they can be combined)"
            )
        check_choice("--judge-mode", self.judge_mode, JudgeMode)
        if self.rule is not None:
            check_choice("--rule", self.rule, RewardRule)

    def settings(self) -> dict[str, Any]:
        """What shapes the reward, for the run key and the manifest (the judge's address does not)."""
        out: dict[str, Any] = {}
        if self.rm is not None:
            out["rm_weight"] = self.rm_weight
        if self.judge is not None:
            out |= {
                "judge": self.judge,
                "judge_weight": self.judge_weight,
                "judge_mode": self.judge_mode,
                "constitution": self.constitution,
                "principles": list(self.principles),
            }
        if self.rule is not None:
            out |= {"rule": self.rule, "rule_weight": self.rule_weight}
        return out


@dataclass
class Rollouts:
    """One step's samples in TRL's order: each prompt's ``group_size`` samples together."""

    step: int
    ids: list[str]
    prompts: list[Conversation]
    responses: list[str]
    fields: list[dict[str, Any]]  # the prompt record's own fields (e.g. ``set``)
    group_size: int

    def groups(self) -> list[range]:
        return [range(s, s + self.group_size) for s in range(0, len(self.responses), self.group_size)]


@dataclass
class Scored:
    """A source's rewards for a batch, one detail dict per sample (recorded in samples.jsonl)."""

    rewards: list[float]
    details: list[dict[str, Any]] | None = None
    questions: int = 0  # questions put to a judge


class RewardModelSource:
    name = "rm"

    def __init__(self, scorer: Any):
        self.scorer = scorer

    def score(self, rollouts: Rollouts) -> Scored:
        return Scored(self.scorer.score(rollouts.prompts, rollouts.responses))


class RuleSource:
    """1 for a refusal to a red-team prompt or an answer to any other prompt, else 0."""

    name = "rule"

    def score(self, rollouts: Rollouts) -> Scored:
        from caitool.eval_stats import is_refusal

        return Scored(
            [
                float(is_refusal(response) == (fields.get("set") == RED_TEAM_SET))
                for response, fields in zip(rollouts.responses, rollouts.fields, strict=True)
            ]
        )


class JudgeSource:
    """The constitution's feedback model as the reward (score or group mode, see the module)."""

    name = "judge"

    def __init__(
        self,
        backend: Any,
        constitution: Any,
        *,
        mode: JudgeMode = "score",
        principles: Sequence[str] = (),
        seed: int = 0,
        live: bool = False,
    ):
        from caitool.label import Labeller

        check_choice("--judge-mode", mode, JudgeMode)
        self.backend = backend
        self.mode = mode
        self.seed = seed
        self.live = live  # the judge is the policy being trained: no cache outlives its weights
        self.candidates = constitution.restrict_comparisons(principles or None)
        self.labeller = Labeller(
            backend, constitution, mode="score" if mode == "score" else "logprob", swap=True
        )

    def principle(self, record_id: str, step: int) -> Any:
        from caitool.constitution import draw

        return draw(self.candidates, random.Random(derive_seed(self.seed, "principle", record_id, step)))

    def score(self, rollouts: Rollouts) -> Scored:
        if self.live and hasattr(self.backend, "_kept_prefix"):
            self.backend._kept_prefix = None
        drawn = [self.principle(record_id, rollouts.step) for record_id in rollouts.ids]
        if self.mode == "score":
            return self._score_alone(rollouts, drawn)
        return self._score_in_groups(rollouts, drawn)

    def _score_alone(self, rollouts: Rollouts, drawn: list[Any]) -> Scored:
        scored = self.labeller.score_responses(rollouts.prompts, rollouts.responses, drawn)
        rewards, details = [], []
        for (log_odds, mass), principle in zip(scored, drawn, strict=True):
            p_good = sigmoid(log_odds)
            rewards.append(p_good)
            details.append(
                {"principle": principle.id, "p_good": p_good, "log_odds": log_odds, "answer_mass": mass}
            )
        return Scored(rewards, details, questions=len(scored))

    def _score_in_groups(self, rollouts: Rollouts, drawn: list[Any]) -> Scored:
        from caitool.label import Comparison

        pairs = [(i, j) for group in rollouts.groups() for i in group for j in group if i < j]
        comparisons = [
            Comparison(rollouts.prompts[i], rollouts.responses[i], rollouts.responses[j], drawn[i])
            for i, j in pairs
        ]
        verdicts = self.labeller.judge(comparisons, seed=derive_seed(self.seed, "group", rollouts.step))
        wins: dict[int, dict[int, float]] = {i: {} for i in range(len(rollouts.responses))}
        for (i, j), verdict in zip(pairs, verdicts, strict=True):
            wins[i][j], wins[j][i] = verdict.p, 1.0 - verdict.p
        rewards, details = [], []
        for i, principle in enumerate(drawn):
            group = next(g for g in rollouts.groups() if i in g)
            against = [wins[i][j] for j in group if j != i]
            p_win = sum(against) / len(against)
            rewards.append(p_win)
            details.append(
                {
                    "principle": principle.id,
                    "p_win": p_win,
                    "p_beats": {str(j - group.start): wins[i][j] for j in group if j != i},
                }
            )
        return Scored(rewards, details, questions=2 * len(comparisons))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# ---------------------------------------------------------------------------
# The TRL reward function


@dataclass
class RewardedBatch:
    """The last batch the reward function saw: samples.jsonl writes it."""

    rollouts: Rollouts
    finished: list[bool]
    rewards: list[float] | None = None  # the weighted sum, before the missing-eot penalty
    components: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    error: str | None = None

    def sample_record(self, index: int) -> dict[str, Any]:
        """What samples.jsonl shows of one sample, beside the step, its KL and its place in the group."""
        rollouts = self.rollouts
        record: dict[str, Any] = {
            "id": rollouts.ids[index],
            "sample": index % rollouts.group_size,
            "prompt": [m.model_dump() for m in rollouts.prompts[index]],
            "response": rollouts.responses[index],
            "reward": None if self.rewards is None else self.rewards[index],
            "finished": self.finished[index],
            "rewards": {name: values[index] for name, values in self.components.items()},
        }
        for name, details in self.details.items():
            record[name] = details[index]
        if self.error is not None:
            record["error"] = self.error
        return record


class CombinedReward:
    """The weighted sum of the reward sources as one TRL reward function (see the module)."""

    def __init__(
        self,
        sources: Sequence[tuple[Any, float]],
        *,
        stop_ids: list[int],
        missing_eot_penalty: float,
        group_size: int,
    ):
        self.sources = list(sources)
        self.stop_ids = stop_ids
        self.missing_eot_penalty = missing_eot_penalty
        self.group_size = group_size
        self.last: RewardedBatch | None = None
        self.on_failure: Callable[[RewardedBatch], None] | None = None  # writes the failed step's samples
        self.judge_description: dict[str, Any] | None = None  # for the manifest
        self.__name__ = "caitool_reward"  # TRL names the reward's log entries after it

    @property
    def scorer(self) -> Any:
        """The reward model's scorer, if one of the sources is a reward model (its truncation count)."""
        return next((s.scorer for s, _ in self.sources if isinstance(s, RewardModelSource)), None)

    def __call__(
        self, prompts, completions, completion_ids, log_metric=None, trainer_state=None, **columns
    ) -> list[float]:
        step = (trainer_state.global_step if trainer_state is not None else 0) + 1
        rollouts = rollouts_from_trl(prompts, completions, columns, step, self.group_size)
        stops = set(self.stop_ids)
        finished = [any(token in stops for token in ids) for ids in completion_ids]
        batch = RewardedBatch(rollouts, finished)
        self.last = batch
        total = [0.0] * len(prompts)
        timings: dict[str, float] = {}
        questions = 0
        for source, weight in self.sources:
            started = time.perf_counter()
            try:
                scored = source.score(rollouts)
            except Exception as err:  # a judge's last retry failed, a server went away...
                batch.error = f"the {source.name} reward failed: {describe_error(err)}"
                if self.on_failure is not None:
                    self.on_failure(batch)
                raise CaitoolError(
                    f"step {step}: {batch.error}; the step's {len(prompts)} samples are in samples.jsonl. "
                    "Rerun the same command to resume from the last checkpoint (--checkpoint-every)"
                ) from err
            timings[source.name] = time.perf_counter() - started
            questions += scored.questions
            batch.components[source.name] = scored.rewards
            if scored.details is not None:
                batch.details[source.name] = scored.details
            total = [t + weight * r for t, r in zip(total, scored.rewards, strict=True)]
        batch.rewards = total
        scores = [
            r - (0.0 if done else self.missing_eot_penalty) for r, done in zip(total, finished, strict=True)
        ]
        if log_metric is not None:
            self._log(log_metric, batch, scores, timings, questions)
        return scores

    def _log(self, log_metric, batch: RewardedBatch, scores, timings, questions) -> None:
        log_metric("caitool/reward", mean(batch.rewards or []))
        for name, values in batch.components.items():
            log_metric(f"caitool/reward_{name}", mean(values))
        log_metric("caitool/missing_eot", sum(not f for f in batch.finished) / len(batch.finished))
        log_metric(
            "caitool/reward_std_in_group",
            mean([stdev([scores[i] for i in g]) for g in batch.rollouts.groups()]),
        )
        if "judge" in timings:
            log_metric("caitool/judge_calls", float(questions))
            log_metric("caitool/judge_seconds", timings["judge"])
        log_metric("caitool/reward_seconds", sum(timings.values()))


def rollouts_from_trl(prompts, completions, columns: dict[str, Any], step: int, group_size: int) -> Rollouts:
    # TRL passes the dataset's columns (one value per sample) beside its own hooks (log_extra...).
    data = {k: v for k, v in columns.items() if isinstance(v, list) and len(v) == len(prompts)}
    # The record's own turns (the policy saw them fitted to its template): the reward model and the
    # judge render them through their own templates, as in ppo.
    prompts = data.pop(RECORD_PROMPT, prompts)
    ids = [str(i) for i in data.get("id", [""] * len(prompts))]
    fields = [{k: v[index] for k, v in data.items()} for index in range(len(prompts))]
    return Rollouts(
        step=step,
        ids=ids,
        prompts=[[Message(**m) for m in prompt] for prompt in prompts],
        responses=[completion[-1]["content"].strip() for completion in completions],
        fields=fields,
        group_size=group_size,
    )


def describe_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def stdev(values: Sequence[float]) -> float:
    """The population standard deviation: how far a group's rewards spread (0: no signal in the group)."""
    centre = mean(values)
    return math.sqrt(mean([(v - centre) ** 2 for v in values]))


# ---------------------------------------------------------------------------
# Building the sources


def judge_backend(spec: str, options: BackendOptions, *, policy_path: str, live: tuple[Any, Any, str]) -> Any:
    """The judge's backend: ``ref`` loads the starting policy again, ``policy`` judges with the very
    model being trained (its weights as they are at each step), anything else is a model spec."""
    from caitool.backends import load_backend

    if spec == "policy":
        from caitool.backends.local import TransformersBackend

        model, tokenizer, device = live
        return TransformersBackend(
            model, tokenizer, model_id="policy", batch_size=options.batch_size, device=device
        )
    return load_backend(policy_path if spec == "ref" else spec, options)


def build_sources(
    spec: RewardSpec,
    *,
    seed: int,
    device: str,
    policy_path: str,
    live_policy: tuple[Any, Any, str],
    trust_remote_code: bool,
) -> tuple[list[tuple[Any, float]], dict[str, Any], dict[str, Any] | None]:
    """The sources with their weights, the local models they read (manifest and run key) and what
    the judge is (its backend's description, the constitution), if there is one."""
    from caitool.backends import is_served
    from caitool.models import model_info, require_full_model

    sources: list[tuple[Any, float]] = []
    models: dict[str, Any] = {}
    judged = None
    if spec.rm is not None:
        from caitool.reward import load_reward_model

        models["reward"] = model_info(spec.rm)
        require_full_model(models["reward"], "the reward model (--rm)")
        scorer = load_reward_model(models["reward"].path, device=device, trust_remote_code=trust_remote_code)
        sources.append((RewardModelSource(scorer), spec.rm_weight))
    if spec.judge is not None:
        from caitool.constitution import load_constitution

        constitution = load_constitution(spec.constitution)
        backend = judge_backend(spec.judge, spec.judge_options, policy_path=policy_path, live=live_policy)
        judge = JudgeSource(
            backend,
            constitution,
            mode=spec.judge_mode,
            principles=spec.principles,
            seed=seed,
            live=spec.judge == "policy",
        )
        sources.append((judge, spec.judge_weight))
        if spec.judge not in SELF_JUDGES and not is_served(spec.judge):
            models["judge"] = model_info(spec.judge)  # its weights' hash keys the run's checkpoints
        described = backend.describe() if spec.judge != "policy" else {"backend": "the policy being trained"}
        described = {k: v for k, v in described.items() if not k.startswith("_")}
        judged = {**described, "spec": spec.judge, "constitution": constitution.ref.model_dump()}
    if spec.rule is not None:
        sources.append((RuleSource(), spec.rule_weight))
    return sources, models, judged


def check_rule_fields(spec: RewardSpec, records: Sequence[Any]) -> None:
    """The rule reads each prompt's ``set``: fail before any model loads when a prompt lacks it."""
    if spec.rule is None:
        return
    missing = [r.id for r in records if "set" not in r.user_fields()]
    if missing:
        raise CaitoolError(
            f'--rule {spec.rule} reads each prompt\'s "set" field ("{RED_TEAM_SET}" or another set); '
            f"{len(missing)} prompts have none, the first: {missing[0]}"
        )


def check_judge_spec(spec: RewardSpec) -> None:
    """A mistyped judge path or a served judge without an address fails before the policy loads."""
    if spec.judge is None or spec.judge in SELF_JUDGES:
        return
    from caitool.backends import check_model_spec

    check_model_spec(spec.judge, spec.judge_options)
