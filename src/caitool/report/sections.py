"""The report's sections, in page order: each renders the body of one part of a run.

``SECTIONS`` is the one list the page is built from: it gives every section its anchor, its
link in the navigation bar and its heading. A step whose artifact is missing gets a "not run"
note instead of a section that breaks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caitool.errors import CaitoolError
from caitool.eval_stats import (
    ModelSummary,
    PairSummary,
    answer_class_of,
    model_table,
    pair_table,
    percent,
    safety_table,
)
from caitool.jsonl_io import manifest_path
from caitool.records import EvalAnswerRecord, RevisionRecord, parse_record
from caitool.report.html import (
    clip,
    details,
    duration,
    esc,
    not_run,
    number,
    para,
    summary_table,
    table,
)
from caitool.report.layout import (
    ANSWERS_FILE,
    EVAL_DIR,
    METRICS_FILE,
    MODEL_MANIFEST,
    PREFS,
    RL_STAGES,
    RM_DIR,
    SAMPLES_FILE,
    SFT_DIR,
    SUMMARY_FILE,
    TRAINING_LOG,
    Run,
    collect_steps,
    read_json,
    read_lines,
    read_preferences,
    read_revisions,
    round_file,
    stage_log,
)
from caitool.report.plots import (
    bar_figure,
    calibration_figure,
    curves_figure,
    eval_figure,
    labels_figure,
    log_series,
)

SAMPLE_REVISIONS = 3


def always(run: Run) -> bool:
    return True


@dataclass(frozen=True)
class Section:
    anchor: str
    nav: str  # the link in the navigation bar
    title: str
    body: Callable[[Run], str]
    shown: Callable[[Run], bool] = always  # whether this run has the section (the RL stage that ran)


def overview_section(run: Run) -> str:
    steps = collect_steps(run)
    rows = []
    for step in steps:
        status = '<span class="ok">done</span>' if step.done else '<span class="no">not run</span>'
        relative = step.artifact.relative_to(run.root)
        peak = "-" if step.peak_mb is None else f"{step.peak_mb:,.0f} MB"
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
    headers = ["step", "status", "artifact", "produced", "wall time", "peak RSS"]
    return table(headers, rows, numeric=(4, 5)) + note


def constitution_section(run: Run) -> str:
    from caitool.constitution import load_constitution

    spec = run.constitution
    recorded = _recorded_constitution(run)
    if spec is None and recorded is None:
        return not_run("no step recorded a constitution", "round1.*")
    try:
        constitution = load_constitution(spec or recorded["name"])  # type: ignore[index]
    except CaitoolError as err:
        ref = recorded or {}
        body = f"<p>{esc(ref.get('name'))} {esc(ref.get('version'))} (hash {esc(ref.get('hash'))}); "
        return body + f"the file could not be loaded: {esc(err)}</p>"
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
    return body


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
        return not_run("critique/revise", round_file(1, "revise"))
    records = read_revisions(final)
    rows = []
    for round_number, kind, path in run.rounds():
        round_records = read_revisions(path)
        flags = Counter(
            flag
            for r in round_records
            if len(r.rounds) >= round_number
            for flag in r.rounds[round_number - 1].flags
        )
        flag_text = ", ".join(f"{esc(k)} {v}" for k, v in flags.most_common()) or "none"
        rows.append(
            [f"{round_number}", kind, f"<code>{esc(path.name)}</code>", str(len(round_records)), flag_text]
        )
    principles = Counter(r.principle_id for record in records for r in record.rounds)
    chart = bar_figure(list(principles), list(principles.values()), "Critique principles drawn", "rounds")
    changed = sum(r.current_response.strip() != r.initial_response.strip() for r in records)
    return (
        table(["round", "step", "file", "records", "flags"], rows, numeric=(0, 3))
        + f"<p>{changed} of {len(records)} final responses differ from the initial response.</p>"
        + chart
        + "<h3>Samples: before and after</h3>"
        + "".join(_revision_sample(r) for r in _pick_samples(records, SAMPLE_REVISIONS))
    )


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
    for index, round_ in enumerate(record.rounds, start=1):
        flags = f'<p class="flags">flags: {esc(", ".join(round_.flags))}</p>' if round_.flags else ""
        revision = para(round_.revision) if round_.revision is not None else "<p><em>not revised</em></p>"
        columns.append(
            f'<div class="col"><h4>round {index}: <code>{esc(round_.principle_id)}</code></h4>'
            f'<p class="label">critique</p>{para(round_.critique)}'
            f'<p class="label">revision</p>{revision}{flags}</div>'
        )
    cols = "".join(columns)
    return f'<div class="sample"><div class="prompt">{prompt}</div><div class="cols">{cols}</div></div>'


def sft_section(run: Run) -> str:
    directory = run.path(SFT_DIR)
    manifest = read_json(directory / MODEL_MANIFEST)
    if manifest is None:
        return not_run("sft", f"{SFT_DIR}/{MODEL_MANIFEST}")
    log = read_lines(directory / TRAINING_LOG)
    body = _params_line(manifest) + _counts_line(manifest)
    series = log_series(log, ["loss"])
    return body + (
        curves_figure(series, "SFT training loss") if series["loss"] else "<p>No loss was logged.</p>"
    )


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
        return not_run("label-preferences", PREFS)
    records = read_preferences(path)
    if not records:
        return f"<p><code>{PREFS}</code> holds no labels.</p>"
    both = [r for r in records if r.p_swapped is not None]
    disagree = [r for r in both if (r.p_first > 0.5) != (r.p_swapped > 0.5)]  # type: ignore[operator]
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
        + labels_figure(records)
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
    return body


def reward_section(run: Run) -> str:
    directory = run.path(RM_DIR)
    metrics = read_json(directory / METRICS_FILE)
    if metrics is None:
        return not_run("train-rm", f"{RM_DIR}/{METRICS_FILE}")
    held = metrics.get("held_out") or {}
    trained_pairs = (metrics.get("train") or {}).get("pairs")
    body = ""
    if held.get("pairs"):
        body += (
            f"<p>Held-out accuracy <strong>{percent(held.get('accuracy'))}</strong> on "
            f"{held.get('decided_pairs', held['pairs'])} pairs (the side the label favours scored higher; "
            f"ties labelled 0.5 left out); log-loss against the labels {held.get('log_loss', 0):.3f}; "
            f"trained on {esc(trained_pairs)} pairs ({esc(metrics.get('labels'))} labels).</p>"
        )
        calibration = held.get("calibration") or []
        if calibration:
            body += calibration_figure(calibration) + table(
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
    return body


# "score" is the reward model's score alone; "reward" adds the penalties PPO optimises.
# rloo logs the same figures under the same names, so its section is ppo's.
PPO_CURVES = ("reward", "score", "kl", "entropy", "response_length")
DPO_CURVES = ("loss", "rewards/margins", "rewards/accuracies")


def rl_section(stage: str) -> Callable[[Run], str]:
    """An RL stage's section body: ppo's and rloo's rewards, KL and rollouts; dpo's loss and margins."""

    def body(run: Run) -> str:
        label, directory = RL_STAGES[stage], run.path(stage)
        log = stage_log(run, stage)
        if not (directory / MODEL_MANIFEST).exists() or not log:
            return not_run(stage, f"{stage}/{TRAINING_LOG}")
        manifest = read_json(directory / MODEL_MANIFEST) or {}
        if stage == "dpo":
            return _dpo_body(manifest, log)
        return _reward_stage_body(label, directory, manifest, log)

    return body


def _reward_stage_body(
    label: str, directory: Path, manifest: dict[str, Any], log: Sequence[dict[str, Any]]
) -> str:
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
    samples = read_lines(directory / SAMPLES_FILE)
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
    return body


def _dpo_body(manifest: dict[str, Any], log: Sequence[dict[str, Any]]) -> str:
    first, last = log[0], log[-1]
    body = _params_line(manifest) + _counts_line(manifest)
    body += (
        f"<p>{len(log)} steps; loss {first.get('loss', 0):.4f} → <strong>{last.get('loss', 0):.4f}</strong>, "
        f"implicit reward margin (beta times the chosen-minus-rejected log-ratio to the reference) "
        f"{first.get('rewards/margins', 0):+.4f} → {last.get('rewards/margins', 0):+.4f}.</p>"
    )
    return body + curves_figure(log_series(log, DPO_CURVES), "DPO: loss, reward margin and accuracy per step")


def ran(stage: str) -> Callable[[Run], bool]:
    return lambda run: stage in run.rl_stages()


def _last_user(prompt: Any) -> str:
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return str(prompt or "")


def eval_section(run: Run) -> str:
    summary = read_json(run.path(EVAL_DIR, SUMMARY_FILE))
    if summary is None:
        return not_run("eval", f"{EVAL_DIR}/{SUMMARY_FILE}")
    models = [ModelSummary(**m) for m in summary.get("per_model", [])]
    pairs = [PairSummary(**p) for p in summary.get("pairwise", [])]
    classifier = summary.get("refusal_classifier", {}).get("counted", "patterns (before three classes)")
    body = (
        "<p>Every model answered the held-out prompts. <em>refused</em>: answers that decline, fully or "
        "in part (<em>partial</em>: declined and helped); on helpful prompts a rising refusal rate means "
        f"the model became evasive. Answers classified by: {esc(classifier)}. Intervals are 95%.</p>"
        + summary_table(model_table(models))
    )
    if any(m.labelled for m in models):
        body += (
            "<h3>Harmful compliance and over-refusal</h3><p>On prompts that say what the right behaviour "
            "is: <em>harmful compliance</em> is the share of requests that should be refused and were "
            "answered; <em>over-refusal</em> the share of safe requests that were refused. A model that "
            "refuses everything scores 0% on the first and 100% on the second.</p>"
            + summary_table(safety_table(models))
        )
    if models:
        body += eval_figure(models)
    if pairs:
        body += "<h3>Pairwise comparisons by the AI labeller</h3>" + summary_table(pair_table(pairs))
    return body + _eval_samples(run, summary)


EVAL_SAMPLES_PER_SET = 2


def _eval_samples(run: Run, summary: dict[str, Any]) -> str:
    """The first prompts of each set with every model's answer side by side."""
    answers = [parse_record(EvalAnswerRecord, raw) for raw in read_lines(run.path(EVAL_DIR, ANSWERS_FILE))]
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
                + (
                    f" · {'refused' if answer_class_of(answer) == 'refuse' else 'partial refusal'}"
                    if answer is not None and answer.refused
                    else ""
                )
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


SECTIONS = (
    Section("pipeline", "Pipeline", "Pipeline", overview_section),
    Section("constitution", "Constitution", "Constitution", constitution_section),
    Section("revisions", "Revisions", "Supervised phase: critiques and revisions", revision_section),
    Section("sft", "SFT", "Supervised fine-tuning (SL-CAI)", sft_section),
    Section("labels", "Labels", "Preference labels (RLAIF)", preference_section),
    Section("rm", "Reward model", "Reward model", reward_section),
    Section("ppo", "PPO", "PPO (RL-CAI)", rl_section("ppo"), ran("ppo")),
    Section("rloo", "RLOO", "RLOO (RL-CAI)", rl_section("rloo"), ran("rloo")),
    Section("dpo", "DPO", "DPO (RL-CAI without a reward model)", rl_section("dpo"), ran("dpo")),
    Section("eval", "Eval", "Evaluation", eval_section),
)
