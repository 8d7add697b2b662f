"""Rich renderings shared by commands that print to a person (tables, panels)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from caitool.constitution import Constitution


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
