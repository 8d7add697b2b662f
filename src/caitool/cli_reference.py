"""The command reference, written from the Typer app itself, and the check that a ``caitool ...`` line
parses against it.

The documentation site builds one page per command from here (``docs/hooks/cli_reference.py``), and
the tests run every ``caitool`` line of the README, the docs and the commands' own examples through
``check_command_line``, so ``--help``, the reference and the examples cannot drift apart.
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass
from typing import Any

import typer
import typer.main

from caitool.cli import app

# A paragraph of a command's help that is an example: "Example: caitool generate ...".
EXAMPLE_PARAGRAPH = re.compile(r"^(?P<label>[A-Z][A-Za-z ]*): caitool (?P<args>.+)$", re.DOTALL)


class CommandLineError(ValueError):
    """A ``caitool ...`` line the command-line interface would refuse."""


@dataclass(frozen=True)
class Command:
    """One runnable subcommand: its words after ``caitool`` and the click command behind them."""

    words: tuple[str, ...]
    command: Any

    @property
    def name(self) -> str:
        return " ".join(self.words)

    @property
    def page(self) -> str:
        """The reference page's file name under ``reference/``."""
        return "-".join(self.words) + ".md"


def root_command() -> Any:
    """The click command behind the app, rebuilt only when a command or sub-app was added."""
    return _built(len(app.registered_commands), len(app.registered_groups))


@functools.lru_cache(maxsize=4)
def _built(commands: int, groups: int) -> Any:
    return typer.main.get_command(app)


def commands() -> list[Command]:
    """Every runnable subcommand, sub-apps (``constitution check``) included, in --help order."""
    found: list[Command] = []

    def walk(group: Any, words: tuple[str, ...]) -> None:
        for name, command in group.commands.items():
            if getattr(command, "hidden", False):
                continue
            if hasattr(command, "commands"):
                walk(command, (*words, name))
            else:
                found.append(Command((*words, name), command))

    walk(root_command(), ())
    return found


def _help_text(command: Any) -> str:
    # The help is rich markup: "\[" is a literal bracket there.
    return (command.help or "").replace("\\[", "[").strip()


def _paragraphs(text: str) -> list[str]:
    return [paragraph.strip() for paragraph in re.split(r"\n\s*\n", text) if paragraph.strip()]


def docstring_examples(command: Any) -> list[tuple[str, str]]:
    """(label, arguments after ``caitool``) for each example paragraph of a command's help."""
    examples = []
    for paragraph in _paragraphs(_help_text(command)):
        match = EXAMPLE_PARAGRAPH.match(paragraph)
        if match:
            examples.append((match["label"], " ".join(match["args"].split())))
    return examples


def _resolve(words: list[str]) -> tuple[Any, list[str], list[str]]:
    """The command the leading words name, the words naming it, and the arguments left."""
    command, path = root_command(), []
    while hasattr(command, "commands"):
        if not words or words[0].startswith("-"):
            if set(words) & {"--help"} or not words:
                return command, path, words
            raise CommandLineError(f"caitool {' '.join(path)}: expected a command before {words[0]!r}")
        name, words = words[0], words[1:]
        if name not in command.commands:
            known = ", ".join(command.commands)
            raise CommandLineError(f"caitool {' '.join([*path, name])}: no such command (known: {known})")
        command, path = command.commands[name], [*path, name]
    return command, path, words


def check_command_line(args: list[str] | str) -> None:
    """Parse the arguments after ``caitool`` as the CLI would, without running anything.

    Unknown commands and options, missing or extra arguments, and values an option refuses (a
    choice, a range) raise CommandLineError with the CLI's own message. Files are not opened.
    """
    words = shlex.split(args) if isinstance(args, str) else list(args)
    command, path, rest = _resolve(words)
    if hasattr(command, "commands") or "--help" in rest:
        return
    try:
        command.make_context(" ".join(["caitool", *path]), rest)
    except Exception as err:  # the CLI's usage errors all carry format_message()
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        raise CommandLineError(f"caitool {' '.join(words)}: {message}") from None


# ---------------------------------------------------------------------------
# Markdown


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _option_names(param: Any) -> str:
    names = [*param.opts, *param.secondary_opts]
    return " / ".join(f"`{name}`" for name in names)


def _default(param: Any) -> str:
    default = param.default
    if param.required:
        return "required"
    if default is None or default == () or default == []:
        return ""
    if isinstance(default, bool):
        if param.secondary_opts:
            return f"`{param.opts[0] if default else param.secondary_opts[0]}`"
        return "on" if default else "off"
    value = getattr(default, "value", default)
    if isinstance(value, list | tuple):
        return " ".join(f"`{item}`" for item in value)
    return f"`{value}`"


def _type(param: Any, ctx: Any) -> str:
    if getattr(param, "is_flag", False) or (isinstance(param.default, bool) and param.secondary_opts):
        return "flag"
    label = param.display_type(ctx).strip("<>")
    if getattr(param, "multiple", False) or param.nargs == -1:
        more = ", repeatable" if getattr(param, "multiple", False) else ", one or more"
        label = label.removeprefix("list[").removesuffix("]") + more
    if label.endswith(" range"):
        low, high = getattr(param, "min", None), getattr(param, "max", None)
        bounds = [f">= {low}" if low is not None else "", f"<= {high}" if high is not None else ""]
        label = label.removesuffix(" range") + " (" + ", ".join(b for b in bounds if b) + ")"
    return _cell(label)


def _usage(command: Command) -> str:
    pieces = ["caitool", *command.words, "[OPTIONS]"]
    for param in command.command.params:
        if not param.opts[0].startswith("-"):
            name = (param.metavar or param.name).upper()
            pieces.append(name + ("..." if param.nargs == -1 else ""))
    return " ".join(pieces)


def reference_page(command: Command) -> str:
    """A command's reference page: its help text, examples as shell blocks, usage, every parameter."""
    import typer.core

    ctx = typer.core._click.Context(command.command, info_name=command.name)
    lines = [f"# caitool {command.name}", ""]
    for paragraph in _paragraphs(_help_text(command.command)):
        match = EXAMPLE_PARAGRAPH.match(paragraph)
        if match:
            example = "caitool " + " ".join(match["args"].split())
            lines += [f"{match['label']}:", "", "```bash", example, "```"]
        else:
            lines.append(" ".join(paragraph.split()))
        lines.append("")
    lines += ["## Usage", "", "```text", _usage(command), "```", ""]
    arguments = [p for p in command.command.params if not p.opts[0].startswith("-")]
    options = [p for p in command.command.params if p.opts[0].startswith("-")]
    if arguments:
        lines += ["## Arguments", "", "| argument | type | default | description |", "|---|---|---|---|"]
        for param in arguments:
            name = (param.metavar or param.name).upper()
            help_text = _cell(param.help or "")
            lines.append(f"| `{name}` | {_type(param, ctx)} | {_default(param)} | {help_text} |")
        lines.append("")
    lines += ["## Options", "", "| option | type | default | description |", "|---|---|---|---|"]
    for param in options:
        cells = [_option_names(param), _type(param, ctx), _default(param), _cell(param.help or "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| `--help` | flag |  | Show the help and exit. |")
    lines.append("")
    lines.append(
        "*Generated from `caitool " + command.name + " --help` when the site is built; "
        "edit the command's docstring and options in `src/caitool/cli.py`, not this page.*"
    )
    return "\n".join(lines) + "\n"


def reference_index(found: list[Command]) -> str:
    """The reference's first page: every command with the first line of its help."""
    lines = [
        "# Command reference",
        "",
        "One page per command, generated from the Typer app when the site is built, so it says what",
        "`caitool COMMAND --help` says. `caitool --help` lists them too.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for command in found:
        summary = _paragraphs(_help_text(command.command))[0].splitlines()[0]
        lines.append(f"| [`caitool {command.name}`]({command.page}) | {_cell(summary)} |")
    return "\n".join(lines) + "\n"


def reference_pages() -> dict[str, str]:
    """File name under ``reference/`` -> Markdown, for the index and every command."""
    found = commands()
    pages = {"index.md": reference_index(found)}
    pages.update({command.page: reference_page(command) for command in found})
    return pages
