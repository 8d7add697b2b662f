"""Rich renderings shared by commands that print to a person (tables, panels)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from caitool.constitution import Constitution
from caitool.eval_stats import (
    ModelSummary,
    PairSummary,
    SummaryTable,
    model_table,
    pair_table,
    percent,
    safety_table,
)

if TYPE_CHECKING:  # judge-check's records only; the module itself loads a model's backends
    from caitool.judge_check import Figures, JudgeCheckResult, ModeReport


def show_constitution(constitution: Constitution, console: Console | None = None) -> None:
    console = console or Console()
    console.print(
        f"[bold]{constitution.name}[/bold] v{constitution.version}  hash {constitution.content_hash}\n"
        f"{constitution.description}"
    )
    critiques = Table(title="Critique / revision principles", show_lines=True, expand=True)
    critiques.add_column("id", style="cyan", no_wrap=True)
    critiques.add_column("critique request")
    critiques.add_column("revision request")
    for principle in constitution.critiques:
        critiques.add_row(principle.id, principle.critique, principle.revision)
    console.print(critiques)
    if constitution.comparisons:
        comparisons = Table(title="Comparison principles (RL feedback)", show_lines=True, expand=True)
        comparisons.add_column("id", style="cyan", no_wrap=True)
        comparisons.add_column("question")
        for principle in constitution.comparisons:
            comparisons.add_row(principle.id, principle.text)
        console.print(comparisons)
    shots = constitution.few_shot
    console.print(f"few-shot examples: {len(shots.critique)} critique, {len(shots.comparison)} comparison")


def show_table(summary: SummaryTable, console: Console) -> None:
    table = Table(title=summary.title)
    for index, header in enumerate(summary.headers):
        table.add_column(header, justify="left" if index < summary.label_columns else "right")
    for row in summary.rows:
        table.add_row(*(cell.plain() for cell in row))
    console.print(table)


def show_eval(result: Any, console: Console | None = None) -> None:
    """eval's per-model table and, when models were compared, its pairwise table."""
    show_eval_tables(result.models, result.pairs, console)


def show_eval_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """The tables of a summary.json read back from disk (inspect)."""
    models = [ModelSummary(**m) for m in summary.get("per_model", [])]
    show_eval_tables(models, [PairSummary(**p) for p in summary.get("pairwise", [])], console)


def show_eval_tables(
    models: Sequence[ModelSummary], pairs: Sequence[PairSummary], console: Console | None = None
) -> None:
    console = console or Console()
    show_table(model_table(models), console)
    if any(m.labelled for m in models):
        show_table(safety_table(models), console)
    counted_by = sorted({m.classified_by for m in models})
    if counted_by:
        console.print(f"refusals classified by: {', '.join(counted_by)}")
    if pairs:
        show_table(pair_table(pairs), console)


def verdict_line(report: ModeReport) -> str:
    return f"verdict ({report.mode}): {report.overall.verdict}: {report.overall.reason}"


def _verdict_mode_lines(report: Any) -> list[str]:
    """The verdict modes' own figures: answers that named no option, and the votes behind a label."""
    lines = []
    if report.unparseable:
        counts = report.unparseable
        lines.append(
            f"unparseable ({report.mode}): {counts['unparseable_answers']} of {counts['answers']} answers "
            f"named no option; {counts['unlabelled']} comparisons left out"
        )
    if report.samples:
        lines.append(
            f"votes ({report.mode}): {report.samples} answers sampled per question at temperature 1, "
            "the label their vote share (its 95% Wilson interval per comparison in the JSON report)"
        )
    return lines


def show_judge_check(result: JudgeCheckResult, console: Console | None = None) -> None:
    """Per mode: a table of the figures (overall and per group), the reliability line, the time; then
    one verdict line per mode (stdout)."""
    # Piped into a log, the table keeps its columns rather than wrapping at 80.
    console = console or Console(width=None if sys.stdout.isatty() else 140)
    columns = (
        "group",
        "n",
        "accuracy [95% CI]",
        "ties",
        "as (A)",
        "as (B)",
        "consistent",
        "mass",
        "ECE",
        "verdict",
    )
    for report in result.modes:
        table = Table(
            title=f"judge-check {report.mode}: {result.model} ({report.overall.verdict})",
            box=box.SIMPLE,
            title_justify="left",
        )
        for column in columns:
            table.add_column(
                column, justify="left" if column in ("group", "verdict") else "right", no_wrap=True
            )
        table.add_row("all", *_figure_cells(report.overall))
        for name, values in report.groups.items():
            table.add_section()
            for value, figures in values.items():
                table.add_row(f"{name}: {value}", *_figure_cells(figures))
        console.print(table)
        bins = ", ".join(
            f"{row['bin']}: {percent(row['accuracy'])} right at {row['mean_confidence']:.2f} "
            f"(n={row['count']})"
            for row in report.overall.reliability
        )
        console.print(f"reliability ({report.mode}, confidence -> accuracy): {bins}", highlight=False)
        console.print(
            f"seconds per comparison ({report.mode}): {report.seconds_per_comparison:.3f}", highlight=False
        )
        for line in _verdict_mode_lines(report):
            console.print(line, highlight=False, soft_wrap=True)
    console.print(
        "accuracy: both orders averaged, ties (within 0.005 of 0.5) apart; as (A)/(B): accuracy of one "
        "order with the better response shown first/second; mass: P(A)+P(B), score mode P(Yes)+P(No)",
        highlight=False,
    )
    if "prompt_tokens" in result.usage:
        usage = result.usage
        console.print(
            f"usage: {usage.get('requests', 0)} requests, {usage['prompt_tokens']} prompt tokens, "
            f"{usage.get('completion_tokens', 0)} completion tokens",
            highlight=False,
        )
    for report in result.modes:
        console.print(verdict_line(report), highlight=False, soft_wrap=True)


def _figure_cells(f: Figures) -> list[str]:
    return [
        str(f.n),
        f"{percent(f.accuracy)} [{percent(f.accuracy_ci[0])}, {percent(f.accuracy_ci[1])}]",
        str(f.ties),
        percent(f.accuracy_better_as_a),
        percent(f.accuracy_better_as_b),
        percent(f.order_consistency),
        "-" if f.mean_letter_mass is None else f"{f.mean_letter_mass:.2f}",
        f"{f.ece:.3f}",
        f.verdict,
    ]
