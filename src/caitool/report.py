"""``caitool report``: one self-contained HTML page about a run directory.

The page reads the layout ``make demo`` writes (``RUN_LAYOUT`` below) and shows, step by
step: what each step produced and how long it took, the constitution, revisions before and
after with their principles, the preference labels and how often the two option orders
disagreed, the reward model's held-out accuracy and calibration, the curves of the RL stage
that ran (PPO, RLOO or DPO) and the eval tables. A step whose artifact is missing gets a
"not run" note instead of a section that breaks. Plots are matplotlib PNGs embedded as data
URIs and the CSS is inline, so the file stands alone (mail it, attach it to an issue).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caitool.errors import CaitoolError
from caitool.jsonl_io import iter_json_lines, manifest_path, read_records
from caitool.provenance import MODEL_MANIFEST, now_iso
from caitool.records import EvalAnswerRecord, PreferenceRecord, RevisionRecord, parse_record

# File names inside a run directory (the Makefile's demo targets write exactly these).
PROMPTS = "prompts.jsonl"
BASE = "base.jsonl"
ROUND_FILE = re.compile(r"round(\d+)\.(critique|revise)\.jsonl$")
SFT_DIR = "sft"
PAIRS = "pairs.jsonl"
PREFS = "prefs.jsonl"
RM_DIR = "rm"
RM_METRICS = "metrics.json"
PPO_DIR = "ppo"
PPO_SAMPLES = "samples.jsonl"
REVISION_PAIRS = "revision-pairs.jsonl"
# The RL stage a run took (make demo ALGO=...): its directory and its label. rloo logs ppo's figures.
RL_STAGES = {"ppo": "PPO", "rloo": "RLOO", "dpo": "DPO"}
EVAL_DIR = "eval"
EVAL_SUMMARY = "summary.json"
TRAINING_LOG = "training_log.jsonl"
TIMINGS = "timings.tsv"

SAMPLE_REVISIONS = 3
TEXT_LIMIT = 900


# ---------------------------------------------------------------------------
# Reading the run directory


@dataclass
class StepInfo:
    """One pipeline step as the overview table shows it."""

    name: str
    artifact: Path
    done: bool
    count: str = ""
    seconds: float | None = None
    peak_mb: float | None = None


@dataclass
class Run:
    root: Path
    timings: dict[str, tuple[float, float]] = field(default_factory=dict)  # step -> (seconds, peak MB)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def rounds(self) -> list[tuple[int, str, Path]]:
        """(round number, "critique"|"revise", path) for every finished round file, in order."""
        found = []
        for candidate in self.root.glob("round*.jsonl"):
            match = ROUND_FILE.search(candidate.name)
            if match:
                found.append((int(match.group(1)), match.group(2), candidate))
        return sorted(found, key=lambda item: (item[0], item[1] == "revise"))

    def last_revise(self) -> Path | None:
        revised = [path for _, kind, path in self.rounds() if kind == "revise"]
        return revised[-1] if revised else None

    def rl_stages(self) -> list[str]:
        """The RL stages that ran here; ppo (shown as not run) when none did."""
        return [stage for stage in RL_STAGES if self.path(stage).exists()] or [PPO_DIR]


def read_timings(path: Path) -> dict[str, tuple[float, float]]:
    """timings.tsv: "step<TAB>seconds<TAB>peak KB" lines; a rerun step's last line wins."""
    timings: dict[str, tuple[float, float]] = {}
    if not path.exists():
        return timings
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            try:
                timings[parts[0]] = (float(parts[1]), float(parts[2]) / 1024)
            except ValueError:
                continue
    return timings


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CaitoolError(f"invalid JSON ({err.msg})", where=str(path)) from None


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in iter_json_lines(path)] if path.exists() else []


def count_lines(path: Path) -> int:
    return sum(1 for _ in iter_json_lines(path)) if path.exists() else 0


def manifest_seconds(manifest: dict[str, Any] | None) -> float | None:
    from datetime import datetime

    if not manifest or not manifest.get("started_at") or not manifest.get("finished_at"):
        return None
    started = datetime.fromisoformat(manifest["started_at"])
    finished = datetime.fromisoformat(manifest["finished_at"])
    return (finished - started).total_seconds()


def collect_steps(run: Run) -> list[StepInfo]:
    """Every step in pipeline order, done or not, with its record count and cost."""
    steps: list[StepInfo] = []

    def add(name: str, artifact: Path, count: Callable[[], str], manifest: Path | None) -> None:
        done = artifact.exists()
        # A timing line of a step whose artifact is gone describes a run that no longer exists.
        seconds, peak = run.timings.get(name, (None, None)) if done else (None, None)
        if seconds is None and done and manifest is not None:
            seconds = manifest_seconds(read_json(manifest))
        steps.append(StepInfo(name, artifact, done, count() if done else "", seconds, peak))

    def records(path: Path) -> Callable[[], str]:
        return lambda: f"{count_lines(path)} records"

    add("prompts", run.path(PROMPTS), records(run.path(PROMPTS)), None)
    add("generate", run.path(BASE), records(run.path(BASE)), manifest_path(run.path(BASE)))
    for number, kind, path in run.rounds():
        add(f"{kind}-{number}", path, records(path), manifest_path(path))
    add("sft", run.path(SFT_DIR), lambda: _log_steps(run.path(SFT_DIR)), run.path(SFT_DIR, MODEL_MANIFEST))
    add("generate-pairs", run.path(PAIRS), records(run.path(PAIRS)), manifest_path(run.path(PAIRS)))
    add("label-preferences", run.path(PREFS), records(run.path(PREFS)), manifest_path(run.path(PREFS)))
    add("train-rm", run.path(RM_DIR), lambda: _log_steps(run.path(RM_DIR)), run.path(RM_DIR, MODEL_MANIFEST))
    if run.path(REVISION_PAIRS).exists():
        pairs = run.path(REVISION_PAIRS)
        add("pairs-from-revisions", pairs, records(pairs), manifest_path(pairs))
    for stage in run.rl_stages():
        directory = run.path(stage)
        add(stage, directory, lambda d=directory: _log_steps(d), directory / MODEL_MANIFEST)
    add(
        "eval", run.path(EVAL_DIR, EVAL_SUMMARY), lambda: _eval_count(run), run.path(EVAL_DIR, MODEL_MANIFEST)
    )
    return steps


def _log_steps(directory: Path) -> str:
    manifest = read_json(directory / MODEL_MANIFEST) or {}
    counts = manifest.get("counts") or {}
    preferred = ("examples", "steps", "pairs", "train", "held_out", "prompts")
    shown = [k for k in preferred if isinstance(counts.get(k), int)][:3]
    described = ", ".join(f"{k.replace('_', ' ')} {counts[k]}" for k in shown)
    return described or f"{count_lines(directory / TRAINING_LOG)} log entries"


def _eval_count(run: Run) -> str:
    manifest = read_json(run.path(EVAL_DIR, MODEL_MANIFEST)) or {}
    counts = manifest.get("counts") or {}
    return f"{counts.get('answers', '?')} answers, {counts.get('judgements', '?')} judgements"


# ---------------------------------------------------------------------------
# HTML helpers


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def clip(text: str | None, limit: int = TEXT_LIMIT) -> str:
    text = text or ""
    return text if len(text) <= limit else text[:limit] + f" … [{len(text) - limit} more characters]"


def para(text: str | None) -> str:
    """A response as readable HTML: escaped, clipped, line breaks kept."""
    return f'<div class="text">{esc(clip(text))}</div>'


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[int] = ()) -> str:
    head = "".join(
        f'<th class="{"num" if i in numeric else ""}">{esc(h)}</th>' for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"num" if i in numeric else ""}">{cell}</td>' for i, cell in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def not_run(what: str, artifact: str) -> str:
    return f'<p class="missing">Not run: no <code>{esc(artifact)}</code> here ({esc(what)}).</p>'


def number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def interval(ci: Sequence[float] | None) -> str:
    return "" if not ci else f'<span class="ci">[{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]</span>'


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ---------------------------------------------------------------------------
# Plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "figure.dpi": 110,
        }
    )
    return plt


def integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def image(fig: Any, alt: str) -> str:
    """The figure as an inline PNG (a data URI), then closed."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def curves_figure(series: dict[str, list[tuple[float, float]]], title: str) -> str:
    """One small panel per quantity, side by side, against the training step."""
    plt = _pyplot()
    names = [name for name, points in series.items() if points]
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 2.6), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        xs, ys = zip(*series[name], strict=True)
        axis.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, color="#3465a4")
        axis.set_title(title if len(names) == 1 else name.replace("_", " "), fontsize=11)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(integer_ticks())
    if len(names) > 1:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return image(fig, title)


def log_series(
    entries: Sequence[dict[str, Any]], keys: Sequence[str]
) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {key: [] for key in keys}
    for entry in entries:
        step = entry.get("step")
        for key in keys:
            value = entry.get(key)
            if (
                isinstance(step, int | float)
                and isinstance(value, int | float)
                and not isinstance(value, bool)
            ):
                series[key].append((float(step), float(value)))
    return series


def bar_figure(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str) -> str:
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(6.5, 0.28 * len(labels) + 0.9))
    axis.barh(list(labels)[::-1], list(values)[::-1], color="#73a0c8")
    axis.set_xlabel(xlabel)
    axis.xaxis.set_major_locator(integer_ticks())
    axis.set_title(title, fontsize=11)
    axis.grid(axis="y", alpha=0)
    fig.tight_layout()
    return image(fig, title)


# ---------------------------------------------------------------------------
# Sections


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def overview_section(run: Run, steps: Sequence[StepInfo]) -> str:
    rows = []
    for step in steps:
        status = '<span class="ok">done</span>' if step.done else '<span class="no">not run</span>'
        relative = step.artifact.relative_to(run.root)
        peak = "–" if step.peak_mb is None else f"{step.peak_mb:,.0f} MB"
        rows.append(
            [
                esc(step.name),
                status,
                f"<code>{esc(relative)}</code>",
                esc(step.count),
                duration(step.seconds),
                peak,
            ]
        )
    total = sum(s.seconds for s in steps if s.seconds is not None)
    peak_all = max((s.peak_mb for s in steps if s.peak_mb is not None), default=None)
    note = f"<p>Total step time {duration(total)}"
    note += f"; peak memory of any step {peak_all:,.0f} MB.</p>" if peak_all is not None else ".</p>"
    return section(
        "pipeline",
        "Pipeline",
        table(["step", "status", "artifact", "produced", "wall time", "peak RSS"], rows, numeric=(4, 5))
        + note,
    )


def constitution_section(run: Run, spec: str | None) -> str:
    from caitool.constitution import load_constitution

    recorded = _recorded_constitution(run)
    if spec is None and recorded is None:
        return section("constitution", "Constitution", not_run("no step recorded a constitution", "round1.*"))
    try:
        constitution = load_constitution(spec or recorded["name"])  # type: ignore[index]
    except CaitoolError as err:
        ref = recorded or {}
        body = f"<p>{esc(ref.get('name'))} {esc(ref.get('version'))} (hash {esc(ref.get('hash'))}); "
        return section("constitution", "Constitution", body + f"the file could not be loaded: {esc(err)}</p>")
    mismatch = ""
    if recorded is not None and recorded.get("hash") != constitution.content_hash:
        mismatch = (
            f'<p class="warn">The run recorded {esc(recorded.get("name"))} '
            f"with hash {esc(recorded.get('hash'))}; "
            f"the file shown here has hash {esc(constitution.content_hash)}.</p>"
        )
    critiques = table(
        ["id", "critique request", "revision request"],
        [[f"<code>{esc(p.id)}</code>", esc(p.critique), esc(p.revision)] for p in constitution.critiques],
    )
    comparisons = table(
        ["id", "comparison question"],
        [[f"<code>{esc(p.id)}</code>", esc(p.text)] for p in constitution.comparisons],
    )
    body = (
        f"<p><strong>{esc(constitution.name)}</strong> version {esc(constitution.version)}, content hash "
        f"<code>{esc(constitution.content_hash)}</code>. {esc(constitution.description)}</p>{mismatch}"
        + details(f"{len(constitution.critiques)} critique/revision principles", critiques)
        + details(f"{len(constitution.comparisons)} comparison principles", comparisons)
    )
    return section("constitution", "Constitution", body)


def _recorded_constitution(run: Run) -> dict[str, Any] | None:
    candidates = [manifest_path(path) for _, _, path in run.rounds()] + [manifest_path(run.path(PREFS))]
    for candidate in candidates:
        manifest = read_json(candidate)
        if manifest and isinstance(manifest.get("constitution"), dict):
            return manifest["constitution"]
    return None


def revision_section(run: Run) -> str:
    final = run.last_revise()
    if final is None:
        return section(
            "revisions",
            "Supervised phase: critiques and revisions",
            not_run("critique/revise", "round1.revise.jsonl"),
        )
    records = [r for r in read_records(final, lambda raw: parse_record(RevisionRecord, raw))]
    rows = []
    for number, kind, path in run.rounds():
        round_records = list(read_records(path, lambda raw: parse_record(RevisionRecord, raw)))
        flags = Counter(
            flag for r in round_records if len(r.rounds) >= number for flag in r.rounds[number - 1].flags
        )
        flag_text = ", ".join(f"{esc(k)} {v}" for k, v in flags.most_common()) or "none"
        rows.append([f"{number}", kind, f"<code>{esc(path.name)}</code>", str(len(round_records)), flag_text])
    principles = Counter(r.principle_id for record in records for r in record.rounds)
    chart = bar_figure(list(principles), list(principles.values()), "Critique principles drawn", "rounds")
    changed = sum(r.current_response.strip() != r.initial_response.strip() for r in records)
    body = (
        table(["round", "step", "file", "records", "flags"], rows, numeric=(0, 3))
        + f"<p>{changed} of {len(records)} final responses differ from the initial response.</p>"
        + chart
        + "<h3>Samples: before and after</h3>"
        + "".join(_revision_sample(r) for r in _pick_samples(records, SAMPLE_REVISIONS))
    )
    return section("revisions", "Supervised phase: critiques and revisions", body)


def _pick_samples(records: Sequence[RevisionRecord], count: int) -> list[RevisionRecord]:
    """Evenly spread over the file, so the samples are not just its first prompts."""
    if len(records) <= count:
        return list(records)
    step = len(records) / count
    return [records[int(i * step)] for i in range(count)]


def _revision_sample(record: RevisionRecord) -> str:
    prompt = "".join(
        f"<p><strong>{esc(m.role)}:</strong> {esc(clip(m.content, 400))}</p>" for m in record.prompt
    )
    columns = [f'<div class="col"><h4>initial response</h4>{para(record.initial_response)}</div>']
    for number, round_ in enumerate(record.rounds, start=1):
        flags = f'<p class="flags">flags: {esc(", ".join(round_.flags))}</p>' if round_.flags else ""
        revision = para(round_.revision) if round_.revision is not None else "<p><em>not revised</em></p>"
        columns.append(
            f'<div class="col"><h4>round {number}: <code>{esc(round_.principle_id)}</code></h4>'
            f'<p class="label">critique</p>{para(round_.critique)}'
            f'<p class="label">revision</p>{revision}{flags}</div>'
        )
    cols = "".join(columns)
    return f'<div class="sample"><div class="prompt">{prompt}</div><div class="cols">{cols}</div></div>'


def sft_section(run: Run) -> str:
    directory = run.path(SFT_DIR)
    manifest = read_json(directory / MODEL_MANIFEST)
    if manifest is None:
        return section("sft", "Supervised fine-tuning", not_run("sft", f"{SFT_DIR}/{MODEL_MANIFEST}"))
    log = read_lines(directory / TRAINING_LOG)
    body = _params_line(manifest) + _counts_line(manifest)
    series = log_series(log, ["loss"])
    body += curves_figure(series, "SFT training loss") if series["loss"] else "<p>No loss was logged.</p>"
    return section("sft", "Supervised fine-tuning (SL-CAI)", body)


def _params_line(manifest: dict[str, Any]) -> str:
    params = manifest.get("params") or {}
    shown = ", ".join(f"{esc(k)}={esc(v)}" for k, v in params.items() if not isinstance(v, dict | list))
    return f'<p class="params">{shown}</p>' if shown else ""


def _counts_line(manifest: dict[str, Any]) -> str:
    counts = manifest.get("counts") or {}
    shown = ", ".join(f"{esc(k.replace('_', ' '))}: {esc(number(v))}" for k, v in counts.items())
    return f"<p>{shown}</p>" if shown else ""


def preference_section(run: Run) -> str:
    path = run.path(PREFS)
    if not path.exists():
        return section("labels", "Preference labels (RLAIF)", not_run("label-preferences", PREFS))
    records = [r for r in read_records(path, lambda raw: parse_record(PreferenceRecord, raw))]
    if not records:
        return section("labels", "Preference labels (RLAIF)", f"<p><code>{PREFS}</code> holds no labels.</p>")
    both = [r for r in records if r.p_swapped is not None]
    disagree = [r for r in both if (r.p_first > 0.5) != (r.p_swapped > 0.5)]  # type: ignore[operator]
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    left.hist(
        [r.p_chosen for r in records],
        bins=[0.5 + 0.05 * i for i in range(11)],
        color="#73a0c8",
        edgecolor="white",
    )
    left.set_xlabel("p_chosen (confidence of the label)")
    left.set_ylabel("pairs")
    left.set_title("Label distribution", fontsize=11)
    if both:
        right.scatter(
            [r.p_first for r in both], [r.p_swapped for r in both], s=18, color="#3465a4", alpha=0.7
        )
        right.axhline(0.5, color="grey", lw=0.8)
        right.axvline(0.5, color="grey", lw=0.8)
        right.set_xlim(0, 1)
        right.set_ylim(0, 1)
        right.set_xlabel("P(first better), first shown as (A)")
        right.set_ylabel("… first shown as (B)")
        right.set_title("The two option orders", fontsize=11)
    else:
        right.set_axis_off()
    fig.tight_layout()
    mean_confidence = sum(r.p_chosen for r in records) / len(records)
    principles = Counter(r.principle_id for r in records)
    body = (
        f"<p>{len(records)} labelled pairs; mean confidence p_chosen = {mean_confidence:.2f}. "
        + (
            f"The two option orders disagreed on <strong>{len(disagree)} of {len(both)}</strong> pairs "
            f"({percent(len(disagree) / len(both))}): the labeller's position bias that swapping cancels.</p>"
            if both
            else "Labels were read in one order only (--no-swap).</p>"
        )
        + image(fig, "preference labels")
        + "<p>Comparison principles drawn: "
        + ", ".join(f"<code>{esc(k)}</code> {v}" for k, v in principles.most_common())
        + "</p>"
    )
    if records:
        sample = records[0]
        body += "<h3>A labelled pair</h3>" + table(
            [f"chosen (p = {sample.p_chosen:.2f}, principle {sample.principle_id})", "rejected"],
            [[para(sample.chosen[-1].content), para(sample.rejected[-1].content)]],
        )
    return section("labels", "Preference labels (RLAIF)", body)


def reward_section(run: Run) -> str:
    directory = run.path(RM_DIR)
    metrics = read_json(directory / RM_METRICS)
    if metrics is None:
        return section("rm", "Reward model", not_run("train-rm", f"{RM_DIR}/{RM_METRICS}"))
    held = metrics.get("held_out") or {}
    trained_pairs = (metrics.get("train") or {}).get("pairs")
    body = ""
    if held.get("pairs"):
        body += (
            f"<p>Held-out accuracy <strong>{percent(held.get('accuracy'))}</strong> on {held['pairs']} pairs "
            f"(chosen scored above rejected); log-loss against the labels {held.get('log_loss', 0):.3f}; "
            f"trained on {esc(trained_pairs)} pairs ({esc(metrics.get('labels'))} labels).</p>"
        )
        calibration = held.get("calibration") or []
        if calibration:
            body += _calibration_plot(calibration) + table(
                ["predicted P(chosen)", "pairs", "mean predicted", "mean label"],
                [
                    [
                        esc(row["bin"]),
                        row["count"],
                        f"{row['mean_predicted']:.2f}",
                        f"{row['mean_label']:.2f}",
                    ]
                    for row in calibration
                ],
                numeric=(1, 2, 3),
            )
    else:
        body += "<p>No pairs were held out, so there is no accuracy to report.</p>"
    series = log_series(read_lines(directory / TRAINING_LOG), ["loss"])
    if series["loss"]:
        body += curves_figure(series, "Reward-model training loss")
    return section("rm", "Reward model", body)


def _calibration_plot(rows: Sequence[dict[str, Any]]) -> str:
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(3.6, 3.4))
    axis.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    axis.scatter(
        [r["mean_predicted"] for r in rows],
        [r["mean_label"] for r in rows],
        s=[30 + 12 * r["count"] for r in rows],
        color="#3465a4",
        alpha=0.8,
        label="bins (size: pairs)",
    )
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("reward model's P(chosen)")
    axis.set_ylabel("labeller's p_chosen")
    axis.set_title("Calibration (held-out pairs)", fontsize=11)
    axis.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return image(fig, "calibration")


# "score" is the reward model's score alone; "reward" adds the penalties PPO optimises.
PPO_CURVES = ("reward", "score", "kl", "entropy", "response_length")


DPO_CURVES = ("loss", "rewards/margins", "rewards/accuracies")


def rl_section(run: Run, stage: str) -> str:
    """The RL stage's curves: ppo and rloo log the same figures; dpo its loss and implicit reward margins."""
    label, directory = RL_STAGES[stage], run.path(stage)
    log = [entry for entry in read_lines(directory / TRAINING_LOG) if "loss" in entry or "reward" in entry]
    if not (directory / MODEL_MANIFEST).exists() or not log:
        return section(stage, label, not_run(stage, f"{stage}/{TRAINING_LOG}"))
    manifest = read_json(directory / MODEL_MANIFEST) or {}
    if stage == "dpo":
        return section(stage, "DPO (RL-CAI without a reward model)", _dpo_body(manifest, log))
    series = log_series(log, PPO_CURVES)
    first, last = log[0], log[-1]
    body = _params_line(manifest) + (
        f"<p>{len(log)} steps; mean reward {first.get('reward', 0):+.3f} → "
        f"<strong>{last.get('reward', 0):+.3f}</strong>, "
        f"KL to the reference {first.get('kl') or 0:.4f} → {last.get('kl') or 0:.4f}.</p>"
    )
    body += curves_figure(
        {k: series[k] for k in ("reward", "score", "kl")}, f"{label}: reward, RM score and KL per step"
    )
    body += curves_figure(
        {k: series[k] for k in ("entropy", "response_length")}, f"{label}: entropy and response length"
    )
    samples = read_lines(directory / PPO_SAMPLES)
    if samples:
        last_step = max(s.get("step", 0) for s in samples)
        rows = [
            [
                esc(clip(_last_user(s.get("prompt")), 200)),
                para(s.get("response")),
                f"{s.get('reward', 0):+.2f}",
            ]
            for s in samples
            if s.get("step") == last_step
        ][:4]
        body += f"<h3>Rollouts at step {last_step}</h3>" + table(
            ["prompt", "response", "reward"], rows, numeric=(2,)
        )
    return section(stage, f"{label} (RL-CAI)", body)


def _dpo_body(manifest: dict[str, Any], log: Sequence[dict[str, Any]]) -> str:
    first, last = log[0], log[-1]
    body = _params_line(manifest) + _counts_line(manifest)
    body += (
        f"<p>{len(log)} steps; loss {first.get('loss', 0):.4f} → <strong>{last.get('loss', 0):.4f}</strong>, "
        f"implicit reward margin (beta times the chosen-minus-rejected log-ratio to the reference) "
        f"{first.get('rewards/margins', 0):+.4f} → {last.get('rewards/margins', 0):+.4f}.</p>"
    )
    return body + curves_figure(log_series(log, DPO_CURVES), "DPO: loss, reward margin and accuracy per step")


def _last_user(prompt: Any) -> str:
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return str(prompt or "")


def eval_section(run: Run) -> str:
    summary = read_json(run.path(EVAL_DIR, EVAL_SUMMARY))
    if summary is None:
        return section("eval", "Evaluation", not_run("eval", f"{EVAL_DIR}/{EVAL_SUMMARY}"))
    per_model = summary.get("per_model", [])
    rows = [
        [
            esc(m["prompt_set"]),
            f"<strong>{esc(m['model_name'])}</strong>",
            m["n"],
            f"{percent(m['refusal_rate'])} {interval(m.get('refusal_rate_ci'))}",
            f"{m['mean_words']:.0f}",
            percent(m["cut_rate"]),
            "–" if m.get("mean_reward") is None else f"{m['mean_reward']:+.2f}",
        ]
        for m in per_model
    ]
    body = (
        "<p>Every model answered the held-out prompts. <em>refused</em>: answers that open by declining "
        "(a fixed list of patterns); on helpful prompts a rising refusal rate means the model became "
        "evasive. "
        "Intervals are 95%.</p>"
        + table(
            ["prompt set", "model", "n", "refused", "words", "cut at max tokens", "mean reward"],
            rows,
            numeric=(2, 3, 4, 5, 6),
        )
    )
    if per_model:
        body += _eval_chart(per_model)
    pairs = summary.get("pairwise", [])
    if pairs:
        pair_rows = [
            [
                esc(p["prompt_set"]),
                f"{esc(p['model_a'])} vs {esc(p['model_b'])}",
                p["n"],
                f"{percent(p['win_rate'])} {interval(p.get('win_rate_ci'))}",
                f"{percent(p['soft_win_rate'])} {interval(p.get('soft_win_rate_ci'))}",
                f"{p['wins']}/{p['ties']}/{p['losses']}",
                percent(p.get("order_consistency")),
            ]
            for p in pairs
        ]
        body += "<h3>Pairwise comparisons by the AI labeller</h3>" + table(
            [
                "prompt set",
                "A vs B",
                "n",
                "A preferred (ties ½)",
                "soft",
                "wins/ties/losses",
                "order-consistent",
            ],
            pair_rows,
            numeric=(2, 3, 4, 5, 6),
        )
    return section("eval", "Evaluation", body + _eval_samples(run, summary))


EVAL_SAMPLES_PER_SET = 2


def _eval_samples(run: Run, summary: dict[str, Any]) -> str:
    """The first prompts of each set with every model's answer side by side."""
    answers = [
        parse_record(EvalAnswerRecord, raw) for raw in read_lines(run.path(EVAL_DIR, "generations.jsonl"))
    ]
    models = [m["name"] for m in summary.get("models", [])]
    if not answers or not models:
        return ""
    by_key = {(a.prompt_set, a.prompt_id, a.model_name): a for a in answers}  # type: ignore[attr-defined]
    html_parts = ["<h3>Sample answers</h3>"]
    for prompt_set in summary.get("prompt_sets", []):
        prompt_ids = list(
            dict.fromkeys(a.prompt_id for a in answers if a.prompt_set == prompt_set)  # type: ignore[attr-defined]
        )
        for prompt_id in prompt_ids[:EVAL_SAMPLES_PER_SET]:
            shown = [by_key.get((prompt_set, prompt_id, name)) for name in models]
            first = next(a for a in shown if a is not None)
            columns = "".join(
                f'<div class="col"><h4>{esc(name)}'
                + (" · refused" if answer is not None and answer.refused else "")
                + (
                    f" · reward {answer.reward:+.2f}"
                    if answer is not None and answer.reward is not None
                    else ""
                )
                + f"</h4>{para(answer.completion[-1].content if answer is not None else '')}</div>"
                for name, answer in zip(models, shown, strict=True)
            )
            prompt = esc(clip(_last_user([m.model_dump() for m in first.prompt]), 400))
            html_parts.append(
                f'<div class="sample"><div class="prompt"><strong>{esc(prompt_set)}:</strong> {prompt}</div>'
                f'<div class="cols">{columns}</div></div>'
            )
    return "".join(html_parts)


def _eval_chart(per_model: Sequence[dict[str, Any]]) -> str:
    plt = _pyplot()
    sets = list(dict.fromkeys(m["prompt_set"] for m in per_model))
    models = list(dict.fromkeys(m["model_name"] for m in per_model))
    by_key = {(m["prompt_set"], m["model_name"]): m for m in per_model}
    has_reward = any(m.get("mean_reward") is not None for m in per_model)
    fig, axes = plt.subplots(
        1, 2 if has_reward else 1, figsize=(8.5 if has_reward else 4.5, 2.8), squeeze=False
    )
    width = 0.8 / max(len(models), 1)
    colours = ["#a0a0a0", "#73a0c8", "#3465a4", "#204a87", "#729fcf"]
    for panel, (key, label) in enumerate(
        [("refusal_rate", "refusal rate"), ("mean_reward", "mean reward")][: 2 if has_reward else 1]
    ):
        axis = axes[0][panel]
        for index, model in enumerate(models):
            values = [(by_key.get((s, model)) or {}).get(key) or 0.0 for s in sets]
            axis.bar(
                [i + index * width for i in range(len(sets))],
                values,
                width,
                label=model,
                color=colours[index % len(colours)],
            )
        axis.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(sets))], sets)
        axis.set_title(label, fontsize=11)
        if key == "refusal_rate":
            axis.set_ylim(0, 1)
        axis.grid(axis="x", alpha=0)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return image(fig, "eval by model")


# ---------------------------------------------------------------------------
# Headline numbers (page and terminal)


def headline_numbers(run: Run) -> list[str]:
    lines = []
    final = run.last_revise()
    if final is not None:
        records = list(read_records(final, lambda raw: parse_record(RevisionRecord, raw)))
        rounds = max((len(r.rounds) for r in records), default=0)
        lines.append(f"{len(records)} prompts critiqued and revised over {rounds} round(s)")
    prefs = run.path(PREFS)
    if prefs.exists():
        records = list(read_records(prefs, lambda raw: parse_record(PreferenceRecord, raw)))
        both = [r for r in records if r.p_swapped is not None]
        disagree = sum((r.p_first > 0.5) != (r.p_swapped > 0.5) for r in both)  # type: ignore[operator]
        if both:
            lines.append(
                f"{len(records)} preference labels; "
                f"option orders disagreed on {percent(disagree / len(both))}"
            )
    metrics = read_json(run.path(RM_DIR, RM_METRICS)) or {}
    held = metrics.get("held_out") or {}
    if held.get("pairs"):
        lines.append(f"reward model held-out accuracy {percent(held['accuracy'])} on {held['pairs']} pairs")
    for stage in run.rl_stages():
        log = [e for e in read_lines(run.path(stage, TRAINING_LOG)) if "loss" in e or "reward" in e]
        if log and stage == "dpo":
            lines.append(
                f"DPO loss {log[0].get('loss', 0):.4f} -> {log[-1].get('loss', 0):.4f} over {len(log)} steps "
                f"(reward margin {log[-1].get('rewards/margins', 0):+.4f})"
            )
        elif log:
            lines.append(
                f"{RL_STAGES[stage]} reward {log[0].get('reward', 0):+.3f} -> "
                f"{log[-1].get('reward', 0):+.3f} over {len(log)} steps (KL {log[-1].get('kl') or 0:.4f})"
            )
    summary = read_json(run.path(EVAL_DIR, EVAL_SUMMARY)) or {}
    for prompt_set in summary.get("prompt_sets", []):
        rates = ", ".join(
            f"{m['model_name']} {percent(m['refusal_rate'])}"
            for m in summary.get("per_model", [])
            if m["prompt_set"] == prompt_set
        )
        lines.append(f"refusal rate on {prompt_set}: {rates}")
    for pair in summary.get("pairwise", []):
        low, high = pair["win_rate_ci"]
        lines.append(
            f"{pair['prompt_set']}: {pair['model_a']} preferred over {pair['model_b']} in "
            f"{percent(pair['win_rate'])} (95% CI {percent(low)}-{percent(high)})"
        )
    return lines


# ---------------------------------------------------------------------------
# The page


CSS = """
body { font: 16px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #222;
       background: #fafafa; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 28px; margin: 8px 0 4px; }
h2 { font-size: 21px; margin: 40px 0 12px; padding-bottom: 4px; border-bottom: 2px solid #e3e3e3; }
h3 { font-size: 17px; margin: 24px 0 8px; }
h4 { font-size: 14px; margin: 0 0 6px; color: #444; }
code { font: 13px/1.4 "SFMono-Regular", Menlo, Consolas, monospace; background: #f2f2f2; padding: 1px 4px;
       border-radius: 3px; }
table { border-collapse: collapse; margin: 10px 0 16px; font-size: 14px; width: 100%; }
th, td { border-bottom: 1px solid #e6e6e6; padding: 6px 10px; text-align: left; vertical-align: top; }
th { background: #f5f7fa; font-weight: 600; }
td.num, th.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
img { max-width: 100%; margin: 8px 0; }
nav { font-size: 14px; margin: 8px 0 0; }
nav a { margin-right: 14px; color: #3465a4; text-decoration: none; }
.subtitle { color: #666; margin: 0; font-size: 14px; }
.headline { background: #f0f5fb; border-left: 4px solid #3465a4; padding: 10px 18px; margin: 18px 0; }
.headline li { margin: 2px 0; }
.missing { color: #8a6d3b; background: #fcf8e3; padding: 8px 12px; border-radius: 4px; }
.warn { color: #a94442; }
.ok { color: #2e7d32; font-weight: 600; }
.no { color: #999; }
.ci { color: #777; font-size: 12px; margin-left: 4px; }
.params { color: #555; font-size: 13px; font-family: Menlo, Consolas, monospace; word-break: break-word; }
.sample { border: 1px solid #e3e3e3; border-radius: 6px; margin: 14px 0; }
.sample .prompt { background: #f7f7f7; padding: 8px 14px; border-bottom: 1px solid #e3e3e3; font-size: 14px; }
.sample .prompt p { margin: 4px 0; }
.cols { display: flex; gap: 0; }
.col { flex: 1 1 0; padding: 10px 14px; border-right: 1px solid #eee; min-width: 0; }
.col:last-child { border-right: none; }
.text { white-space: pre-wrap; font-size: 13.5px; line-height: 1.45; overflow-wrap: anywhere; }
.label { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: #888; margin: 8px 0 2px; }
.flags { font-size: 12px; color: #a94442; }
details { margin: 6px 0; }
summary { cursor: pointer; color: #3465a4; }
"""


def render_page(run: Run, constitution: str | None) -> str:
    steps = collect_steps(run)
    headlines = headline_numbers(run)
    sections = [
        overview_section(run, steps),
        constitution_section(run, constitution),
        revision_section(run),
        sft_section(run),
        preference_section(run),
        reward_section(run),
        *(rl_section(run, stage) for stage in run.rl_stages()),
        eval_section(run),
    ]
    nav = "".join(
        f'<a href="#{anchor}">{label}</a>'
        for anchor, label in [
            ("pipeline", "Pipeline"),
            ("constitution", "Constitution"),
            ("revisions", "Revisions"),
            ("sft", "SFT"),
            ("labels", "Labels"),
            ("rm", "Reward model"),
            *((stage, RL_STAGES[stage]) for stage in run.rl_stages()),
            ("eval", "Eval"),
        ]
    )
    headline = (
        '<div class="headline"><strong>Headline numbers</strong><ul>'
        + "".join(f"<li>{esc(line)}</li>" for line in headlines)
        + "</ul></div>"
        if headlines
        else ""
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>caitool report: {esc(run.root.name)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>Constitutional AI run: {esc(run.root.name)}</h1>"
        f'<p class="subtitle"><code>{esc(run.root.resolve())}</code> · report written {esc(now_iso())}</p>'
        f"<nav>{nav}</nav>{headline}{''.join(sections)}</main></body></html>\n"
    )


def run_report(run_dir: str | Path, output: str | Path, *, constitution: str | None = None) -> Path:
    """Write the page atomically and print where every artifact is and the headline numbers."""
    root = Path(run_dir)
    if not root.is_dir():
        raise CaitoolError("no such run directory", where=str(root))
    run = Run(root=root, timings=read_timings(root / TIMINGS))
    page = render_page(run, constitution)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(output)
    print_overview(run, output)
    return output


def print_overview(run: Run, output: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    artifacts = Table(title=f"Artifacts under {run.root}", title_justify="left")
    for column in ("step", "artifact", "produced", "wall time", "peak RSS"):
        artifacts.add_column(
            column, justify="right" if column in ("wall time", "peak RSS") else "left", overflow="fold"
        )
    for step in collect_steps(run):
        peak = "-" if step.peak_mb is None else f"{step.peak_mb:,.0f} MB"
        relative = step.artifact.relative_to(run.root)
        where = str(relative) if step.done else f"{relative} (not run)"
        artifacts.add_row(step.name, where, step.count, duration(step.seconds).replace("–", "-"), peak)
    console.print(artifacts)
    console.print("[bold]Headline numbers[/bold]")
    for line in headline_numbers(run):
        console.print(f"  • {line}", highlight=False)
    console.print(f"Report: {output}")
