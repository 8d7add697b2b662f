"""HTML building blocks of the report: escaping, tables, sections, the style sheet and the page.

Everything the page holds is made here or by :mod:`caitool.report.plots` (images as data URIs),
so the file stands alone: no script, no style sheet or image fetched from anywhere.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from caitool.eval_stats import SummaryTable

TEXT_LIMIT = 900


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def clip(text: str | None, limit: int = TEXT_LIMIT) -> str:
    text = text or ""
    return text if len(text) <= limit else text[:limit] + f" … [{len(text) - limit} more characters]"


def para(text: str | None) -> str:
    """A response as readable HTML: escaped, clipped, line breaks kept."""
    return f'<div class="text">{esc(clip(text))}</div>'


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[int] = ()) -> str:
    """Cells are HTML already (escape record text with :func:`esc`); ``numeric`` columns align right."""
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


def summary_table(summary: SummaryTable) -> str:
    """One of eval's tables, the same rows the console shows, intervals set apart."""
    rows = [
        [esc(cell.text) + (f' <span class="ci">{esc(cell.ci)}</span>' if cell.ci else "") for cell in row]
        for row in summary.rows
    ]
    figures = range(summary.label_columns, len(summary.headers))
    return table(summary.headers, rows, numeric=tuple(figures))


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def not_run(what: str, artifact: str) -> str:
    return f'<p class="missing">Not run: no <code>{esc(artifact)}</code> here ({esc(what)}).</p>'


def number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def page(*, title: str, heading: str, subtitle: str, nav: Sequence[tuple[str, str]], body: str) -> str:
    """The whole document: inline style sheet, navigation links (anchor, label), then ``body``."""
    links = "".join(f'<a href="#{anchor}">{esc(label)}</a>' for anchor, label in nav)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{esc(heading)}</h1>"
        f'<p class="subtitle">{subtitle}</p>'
        f"<nav>{links}</nav>{body}</main></body></html>\n"
    )


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
