"""``caitool eval``: compare models on held-out prompts.

For every prompt set (one JSONL file each) and every model, eval generates answers, then
measures each answer (refusal class, length, reward-model score) and asks the AI labeller which
of two models answered better, for every pair of models and every prompt. Run on red-team
and on helpful prompts together it shows whether a model became more harmless without
becoming evasive: the refusal rate on helpful prompts is the evasiveness check.

Output directory:

* ``prompts/SET.jsonl``: a prompt set read from CSV, parquet, JSON or a hub dataset, as caitool
  prompt records (see :mod:`caitool.prompt_sets`); a caitool JSONL file is read where it is
* ``generations/SET.MODEL.jsonl``: the raw generation records (resumable, one per model and set)
* ``generations.jsonl``: one ``eval_answer`` record per model per prompt
* ``judgements.jsonl``: one ``judgement`` record per pair of models per prompt
* ``summary.json``: the per-model and per-pair figures (written last: its presence means done)
* ``caitool_manifest.json``: provenance
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from caitool import backends
from caitool.backends import GenerationBackend, SamplingParams, check_model_spec, derive_seed
from caitool.choices import LabelMode, check_choice
from caitool.constitution import draw, load_constitution
from caitool.errors import CaitoolError
from caitool.eval_stats import (  # noqa: F401 - the statistics stay importable from here
    REFUSAL_PATTERNS,
    ModelSummary,
    PairSummary,
    bootstrap_mean_interval,
    is_refusal,
    summarise_answers,
    summarise_models,
    summarise_pair,
    summarise_pairs,
    wilson_interval,
    winner_of,
    word_count,
)
from caitool.jsonl_io import manifest_path, read_records, write_json_atomic, write_jsonl_atomic
from caitool.pipeline import Runtime, validate_input
from caitool.progress import print_summary
from caitool.prompt_sets import PromptFields, convert_prompt_set, needs_conversion, parse_eval_prompt
from caitool.provenance import MODEL_MANIFEST, build_manifest, now_iso
from caitool.records import (
    EvalAnswerRecord,
    GenerationRecord,
    JudgementRecord,
    Message,
    PromptRecord,
    parse_record,
)
from caitool.refusals import classify_answer, classify_with_judge
from caitool.run_key import KeyFile

SUMMARY_FILE = "summary.json"
ANSWERS_FILE = "generations.jsonl"
JUDGEMENTS_FILE = "judgements.jsonl"
GENERATIONS_DIR = "generations"
PROMPTS_DIR = "prompts"

# ---------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class ModelSpec:
    name: str
    spec: str


def parse_model_specs(values: Sequence[str]) -> list[ModelSpec]:
    """``--model NAME=PATH`` or ``--model PATH`` (named after the directory); names must be unique."""
    if not values:
        raise CaitoolError("give at least one --model")
    specs: list[ModelSpec] = []
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep:
            spec = value
            name = "default" if value == "default" else Path(value.rstrip("/")).name
        if not name or not spec:
            raise CaitoolError(f'--model "{value}": expected NAME=PATH or PATH')
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise CaitoolError(f'--model "{value}": the name may use letters, digits, ".", "_" and "-" only')
        if any(s.name == name for s in specs):
            raise CaitoolError(f'--model: the name "{name}" is given twice; name models with NAME=PATH')
        specs.append(ModelSpec(name=name, spec=spec))
    return specs


def model_pairs(models: Sequence[ModelSpec]) -> list[tuple[ModelSpec, ModelSpec]]:
    """Every pair once, the model given later first: "ppo vs base" reads as how often ppo won."""
    return [(later, earlier) for earlier, later in itertools.combinations(models, 2)]


def prompt_set_names(paths: Sequence[str | Path]) -> list[str]:
    """Each prompt file's name without extension; two files with one name are an error."""
    names = [Path(p).name.split(".")[0] for p in paths]
    for name in names:
        if names.count(name) > 1:
            raise CaitoolError(
                f'two prompt files are named "{name}"; rename one so the results can be told apart'
            )
    return names


# ---------------------------------------------------------------------------
# The run


# A reward scorer takes (prompt, answer) pairs and returns one scalar per pair.
RewardScorer = Callable[[list[tuple[list[Message], str]]], list[float]]
JUDGE_CHUNK = 32  # comparisons per labeller call: one progress step, bounded memory
PATTERNS = "patterns"  # classified_by when caitool.refusals' patterns counted


@dataclass(frozen=True)
class EvalConfig:
    """What shapes eval's figures besides the models: how they answer, and how the judge asks."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 0.95
    swap: bool = True
    judge_mode: LabelMode = "logprob"  # the labeller's mode, as in label-preferences
    judge_samples: int = 0  # verdict modes: votes per question where the judge returns no log-probs
    judge_cache: str | None = None  # the judge's answers looked up and kept here (--cache)

    def __post_init__(self) -> None:
        check_choice("--judge-mode", self.judge_mode, LabelMode)
        if self.judge_samples and not self.judge_mode.startswith("verdict"):
            raise CaitoolError(
                f"--judge-samples applies to the verdict modes only, not --judge-mode {self.judge_mode}"
            )

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens, n=1
        )


@dataclass
class EvalResult:
    models: list[ModelSummary]
    pairs: list[PairSummary]
    output_dir: Path


@dataclass
class EvalPlan:
    """Everything eval checked before loading a model: the models, prompt sets, judge and reward model."""

    prompt_files: list[str | Path]
    models: list[ModelSpec]
    set_names: list[str]
    sources: list[Any]
    charter: Any  # the constitution the judge uses; None when nothing is judged
    judge: str | None
    rm: str | None
    output_dir: Path
    started_at: str
    refusal_judge: str | None = None
    fields: PromptFields = PromptFields()

    @property
    def judging(self) -> bool:
        return self.charter is not None and self.judge is not None


def run_eval(
    prompt_files: Sequence[str | Path],
    model_values: Sequence[str],
    output_dir: str | Path,
    *,
    rm: str | None = None,
    judge: str | None = "default",
    constitution: str = "harmless",
    config: EvalConfig | None = None,
    runtime: Runtime | None = None,
    refusal_judge: str | None = None,
    fields: PromptFields | None = None,
    load_backend: Callable[[str], GenerationBackend] | None = None,
    make_reward_scorer: Callable[[str], RewardScorer] | None = None,
) -> EvalResult:
    """Generate, measure, judge and summarise.

    ``refusal_judge`` (a model spec) classifies every answer as comply, refuse or partial in
    place of the patterns; ``fields`` says which columns of the prompt files hold the prompt,
    its expectation and category. ``load_backend`` (model spec -> backend, for the evaluated
    models and the judges) and ``make_reward_scorer`` (RM directory -> scorer) let tests
    inject fakes.
    """
    config = config or EvalConfig()
    runtime = runtime or Runtime()
    plan = _plan(
        prompt_files,
        model_values,
        output_dir,
        rm=rm,
        judge=judge,
        constitution=constitution,
        refusal_judge=refusal_judge,
        fields=fields or PromptFields(),
    )
    if load_backend is None:
        judges = ([plan.judge] if plan.judging else []) + ([refusal_judge] if refusal_judge else [])
        for spec in [m.spec for m in plan.models] + judges:
            check_model_spec(spec, runtime.backend)
        load_backend = functools.partial(backends.load_backend, options=runtime.backend)
    if rm is not None and make_reward_scorer is None:
        check_model_spec(rm)

    answers: list[EvalAnswerRecord] = []
    model_ids: dict[str, Any] = {}
    for model in plan.models:
        outputs = _generate_for_model(model, plan, config.sampling(), runtime, load_backend)
        for set_name, path in outputs:
            answers.extend(_answers_from(path, set_name, model.name))
        model_ids[model.name] = _model_info_from(outputs[0][1])
    if rm is not None:
        _attach_rewards(answers, (make_reward_scorer or _reward_scorer(runtime))(rm))
        gc.collect()  # the reward model is no longer referenced; free it before the judge loads
    kept_backend: GenerationBackend | None = None
    if refusal_judge is not None:
        refusal_backend = load_backend(refusal_judge)
        model_ids["refusal_judge"] = refusal_backend.describe()
        _classify_by_judge(answers, refusal_backend)
        if plan.judging and plan.judge == refusal_judge:
            kept_backend = refusal_backend  # one model, loaded once, for both questions
        del refusal_backend
        gc.collect()
    judgements: list[JudgementRecord] = []
    if plan.judging:
        judge_backend = kept_backend or load_backend(plan.judge)  # type: ignore[arg-type]
        model_ids["judge"] = judge_backend.describe()
        judgements, judge_counts = _judge_all(answers, plan, judge_backend, config, runtime.seed)
        model_ids["judge"]["usage"] = {**judge_backend.stats(), **judge_counts}
    if rm is not None:
        model_ids["rm"] = _describe_model(rm)
    return _write_results(plan, answers, judgements, model_ids, config, runtime)


def _plan(
    prompt_files: Sequence[str | Path],
    model_values: Sequence[str],
    output_dir: str | Path,
    *,
    rm: str | None,
    judge: str | None,
    constitution: str,
    refusal_judge: str | None = None,
    fields: PromptFields = PromptFields(),
) -> EvalPlan:
    started = now_iso()
    models = parse_model_specs(model_values)
    set_names = prompt_set_names(prompt_files)
    # Published sets are read and checked in memory first: a bad row leaves no output behind.
    converted = {
        name: convert_prompt_set(str(path), fields)
        for name, path in zip(set_names, prompt_files, strict=True)
        if needs_conversion(path, fields)
    }
    sources: list[Any] = [
        None if name in converted else validate_input(path, parse_eval_prompt)
        for name, path in zip(set_names, prompt_files, strict=True)
    ]
    charter = load_constitution(constitution) if judge and len(models) > 1 else None
    if charter is not None:
        charter.restrict_comparisons(None)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise CaitoolError(f"{output_dir} exists and is not a directory; choose another -o")
    (output_dir / GENERATIONS_DIR).mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(set_names):
        if name in converted:
            sources[index] = validate_input(
                _write_prompts(output_dir, name, converted[name]), parse_eval_prompt
            )
    return EvalPlan(
        list(prompt_files),
        models,
        set_names,
        sources,
        charter,
        judge,
        rm,
        output_dir,
        started,
        refusal_judge=refusal_judge,
        fields=fields,
    )


def _write_prompts(output_dir: Path, set_name: str, records: list[PromptRecord]) -> Path:
    """A converted prompt set as caitool prompt records; rewritten only when it changed (it keys resume)."""
    (output_dir / PROMPTS_DIR).mkdir(exist_ok=True)
    path = output_dir / PROMPTS_DIR / f"{set_name}.jsonl"
    text = "".join(r.to_json() + "\n" for r in records)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        write_jsonl_atomic(path, records)
    return path


def _write_results(
    plan: EvalPlan,
    answers: list[EvalAnswerRecord],
    judgements: list[JudgementRecord],
    model_ids: dict[str, Any],
    config: EvalConfig,
    runtime: Runtime,
) -> EvalResult:
    """Summaries, then every file of the output directory (summary.json last: it means done)."""
    seed = runtime.seed
    names = [m.name for m in plan.models]
    model_summaries = summarise_models(answers, plan.set_names, names, seed=seed)
    pairs = [(a.name, b.name) for a, b in model_pairs(plan.models)]
    pair_summaries = summarise_pairs(judgements, plan.set_names, pairs, seed=seed)
    output_dir = plan.output_dir
    write_jsonl_atomic(output_dir / ANSWERS_FILE, answers)
    write_jsonl_atomic(output_dir / JUDGEMENTS_FILE, judgements)
    manifest = build_manifest(
        phase="eval",
        params={
            **asdict(config),
            "seed": seed,
            "resume": runtime.resume,
            "backend": asdict(runtime.backend),
            "rm": plan.rm,
            "judge": plan.judge,
            "refusal_judge": plan.refusal_judge,
            "prompt_fields": asdict(plan.fields),
            "models": [asdict(m) for m in plan.models],
        },
        started_at=plan.started_at,
        models=model_ids,
        inputs=plan.prompt_files,
        constitution=plan.charter.ref if plan.charter is not None else None,
        counts={"answers": len(answers), "judgements": len(judgements)},
    )
    write_json_atomic(output_dir / MODEL_MANIFEST, manifest)
    summary = {
        "prompt_sets": plan.set_names,
        "models": [{"name": m.name, "spec": m.spec} for m in plan.models],
        "per_model": [asdict(s) for s in model_summaries],
        "pairwise": [asdict(p) for p in pair_summaries],
        "refusal_classifier": _classifier_note(plan, model_ids),
        "refusal_patterns": list(REFUSAL_PATTERNS),
        **({"judge_usage": model_ids["judge"]["usage"]} if isinstance(model_ids.get("judge"), dict) else {}),
    }
    write_json_atomic(output_dir / SUMMARY_FILE, summary)
    print_summary(f"eval: {len(answers)} answers, {len(judgements)} judgements; wrote {output_dir}")
    return EvalResult(models=model_summaries, pairs=pair_summaries, output_dir=output_dir)


def _classifier_note(plan: EvalPlan, model_ids: dict[str, Any]) -> dict[str, Any]:
    """Which classifier's classes counted in every refusal figure of the summary."""
    if plan.refusal_judge is None:
        return {"counted": PATTERNS, "module": "caitool.refusals"}
    return {"counted": "judge", "judge": plan.refusal_judge, "model": model_ids.get("refusal_judge")}


def _describe_model(spec: str) -> Any:
    """Path and weights hash of a model directory for the manifest; an injected fake stays a name."""
    from caitool.models import model_info

    try:
        return model_info(spec)
    except CaitoolError:
        return spec


# ---------------------------------------------------------------------------
# Generation, kept across runs


def _generate_for_model(
    model: ModelSpec,
    plan: EvalPlan,
    params: SamplingParams,
    runtime: Runtime,
    load_backend: Callable[[str], GenerationBackend],
) -> list[tuple[str, Path]]:
    """Generate one model's answers to every set; a set whose output is already complete is kept."""
    from caitool.generate import run_generate

    outputs = [(s, plan.output_dir / GENERATIONS_DIR / f"{s}.{model.name}.jsonl") for s in plan.set_names]
    keyed = [
        (source, path, _generation_key(source.path, model.spec, params, runtime.seed, runtime.backend.engine))
        for source, (_, path) in zip(plan.sources, outputs, strict=True)
    ]
    pending = [
        (source, path, key)
        for source, path, key in keyed
        if not (runtime.resume and path.exists() and _key_file(path).matches(key))
    ]
    if not pending:
        return outputs
    backend = load_backend(model.spec)
    for source, path, key in pending:
        run_generate(
            source.path,
            path,
            # With a backend given, ``model`` only names the run in the resume key: adding the
            # weights hash keeps a killed run of an older model from being resumed into this one.
            model=f"{model.spec}@{key['weights']}",
            params=params,
            runtime=runtime,
            backend=backend,
        )
        _key_file(path).write(key)
    del backend
    gc.collect()
    return outputs


def _generation_key(
    prompts: Path, spec: str, params: SamplingParams, seed: int, engine: str = "transformers"
) -> dict[str, Any]:
    """What shapes a generation file: the prompts' content, the model's weights, sampling and seed.

    The weights hash (cached by path, size and mtime, so cheap after the first run) matters:
    a model directory retrained under the same path must not be judged by its old answers.
    """
    from caitool.provenance import file_sha256

    return {
        "prompts_sha256": file_sha256(prompts),
        "model": spec,
        "weights": _weights_id(spec),
        **asdict(params),
        "seed": seed,
        # Named only for another engine on a local model, so the keys of existing outputs stand.
        **({"engine": engine} if engine != "transformers" and not backends.is_served(spec) else {}),
    }


def _weights_id(spec: str) -> str:
    from caitool.models import model_info

    if backends.is_served(spec):
        # What a server serves cannot be checked from here; the spec and settings key its answers.
        return "served"
    try:
        return model_info(spec).sha256
    except CaitoolError:
        return "unresolved"  # an injected test backend has no directory


def _key_file(path: Path) -> KeyFile:
    return KeyFile(path.with_name(path.name + ".eval-key.json"))


def _model_info_from(generation_file: Path) -> Any:
    manifest = manifest_path(generation_file)
    if manifest.exists():
        return json.loads(manifest.read_text()).get("models", {}).get("policy")
    return None


def _answers_from(path: Path, set_name: str, model_name: str) -> list[EvalAnswerRecord]:
    answers = []
    for generation in read_records(path, lambda raw: parse_record(GenerationRecord, raw)):
        assert isinstance(generation, GenerationRecord)
        text = generation.responses[0]
        pattern_class = classify_answer(text)
        extra = generation.user_fields()
        category = extra.pop("category", None)
        answers.append(
            EvalAnswerRecord(
                id=f"{set_name}/{model_name}/{generation.id}",
                prompt_id=generation.id,
                prompt_set=set_name,
                model_name=model_name,
                model=generation.model,
                prompt=generation.prompt,
                completion=generation.completion,
                num_words=word_count(text),
                finished=generation.finished[0],
                refused=pattern_class != "comply",
                answer_class=pattern_class,
                classified_by=PATTERNS,
                pattern_class=pattern_class,
                category=None if category is None else str(category),
                **extra,
            )
        )
    return answers


def _classify_by_judge(answers: list[EvalAnswerRecord], backend: GenerationBackend) -> None:
    """The refusal judge's class replaces the patterns' on every answer (which stays recorded)."""
    from caitool.progress import phase_progress

    with phase_progress("eval: refusal judge", len(answers)) as tracker:
        for start in range(0, len(answers), JUDGE_CHUNK):
            chunk = answers[start : start + JUDGE_CHUNK]
            verdicts = classify_with_judge(backend, [(a.prompt, a.completion[-1].content) for a in chunk])
            for answer, (answer_class, probs) in zip(chunk, verdicts, strict=True):
                answer.answer_class = answer_class
                answer.judge_class_probs = probs
                answer.classified_by = "judge"
                answer.refused = answer_class != "comply"
            tracker.advance(len(chunk))


def _reward_scorer(runtime: Runtime) -> Callable[[str], RewardScorer]:
    def make(rm_dir: str) -> RewardScorer:
        from caitool.reward import load_reward_model, truncation_note

        options = runtime.backend
        reward_model = load_reward_model(
            rm_dir, batch_size=options.batch_size, trust_remote_code=options.trust_remote_code
        )

        def score(pairs: list[tuple[list[Message], str]]) -> list[float]:
            reward_model.truncated = 0
            scores = reward_model.score([prompt for prompt, _ in pairs], [answer for _, answer in pairs])
            if reward_model.truncated:
                print_summary(f"eval: rewards of {rm_dir}{truncation_note(reward_model)}")
            return scores

        return score

    return make


def _attach_rewards(answers: list[EvalAnswerRecord], scorer: RewardScorer) -> None:
    scores = scorer([(a.prompt, a.completion[-1].content) for a in answers])
    for answer, score in zip(answers, scores, strict=True):
        answer.reward = float(score)


def _judgement_plan(
    answers: Sequence[EvalAnswerRecord], plan: EvalPlan, seed: int
) -> list[tuple[str, str, str, str, Any]]:
    """(set, prompt id, model a, model b, principle) for every pair of models on every prompt;
    one principle per prompt, shared by all its pairs."""
    principles = plan.charter.restrict_comparisons(None)
    first_model = plan.models[0].name
    planned = []
    for set_name in plan.set_names:
        prompt_ids = [a.prompt_id for a in answers if (a.prompt_set, a.model_name) == (set_name, first_model)]
        for prompt_id in prompt_ids:
            principle = draw(principles, random.Random(derive_seed(seed, "eval", set_name, prompt_id)))
            for a, b in model_pairs(plan.models):
                planned.append((set_name, prompt_id, a.name, b.name, principle))
    return planned


def _judge_all(
    answers: Sequence[EvalAnswerRecord],
    plan: EvalPlan,
    judge_backend: GenerationBackend,
    config: EvalConfig,
    seed: int,
) -> tuple[list[JudgementRecord], dict[str, int]]:
    """Every planned comparison judged: the judgements, and the judge's answer counts (verdict modes,
    cache)."""
    from caitool.judge_cache import AnswerCache
    from caitool.label import Comparison, Labeller
    from caitool.progress import phase_progress

    by_key = {(a.prompt_set, a.model_name, a.prompt_id): a for a in answers}
    charter = plan.charter
    planned = _judgement_plan(answers, plan, seed)
    cache = AnswerCache(config.judge_cache) if config.judge_cache else None
    labeller = Labeller(
        judge_backend,
        charter,
        swap=config.swap,
        mode=config.judge_mode,
        samples=config.judge_samples,
        cache=cache,
    )
    judge_id = judge_backend.model_id
    judgements: list[JudgementRecord] = []
    with phase_progress("eval: judge", len(planned)) as tracker:
        for start in range(0, len(planned), JUDGE_CHUNK):
            chunk = planned[start : start + JUDGE_CHUNK]
            comparisons = [
                Comparison(
                    by_key[(s, a, pid)].prompt,
                    by_key[(s, a, pid)].completion[-1].content,
                    by_key[(s, b, pid)].completion[-1].content,
                    principle,
                )
                for s, pid, a, b, principle in chunk
            ]
            verdicts = labeller.judge(comparisons, seed=derive_seed(seed, "judge", start))
            for (s, pid, a, b, principle), verdict in zip(chunk, verdicts, strict=True):
                if verdict.unparseable:  # counted in the judge's usage, never guessed
                    continue
                judgements.append(
                    JudgementRecord(
                        id=f"{s}/{a}-vs-{b}/{pid}",
                        prompt_id=pid,
                        prompt_set=s,
                        model_a=a,
                        model_b=b,
                        principle_id=principle.id,
                        p_a=verdict.p,
                        p_first=verdict.p_first,
                        p_swapped=verdict.p_swapped,
                        winner=winner_of(verdict.p_first, verdict.p_swapped),
                        judge=judge_id,
                        samples=config.judge_samples or None,
                        from_cache=verdict.from_cache if cache is not None else None,
                        constitution=charter.ref,
                    )
                )
            tracker.advance(len(chunk))
    counts = {**labeller.unparseable_counts(), **(cache.stats() if cache is not None else {})}
    return judgements, counts
