"""``caitool judge-check``: is this feedback model fit to label preferences?

The labeller of ``label-preferences`` is run on comparisons whose better response is known
(``prompt``, ``chosen``, ``rejected``, optional ``principle_id`` and grouping fields such as
``category``), in every option order, and its verdicts are scored against the known answer:

* accuracy: the label (both orders averaged) above 0.5 for the better response; a label
  within ``TIE_MARGIN`` of 0.5 is a tie, counted apart (neither right nor wrong);
* accuracy with the better response shown as (A), and shown as (B): a judge that reads
  positions is right nearly always in one and nearly never in the other;
* order consistency: the share of comparisons whose two orders pick the same response;
* letter mass: the mean probability on the two answer tokens, P(A) + P(B) (score mode:
  P(Yes) + P(No)); a small mass means the label is read from the tail of the distribution;
* calibration: the expected calibration error of the label's confidence max(p, 1 - p),
  and the reliability table behind it;
* seconds per comparison (the labeller's calls only, loading excluded).

Score mode (:mod:`caitool.label`) judges each response alone, so it has no option order and
its position figures are empty. The verdict per mode (thresholds below, quoted in --help):

* **position-biased**: letter modes, |accuracy as (A) - accuracy as (B)| >= POSITION_GAP;
* **near chance**: the 95% Wilson interval of accuracy (ties as half) reaches down to 0.5;
* **fit**: accuracy >= FIT_ACCURACY and, for letter modes, order consistency >= FIT_CONSISTENCY;
* **weak**: better than chance, but below the fit thresholds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from caitool.backends import GenerationBackend, derive_seed, load_backend
from caitool.choices import LabelMode, check_choice
from caitool.constitution import ComparisonPrinciple, Constitution, draw, load_constitution
from caitool.errors import CaitoolError
from caitool.eval_stats import TIE_MARGIN, percent, wilson_interval
from caitool.jsonl_io import batched, read_records, write_json_atomic
from caitool.judge_cache import AnswerCache
from caitool.label import (
    DEFAULT_CLAMP,
    MAX_UNPARSEABLE_SHARE,
    Comparison,
    CostEstimate,
    Labeller,
    Mode,
    Verdict,
)
from caitool.pipeline import Runtime, backend_params, validate_input
from caitool.progress import phase_progress, print_summary
from caitool.provenance import build_manifest, now_iso
from caitool.records import Message, describe_validation_error, parse_prompt_without_response

POSITION_GAP = 0.30
FIT_ACCURACY = 0.75
FIT_CONSISTENCY = 0.75
CONFIDENCE_BINS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_MODES: tuple[Mode, ...] = ("logprob", "score")
CHUNK_FACTOR = 4  # comparisons per labeller call: this many times the backend's parallelism

THRESHOLDS_HELP = (
    f"position-biased: letter modes whose accuracy with the better response shown as (A) and "
    f"as (B) differ by >= {POSITION_GAP:.2f}; near chance: the 95% Wilson interval of accuracy "
    f"(ties as half) reaches 0.5; fit: accuracy >= {FIT_ACCURACY:.2f} and order consistency "
    f">= {FIT_CONSISTENCY:.2f} (letter modes); weak: anything else."
)


# ---------------------------------------------------------------------------
# Input


@dataclass(frozen=True)
class LabelledComparison:
    """A comparison whose better response is known."""

    id: str
    prompt: list[Message]
    chosen: str
    rejected: str
    principle_id: str | None
    fields: dict[str, Any]


def _response_text(value: Any, name: str) -> str:
    """A response given as text, or as a conversation (TRL's layout) ending with an assistant turn."""
    if isinstance(value, str):
        if not value.strip():
            raise CaitoolError(f'field "{name}" is an empty string')
        return value
    if isinstance(value, list) and value:
        try:
            last = Message.model_validate(value[-1])
        except Exception as err:  # pydantic's ValidationError, described in one line
            raise CaitoolError(f'field "{name}": {_describe(err)}') from None
        if last.role != "assistant":
            raise CaitoolError(f'field "{name}" must end with an assistant turn')
        return last.content
    raise CaitoolError(f'field "{name}" must be a string or a list of messages')


def _describe(err: Exception) -> str:
    from pydantic import ValidationError

    return describe_validation_error(err) if isinstance(err, ValidationError) else str(err)


def labelled_parser(constitution: Constitution):
    """The parser of one labelled line; a principle the constitution lacks is an error on that line."""
    known = {p.id for p in constitution.comparisons}

    def parse(raw: dict[str, Any]) -> LabelledComparison:
        raw = dict(raw)
        for name in ("chosen", "rejected"):
            if name not in raw:
                raise CaitoolError(f'missing field "{name}" (judge-check reads prompt, chosen, rejected)')
        chosen = _response_text(raw.pop("chosen"), "chosen")
        rejected = _response_text(raw.pop("rejected"), "rejected")
        principle_id = raw.pop("principle_id", None)
        if principle_id is not None and principle_id not in known:
            raise CaitoolError(
                f'principle_id "{principle_id}" is not a comparison of the {constitution.name} '
                f"constitution (it has: {', '.join(sorted(known))})"
            )
        record = parse_prompt_without_response(
            {k: v for k, v in raw.items() if k != "kind"}, '"chosen" and "rejected"'
        )
        return LabelledComparison(
            id=record.id,
            prompt=record.prompt,
            chosen=chosen,
            rejected=rejected,
            principle_id=principle_id,
            fields=record.user_fields(),
        )

    return parse


# ---------------------------------------------------------------------------
# Scoring verdicts against the known answer


@dataclass(frozen=True)
class Outcome:
    """One comparison judged in one mode: ``p`` is the label's probability that ``chosen`` is better."""

    id: str
    mode: str
    principle_id: str
    p: float
    p_better_as_a: float
    p_better_as_b: float | None
    letter_mass: float | None
    fields: dict[str, Any] = field(default_factory=dict)
    votes: int | None = None  # verdict modes with --samples: the readable votes behind p
    p_interval: tuple[float, float] | None = None  # 95% Wilson interval of the vote share p
    from_cache: bool = False

    @property
    def result(self) -> str:
        """right, wrong or tie."""
        if abs(self.p - 0.5) <= TIE_MARGIN:
            return "tie"
        return "right" if self.p > 0.5 else "wrong"

    @property
    def confidence(self) -> float:
        return max(self.p, 1.0 - self.p)

    @property
    def credit(self) -> float:
        """1 right, 0 wrong, 1/2 tie: what a coin would score on average."""
        return {"right": 1.0, "wrong": 0.0, "tie": 0.5}[self.result]


def outcome_from(item: LabelledComparison, principle: ComparisonPrinciple, mode: str, verdict: Verdict):
    return Outcome(
        id=item.id,
        mode=mode,
        principle_id=principle.id,
        p=verdict.p,
        p_better_as_a=verdict.p_first,
        p_better_as_b=verdict.p_swapped,
        letter_mass=verdict.letter_mass,
        fields=item.fields,
        votes=verdict.votes,
        p_interval=wilson_interval(verdict.p * verdict.votes, verdict.votes) if verdict.votes else None,
        from_cache=verdict.from_cache,
    )


@dataclass
class Figures:
    """What judge-check measures on a set of outcomes of one mode."""

    n: int
    right: int
    wrong: int
    ties: int
    accuracy: float  # right / n
    accuracy_ci: tuple[float, float]  # 95% Wilson interval of right / n
    credit: float  # (right + ties / 2) / n: what a coin scores 0.5 on
    credit_ci: tuple[float, float]
    accuracy_better_as_a: float | None
    accuracy_better_as_b: float | None
    order_consistency: float | None
    mean_letter_mass: float | None
    ece: float
    reliability: list[dict[str, Any]]
    verdict: str
    reason: str


def reliability_table(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """Outcomes grouped by confidence; a calibrated judge is right as often as it is confident."""
    rows = []
    edges = list(zip(CONFIDENCE_BINS, CONFIDENCE_BINS[1:], strict=False))
    for index, (low, high) in enumerate(edges):
        last = index == len(edges) - 1
        members = [o for o in outcomes if low <= o.confidence < high or (last and o.confidence == high)]
        if members:
            rows.append(
                {
                    "bin": f"{low:.1f}-{high:.1f}",
                    "count": len(members),
                    "mean_confidence": sum(o.confidence for o in members) / len(members),
                    "accuracy": sum(o.credit for o in members) / len(members),
                }
            )
    return rows


def expected_calibration_error(table: Sequence[dict[str, Any]]) -> float:
    total = sum(row["count"] for row in table)
    if not total:
        return 0.0
    return sum(row["count"] * abs(row["accuracy"] - row["mean_confidence"]) for row in table) / total


def _share(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def figures_of(outcomes: Sequence[Outcome]) -> Figures:
    n = len(outcomes)
    right = sum(o.result == "right" for o in outcomes)
    wrong = sum(o.result == "wrong" for o in outcomes)
    ties = n - right - wrong
    swapped = [o for o in outcomes if o.p_better_as_b is not None]
    masses = [o.letter_mass for o in outcomes if o.letter_mass is not None]
    table = reliability_table(outcomes)
    figures = Figures(
        n=n,
        right=right,
        wrong=wrong,
        ties=ties,
        accuracy=right / n if n else 0.0,
        accuracy_ci=wilson_interval(right, n),
        credit=(right + ties / 2) / n if n else 0.0,
        credit_ci=wilson_interval(right + ties / 2, n),
        accuracy_better_as_a=_share([o.p_better_as_a > 0.5 for o in swapped]),
        accuracy_better_as_b=_share([o.p_better_as_b > 0.5 for o in swapped]),  # type: ignore[operator]
        order_consistency=_share(
            [(o.p_better_as_a > 0.5) == (o.p_better_as_b > 0.5) for o in swapped]  # type: ignore[operator]
        ),
        mean_letter_mass=sum(masses) / len(masses) if masses else None,
        ece=expected_calibration_error(table),
        reliability=table,
        verdict="",
        reason="",
    )
    figures.verdict, figures.reason = judge_fitness(figures)
    return figures


def judge_fitness(f: Figures) -> tuple[str, str]:
    """The verdict and the figures that decided it (thresholds in the module docstring)."""
    if f.accuracy_better_as_a is not None and f.accuracy_better_as_b is not None:
        gap = abs(f.accuracy_better_as_a - f.accuracy_better_as_b)
        if gap >= POSITION_GAP:
            return "position-biased", (
                f"the better response was picked {percent(f.accuracy_better_as_a)} of the time when shown "
                f"as (A) and {percent(f.accuracy_better_as_b)} when shown as (B) "
                f"(gap {gap:.2f} >= {POSITION_GAP:.2f})"
            )
    low, high = f.credit_ci
    if low <= 0.5:
        return "near chance", (
            f"accuracy {percent(f.accuracy)} with {f.ties} ties; counting ties as half right, "
            f"{percent(f.credit)} with a 95% interval [{percent(low)}, {percent(high)}] that reaches 50%"
        )
    consistent = f.order_consistency is None or f.order_consistency >= FIT_CONSISTENCY
    if f.accuracy >= FIT_ACCURACY and consistent:
        shown = f"accuracy {percent(f.accuracy)} >= {percent(FIT_ACCURACY)}"
        if f.order_consistency is not None:
            shown += f", order consistency {percent(f.order_consistency)}"
        return "fit", shown
    shortfalls = []
    if f.accuracy < FIT_ACCURACY:
        shortfalls.append(f"accuracy {percent(f.accuracy)} < {percent(FIT_ACCURACY)}")
    if not consistent:
        shortfalls.append(f"order consistency {percent(f.order_consistency)} < {percent(FIT_CONSISTENCY)}")
    return "weak", "better than chance, but " + " and ".join(shortfalls)


# ---------------------------------------------------------------------------
# The run


@dataclass
class ModeReport:
    mode: str
    overall: Figures
    groups: dict[str, dict[str, Figures]]
    seconds_per_comparison: float
    # verdict modes: answers read, answers that named no option, comparisons left out for it
    unparseable: dict[str, int] = field(default_factory=dict)
    samples: int = 0


@dataclass
class JudgeCheckResult:
    model: str
    modes: list[ModeReport]
    outcomes: list[Outcome]
    usage: dict[str, int] = field(default_factory=dict)  # requests and billed tokens (served judges)


def group_figures(outcomes: Sequence[Outcome], by: Sequence[str]) -> dict[str, dict[str, Figures]]:
    """Figures per value of each grouping field (records without the field are left out of it)."""
    groups: dict[str, dict[str, Figures]] = {}
    for name in by:
        values = sorted({str(o.fields[name]) for o in outcomes if name in o.fields})
        if values:
            members = {value: [o for o in outcomes if str(o.fields.get(name)) == value] for value in values}
            groups[name] = {value: figures_of(group) for value, group in members.items()}
    return groups


def _principles_for(
    items: Sequence[LabelledComparison], constitution: Constitution, candidates, seed: int
) -> list[ComparisonPrinciple]:
    """Each record's own principle, or one drawn (seeded by the record id) from the candidates."""
    return [
        constitution.comparison(item.principle_id)
        if item.principle_id
        else draw(candidates, random.Random(derive_seed(seed, "judge-check", item.id)))
        for item in items
    ]


def _judge_mode(
    labeller: Labeller,
    items: Sequence[LabelledComparison],
    principles: Sequence[ComparisonPrinciple],
    chunk_size: int,
    seed: int,
) -> tuple[list[Outcome], float]:
    """Every comparison judged in one mode (both orders); the outcomes and the seconds spent judging."""
    outcomes: list[Outcome] = []
    spent = 0.0
    pairs = list(zip(items, principles, strict=True))
    with phase_progress(f"judge-check: {labeller.mode}", len(items)) as tracker:
        for index, chunk in enumerate(batched(pairs, chunk_size)):
            comparisons = [Comparison(i.prompt, i.chosen, i.rejected, p) for i, p in chunk]
            started = time.perf_counter()
            verdicts = labeller.judge(comparisons, seed=derive_seed(seed, labeller.mode, index))
            spent += time.perf_counter() - started
            outcomes.extend(
                outcome_from(i, p, labeller.mode, v)
                for (i, p), v in zip(chunk, verdicts, strict=True)
                if not v.unparseable  # left out, and counted, never guessed
            )
            tracker.advance(len(chunk))
    return outcomes, spent


def run_judge_check(
    input_path: str | Path,
    *,
    model: str = "default",
    constitution: str = "harmless",
    principles: Sequence[str] | None = None,
    modes: Sequence[str] = DEFAULT_MODES,
    by: Sequence[str] = ("category",),
    clamp: tuple[float, float] | None = DEFAULT_CLAMP,
    cot_max_new_tokens: int = 128,
    samples: int = 0,
    cache: str | Path | None = None,
    max_unparseable: float = MAX_UNPARSEABLE_SHARE,
    dry_run: bool = False,
    output: str | Path | None = None,
    runtime: Runtime | None = None,
    backend: GenerationBackend | None = None,
) -> JudgeCheckResult | CostEstimate:
    """Judge every labelled comparison in every mode and score the verdicts; ``output``: JSON report.

    With ``dry_run`` nothing is loaded or sent: the requests and tokens it would take are
    printed and returned.
    """
    runtime = runtime or Runtime()
    started = now_iso()
    modes = list(dict.fromkeys(modes))
    for mode in modes:
        check_choice("--mode", mode, LabelMode)
    charter = load_constitution(constitution)
    candidates = charter.restrict_comparisons(principles)
    source = validate_input(input_path, labelled_parser(charter))
    if source.total == 0:
        raise CaitoolError(f"{input_path} holds no comparisons")
    items = list(read_records(source.path, labelled_parser(charter)))
    chosen_principles = _principles_for(items, charter, candidates, runtime.seed)
    options = {
        "swap": True,
        "clamp": clamp,
        "cot_max_new_tokens": cot_max_new_tokens,
        "max_unparseable": max_unparseable,
    }

    def samples_for(mode: str) -> int:
        return samples if mode.startswith("verdict") else 0

    if dry_run:
        comparisons = [
            Comparison(i.prompt, i.chosen, i.rejected, p)
            for i, p in zip(items, chosen_principles, strict=True)
        ]
        estimate = CostEstimate(0, 0, 0)
        for mode in modes:
            labeller = Labeller(None, charter, mode=mode, samples=samples_for(mode), **options)  # type: ignore[arg-type]
            estimate = estimate + labeller.cost_estimate(comparisons)
        print_summary(
            estimate.line(f"judge-check --mode {' --mode '.join(modes)} on {len(items)} comparisons")
        )
        return estimate
    answer_cache = AnswerCache(cache) if cache is not None else None
    backend = backend or load_backend(model, runtime.backend)
    chunk_size = CHUNK_FACTOR * backend.parallelism

    reports: list[ModeReport] = []
    outcomes: list[Outcome] = []
    for mode in modes:
        labeller = Labeller(
            backend,
            charter,
            mode=mode,
            samples=samples_for(mode),
            cache=answer_cache,
            **options,  # type: ignore[arg-type]
        )
        mode_outcomes, seconds = _judge_mode(labeller, items, chosen_principles, chunk_size, runtime.seed)
        outcomes.extend(mode_outcomes)
        reports.append(
            ModeReport(
                mode=mode,
                overall=figures_of(mode_outcomes),
                groups=group_figures(mode_outcomes, by),
                seconds_per_comparison=seconds / len(items),
                unparseable=labeller.unparseable_counts(),
                samples=samples_for(mode),
            )
        )
    result = JudgeCheckResult(model=backend.model_id, modes=reports, outcomes=outcomes, usage=backend.stats())
    if output is not None:
        manifest = build_manifest(
            phase="judge-check",
            params={
                "modes": modes,
                "principles": list(principles or []),
                "by": list(by),
                "clamp": list(clamp) if clamp else None,
                "cot_max_new_tokens": cot_max_new_tokens,
                **({"samples": samples} if samples else {}),
                **backend_params(model, runtime),
            },
            started_at=started,
            models={"feedback": backend.describe()},
            inputs=[input_path],
            constitution=charter.ref,
            counts={
                "comparisons": len(items),
                **backend.stats(),
                **(answer_cache.stats() if answer_cache is not None else {}),
            },
        )
        write_json_atomic(Path(output), report_json(result, manifest))
    return result


def report_json(result: JudgeCheckResult, manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "judge_check",
        "model": result.model,
        "thresholds": {
            "position_gap": POSITION_GAP,
            "fit_accuracy": FIT_ACCURACY,
            "fit_order_consistency": FIT_CONSISTENCY,
            "tie_margin": TIE_MARGIN,
            "rules": THRESHOLDS_HELP,
        },
        "modes": {
            r.mode: {
                "verdict": r.overall.verdict,
                "reason": r.overall.reason,
                "seconds_per_comparison": r.seconds_per_comparison,
                **({"unparseable": r.unparseable} if r.unparseable else {}),
                **({"samples": r.samples} if r.samples else {}),
                "overall": asdict(r.overall),
                "groups": {
                    name: {value: asdict(f) for value, f in values.items()}
                    for name, values in r.groups.items()
                },
            }
            for r in result.modes
        },
        "comparisons": [{**asdict(o), "result": o.result} for o in result.outcomes],
        "manifest": manifest,
    }
