"""Progress on stderr (records/s and tokens/s) and the one-line summary at the end.

Everything here writes to stderr, so ``-o -`` keeps stdout pure JSONL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr = Console(stderr=True)
_silenced = False


def silence() -> None:
    """Print nothing more from this process (a process of a multi-process run other than the main one)."""
    global _silenced
    _silenced = True


class PhaseProgress:
    """Counts records and generated tokens; renders a live bar when stderr is a terminal."""

    def __init__(self, progress: Progress | None, task_id: int | None, total: int, already_done: int):
        self._progress = progress
        self._task_id = task_id
        self.total = total
        self.records = 0
        self.tokens = 0
        self.already_done = already_done
        self._started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def rates(self) -> tuple[float, float]:
        elapsed = max(self.elapsed, 1e-9)
        return self.records / elapsed, self.tokens / elapsed

    def rate_text(self, separator: str) -> str:
        """Records per second, and tokens per second for phases that generate (a labeller writes none)."""
        per_record, per_token = self.rates()
        rates = [f"{per_record:.2f} rec/s"] + ([f"{per_token:.1f} tok/s"] if self.tokens else [])
        return separator.join(rates)

    def advance(self, records: int, tokens: int = 0) -> None:
        self.records += records
        self.tokens += tokens
        if self._progress is not None and self._task_id is not None:
            self._progress.update(self._task_id, advance=records, rate=self.rate_text("  "))


@contextmanager
def phase_progress(label: str, total: int, already_done: int = 0) -> Iterator[PhaseProgress]:
    if _silenced or not stderr.is_terminal:
        yield PhaseProgress(None, None, total, already_done)
        return
    columns = (
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=False) as progress:
        task_id = progress.add_task(label, total=total, completed=already_done, rate="")
        yield PhaseProgress(progress, task_id, total, already_done)


def summary_line(label: str, tracker: PhaseProgress, **counts: object) -> str:
    parts = [f"{tracker.records} records in {tracker.elapsed:.1f}s ({tracker.rate_text(', ')})"]
    if tracker.already_done:
        parts.append(f"{tracker.already_done} resumed from a previous run")
    parts.extend(f"{key.replace('_', ' ')}: {value}" for key, value in counts.items())
    return f"{label}: " + "; ".join(parts)


def print_summary(line: str) -> None:
    if _silenced:
        return
    stderr.print(line, highlight=False, markup=False, soft_wrap=True)
