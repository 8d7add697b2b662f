"""MkDocs hook: the command reference, one page per command, written from the Typer app at build time.

mkdocs.yml names ``reference/index.md`` in its nav; this hook makes that entry a section holding the
index and a page for every command the app has, so a new command gets its page (and its place in
the nav) without anyone writing one. The pages are built in memory and never stored in docs/.
"""

from __future__ import annotations

from typing import Any

from mkdocs.structure.files import File, Files

from caitool.cli_reference import commands, reference_pages

REFERENCE_INDEX = "reference/index.md"


def _expand(nav: list[Any]) -> list[Any]:
    expanded = []
    for entry in nav:
        if isinstance(entry, dict):
            ((title, target),) = entry.items()
            if target == REFERENCE_INDEX:
                pages = [{"Overview": REFERENCE_INDEX}]
                pages += [{f"caitool {c.name}": f"reference/{c.page}"} for c in commands()]
                entry = {title: pages}
            elif isinstance(target, list):
                entry = {title: _expand(target)}
        expanded.append(entry)
    return expanded


def on_config(config: Any) -> Any:
    if config.nav:
        config.nav = _expand(config.nav)
    return config


def on_files(files: Files, config: Any) -> Files:
    for name, content in reference_pages().items():
        files.append(File.generated(config, f"reference/{name}", content=content))
    return files
