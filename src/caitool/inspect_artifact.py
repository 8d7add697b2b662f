"""``caitool inspect``: a quick look at any caitool artifact.

A JSONL file gets its kind, record count, fields (with how many records carry each and
their JSON types), its provenance manifest, and a few records rendered for reading: a
revision record shows its rounds side by side, a preference record its chosen and
rejected responses side by side. A model or eval directory gets its manifest, its files
and a digest of its training log or summary.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.json import JSON
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from caitool.display import show_eval_summary
from caitool.errors import CaitoolError
from caitool.evaluate import SUMMARY_FILE
from caitool.jsonl_io import iter_json_lines, manifest_path
from caitool.provenance import MODEL_MANIFEST
from caitool.training import TRAINING_LOG

TEXT_LIMIT = 700  # characters of one response shown; the file keeps the rest


def run_inspect(artifact: str | Path, *, records: int = 2, console: Console | None = None) -> None:
    console = console or Console()
    path = Path(artifact)
    if path.is_dir():
        inspect_directory(path, console)
    elif path.exists():
        inspect_jsonl(path, records, console)
    else:
        raise CaitoolError("no such file or directory", where=str(path))


# ---------------------------------------------------------------------------
# JSONL files


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def scan_jsonl(
    path: Path, keep: int
) -> tuple[int, Counter[str], dict[str, Counter[str]], list[dict[str, Any]]]:
    """Record count, kinds, per-field type counts, and the first ``keep`` records (one pass)."""
    count = 0
    kinds: Counter[str] = Counter()
    fields: dict[str, Counter[str]] = {}
    first: list[dict[str, Any]] = []
    for _, record in iter_json_lines(path):
        count += 1
        kinds[str(record.get("kind", "(none)"))] += 1
        for key, value in record.items():
            fields.setdefault(key, Counter())[json_type(value)] += 1
        if len(first) < keep:
            first.append(record)
    return count, kinds, fields, first


def inspect_jsonl(path: Path, keep: int, console: Console) -> None:
    count, kinds, fields, first = scan_jsonl(path, keep)
    kind_text = ", ".join(f"{kind} ({n})" for kind, n in kinds.most_common()) or "-"
    console.print(f"[bold]{path}[/bold]  {count} records  kind: [cyan]{kind_text}[/cyan]")
    table = Table(title="Fields", title_justify="left")
    table.add_column("field", style="cyan")
    table.add_column("records", justify="right")
    table.add_column("types")
    for key, types in fields.items():
        table.add_row(
            key, f"{sum(types.values())}/{count}", ", ".join(f"{t} ({n})" for t, n in types.most_common())
        )
    console.print(table)
    show_manifest(manifest_path(path), console)
    for record in first:
        console.print(render_record(record))


def show_manifest(path: Path, console: Console) -> None:
    if not path.exists():
        console.print(f"[dim]no provenance manifest ({path.name})[/dim]")
        return
    manifest = json.loads(path.read_text())
    lines = [
        f"phase: {manifest.get('phase')}",
        f"command: {manifest.get('command')}",
        f"ran: {manifest.get('started_at')} -> {manifest.get('finished_at')}",
    ]
    for role, info in (manifest.get("models") or {}).items():
        if isinstance(info, dict) and info.get("backend") == "openai":
            where = ", ".join(info.get("base_urls") or [])
            lines.append(f"model {role}: {info.get('spec')} served at {where} (root {info.get('root')})")
        elif isinstance(info, dict):
            lines.append(f"model {role}: {info.get('path')} (sha256 {str(info.get('sha256', ''))[:12]})")
        else:
            lines.append(f"model {role}: {info}")
    constitution = manifest.get("constitution")
    if isinstance(constitution, dict):
        lines.append(
            f"constitution: {constitution.get('name')} {constitution.get('version')} "
            f"(hash {constitution.get('hash')})"
        )
    for source in manifest.get("inputs") or []:
        lines.append(f"input: {source.get('path')} (sha256 {str(source.get('sha256', '-'))[:12]})")
    if manifest.get("params"):
        lines.append("params: " + json.dumps(manifest["params"], ensure_ascii=False))
    if manifest.get("counts"):
        lines.append("counts: " + json.dumps(manifest["counts"], ensure_ascii=False))
    console.print(Panel("\n".join(lines), title=f"provenance ({path.name})", title_align="left", expand=True))


# ---------------------------------------------------------------------------
# One record, rendered for reading


def clip(text: str | None) -> str:
    text = text or ""
    return (
        text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + f" … [{len(text) - TEXT_LIMIT} more chars]"
    )


def conversation_text(messages: Any) -> Text:
    text = Text()
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict):
            text.append(f"{message.get('role', '?')}: ", style="bold")
            text.append(clip(str(message.get("content", ""))) + "\n")
    return text


def last_content(messages: Any) -> str:
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return str(messages[-1].get("content", ""))
    return ""


def render_record(record: dict[str, Any]) -> Panel:
    renderers = {
        "revision": _revision,
        "preference": _preference,
        "revision_pair": _revision_pair,
        "generation": _generation,
    }
    renderer = renderers.get(str(record.get("kind")))
    body = renderer(record) if renderer is not None else JSON(json.dumps(record, ensure_ascii=False))
    return Panel(body, title=f"{record.get('kind', 'record')} {record.get('id', '')}", title_align="left")


def _revision(record: dict[str, Any]) -> Group:
    table = Table(show_lines=True, expand=True)
    table.add_column("initial response")
    cells = [clip(record.get("initial_response"))]
    for number, round_ in enumerate(record.get("rounds") or [], start=1):
        table.add_column(f"round {number}: {round_.get('principle_id')}")
        cell = Text()
        cell.append("critique: ", style="bold yellow")
        cell.append(clip(round_.get("critique")) + "\n\n")
        cell.append("revision: ", style="bold green")
        cell.append(
            clip(round_.get("revision")) if round_.get("revision") is not None else "(not revised yet)"
        )
        if round_.get("flags"):
            cell.append(f"\nflags: {', '.join(round_['flags'])}", style="red")
        cells.append(cell)
    table.add_row(*cells)
    return Group(conversation_text(record.get("prompt")), table)


def _pair(record: dict[str, Any], chosen: str, rejected: str, facts: str) -> Group:
    """Any preference pair: the prompt, chosen beside rejected under the given headings, then facts."""
    table = Table(show_lines=True, expand=True)
    table.add_column(f"{chosen} (p = {record.get('p_chosen', 0):.2f})", style="green")
    table.add_column(rejected, style="red")
    table.add_row(clip(last_content(record.get("chosen"))), clip(last_content(record.get("rejected"))))
    return Group(conversation_text(record.get("prompt")), table, Text(facts, style="dim"))


def _preference(record: dict[str, Any]) -> Group:
    swapped = record.get("p_swapped")
    shown_second = "-" if swapped is None else f"{swapped:.2f}"
    facts = (
        f"principle: {record.get('principle_id')}   P(first better) as (A): {record.get('p_first', 0):.2f}, "
        f"as (B): {shown_second}   labeller: {record.get('feedback_model')}"
    )
    return _pair(record, "chosen", "rejected", facts)


def _revision_pair(record: dict[str, Any]) -> Group:
    principles = ", ".join(record.get("principle_ids") or [])
    facts = (
        f"from record {record.get('source_id')}   principles: {principles}   "
        f"flags: {', '.join(record.get('flags') or []) or '-'}   model: {record.get('model')}"
    )
    chosen = f"chosen: revision of round {record.get('round')}"
    return _pair(record, chosen, "rejected: initial response", facts)


def _generation(record: dict[str, Any]) -> Group:
    table = Table(show_lines=True, expand=True)
    responses = record.get("responses") or []
    finished = record.get("finished") or []
    for index, _ in enumerate(responses):
        cut = "" if index < len(finished) and finished[index] else " (cut at max tokens)"
        table.add_column(f"response {index + 1}{cut}")
    table.add_row(*[clip(r) for r in responses])
    return Group(
        conversation_text(record.get("prompt")), table, Text(f"model: {record.get('model')}", style="dim")
    )


# ---------------------------------------------------------------------------
# Directories


def inspect_directory(path: Path, console: Console) -> None:
    manifest = path / MODEL_MANIFEST
    if not manifest.exists():
        raise CaitoolError(f"not a caitool model or eval directory (no {MODEL_MANIFEST})", where=str(path))
    console.print(f"[bold]{path}[/bold]")
    show_manifest(manifest, console)
    files = Table(title="Files", title_justify="left")
    files.add_column("file", style="cyan")
    files.add_column("size", justify="right")
    for item in sorted(p for p in path.iterdir() if p.is_file()):
        files.add_row(item.name, _size(item.stat().st_size))
    console.print(files)
    log = path / TRAINING_LOG
    if log.exists():
        console.print(training_log_digest(log))
    summary = path / SUMMARY_FILE
    if summary.exists():
        show_eval_summary(json.loads(summary.read_text()), console)


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KB", "MB", "GB"):
        value /= 1024
        if value < 1024 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


def training_log_digest(log: Path) -> Table:
    """First, last, min and max of every numeric quantity the training log records."""
    series: dict[str, list[float]] = {}
    entries = 0
    for _, entry in iter_json_lines(log):
        entries += 1
        for key, value in entry.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                series.setdefault(key, []).append(float(value))
    table = Table(title=f"{log.name} ({entries} entries)", title_justify="left")
    for column in ("quantity", "entries", "first", "last", "min", "max"):
        table.add_column(column, justify="left" if column == "quantity" else "right")
    for key, values in series.items():
        table.add_row(
            key, str(len(values)), *(f"{v:.4g}" for v in (values[0], values[-1], min(values), max(values)))
        )
    return table
