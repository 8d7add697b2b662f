"""Rich renderings shared by commands that print to a person (tables, panels)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from caitool.constitution import Constitution
from caitool.eval_stats import ModelSummary, PairSummary, SummaryTable, model_table, pair_table


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
    if pairs:
        show_table(pair_table(pairs), console)
