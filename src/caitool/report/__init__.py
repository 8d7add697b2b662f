"""``caitool report``: one self-contained HTML page about a run directory.

The page reads the layout ``make demo`` writes (:mod:`caitool.report.layout`) and shows, step
by step: what each step produced and how long it took, the constitution, revisions before and
after with their principles, the preference labels and how often the two option orders
disagreed, the reward model's held-out accuracy and calibration, the curves of the RL stage that
ran (PPO, RLOO or DPO) and the eval tables (:mod:`caitool.report.sections`). Plots are matplotlib
PNGs embedded as data URIs (:mod:`caitool.report.plots`) and the CSS is inline
(:mod:`caitool.report.html`), so the file stands alone: mail it, attach it to an issue.
"""

from __future__ import annotations

from pathlib import Path

from caitool.errors import CaitoolError
from caitool.provenance import now_iso
from caitool.report.headlines import headline_numbers
from caitool.report.html import duration, esc, page, section
from caitool.report.layout import Run, collect_steps, read_timings
from caitool.report.sections import SECTIONS

__all__ = ["Run", "read_timings", "render_page", "run_report"]


def render_page(run: Run) -> str:
    headlines = headline_numbers(run)
    headline = (
        '<div class="headline"><strong>Headline numbers</strong><ul>'
        + "".join(f"<li>{esc(line)}</li>" for line in headlines)
        + "</ul></div>"
        if headlines
        else ""
    )
    shown = [s for s in SECTIONS if s.shown(run)]
    body = "".join(section(s.anchor, s.title, s.body(run)) for s in shown)
    return page(
        title=f"caitool report: {run.root.name}",
        heading=f"Constitutional AI run: {run.root.name}",
        subtitle=f"<code>{esc(run.root.resolve())}</code> · report written {esc(now_iso())}",
        nav=[(s.anchor, s.nav) for s in shown],
        body=headline + body,
    )


def run_report(run_dir: str | Path, output: str | Path, *, constitution: str | None = None) -> Path:
    """Write the page atomically and print where every artifact is and the headline numbers."""
    root = Path(run_dir)
    if not root.is_dir():
        raise CaitoolError("no such run directory", where=str(root))
    run = Run.open(root, constitution=constitution)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(render_page(run), encoding="utf-8")
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
        artifacts.add_row(step.name, where, step.count, duration(step.seconds), peak)
    console.print(artifacts)
    console.print("[bold]Headline numbers[/bold]")
    for line in headline_numbers(run):
        console.print(f"  • {line}", highlight=False)
    console.print(f"Report: {output}")
