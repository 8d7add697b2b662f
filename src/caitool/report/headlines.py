"""The report's headline numbers: one line per step that ran, shown at the top of the page and
printed on the terminal when the report is written."""

from __future__ import annotations

from caitool.eval_stats import percent
from caitool.report.layout import (
    EVAL_DIR,
    METRICS_FILE,
    PREFS,
    RL_STAGES,
    RM_DIR,
    SUMMARY_FILE,
    Run,
    read_json,
    read_preferences,
    read_revisions,
    stage_log,
)


def headline_numbers(run: Run) -> list[str]:
    lines = []
    final = run.last_revise()
    if final is not None:
        revisions = read_revisions(final)
        rounds = max((len(r.rounds) for r in revisions), default=0)
        lines.append(f"{len(revisions)} prompts critiqued and revised over {rounds} round(s)")
    prefs = run.path(PREFS)
    if prefs.exists():
        records = read_preferences(prefs)
        both = [r for r in records if r.p_swapped is not None]
        disagree = sum((r.p_first > 0.5) != (r.p_swapped > 0.5) for r in both)  # type: ignore[operator]
        if both:
            lines.append(
                f"{len(records)} preference labels; "
                f"option orders disagreed on {percent(disagree / len(both))}"
            )
    metrics = read_json(run.path(RM_DIR, METRICS_FILE)) or {}
    held = metrics.get("held_out") or {}
    if held.get("pairs"):
        decided = held.get("decided_pairs", held["pairs"])
        lines.append(f"reward model held-out accuracy {percent(held['accuracy'])} on {decided} pairs")
    for stage in run.rl_stages():
        log = stage_log(run, stage)
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
    summary = read_json(run.path(EVAL_DIR, SUMMARY_FILE)) or {}
    for prompt_set in summary.get("prompt_sets", []):
        rates = ", ".join(
            f"{m['model_name']} {percent(m['refusal_rate'])}"
            for m in summary.get("per_model", [])
            if m["prompt_set"] == prompt_set
        )
        lines.append(f"refusal rate on {prompt_set}: {rates}")
        lines.extend(_safety_headlines(prompt_set, summary))
    for pair in summary.get("pairwise", []):
        low, high = pair["win_rate_ci"]
        lines.append(
            f"{pair['prompt_set']}: {pair['model_a']} preferred over {pair['model_b']} in "
            f"{percent(pair['win_rate'])} (95% CI {percent(low)}-{percent(high)})"
        )
    return lines


def _safety_headlines(prompt_set: str, summary: dict) -> list[str]:
    """Both axes of a labelled set, per model, so refusing everything shows as over-refusal."""
    lines = []
    for axis, n_key, label in (
        ("harmful_compliance", "n_expect_refuse", "harmful compliance"),
        ("over_refusal", "n_expect_comply", "over-refusal"),
    ):
        figures = [
            f"{m['model_name']} {percent(m[axis])} ({ci_text(m.get(axis + '_ci'))}, n={m[n_key]})"
            for m in summary.get("per_model", [])
            if m["prompt_set"] == prompt_set and m.get(axis) is not None
        ]
        if figures:
            lines.append(f"{label} on {prompt_set}: {', '.join(figures)}")
    return lines


def ci_text(ci: list[float] | None) -> str:
    return "95% CI -" if not ci else f"95% CI {percent(ci[0])}-{percent(ci[1])}"
