"""The command reference is written from the Typer app, and every example in a command's help parses."""

import pytest
import typer

from caitool.cli import app
from caitool.cli_reference import (
    CommandLineError,
    check_command_line,
    commands,
    docstring_examples,
    reference_pages,
)


def test_every_command_has_a_reference_page_with_every_option():
    pages = reference_pages()
    found = commands()
    names = {command.name for command in found}
    assert {"generate", "ppo", "eval", "constitution check", "constitution show"} <= names
    for command in found:
        page = pages[command.page]
        assert page.startswith(f"# caitool {command.name}\n")
        for param in command.command.params:
            for option in (*param.opts, *param.secondary_opts):
                if option.startswith("-"):
                    assert f"`{option}`" in page, (command.name, option)
        assert f"({command.page})" in pages["index.md"], command.name


def test_a_new_command_gets_a_page_without_anyone_writing_one(monkeypatch):
    extra = typer.Typer()

    @extra.command("shiny")
    def shiny(steps: int = typer.Option(3, "--steps", help="How many.")) -> None:
        """Do something new.

        Example: caitool tools shiny --steps 4
        """

    app.add_typer(extra, name="tools")
    try:
        pages = reference_pages()
        assert "tools-shiny.md" in pages and "`--steps`" in pages["tools-shiny.md"]
        assert "[`caitool tools shiny`](tools-shiny.md)" in pages["index.md"]
    finally:
        app.registered_groups.pop()


@pytest.mark.parametrize("command", commands(), ids=lambda c: c.name)
def test_every_example_in_a_commands_help_parses(command):
    examples = docstring_examples(command.command)
    assert examples, f"caitool {command.name} --help has no 'Example: caitool ...' paragraph"
    for _, arguments in examples:
        check_command_line(arguments)


def test_an_example_that_no_longer_parses_is_caught():
    generate = next(c for c in commands() if c.name == "generate").command
    original = generate.help
    generate.help = original + "\n\nExample: caitool generate in.jsonl -o out.jsonl --max-new-tokns 8"
    try:
        (label, arguments) = docstring_examples(generate)[-1]
        with pytest.raises(CommandLineError, match="No such option: --max-new-tokns"):
            check_command_line(arguments)
    finally:
        generate.help = original


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("generate in.jsonl -o out.jsonl --max-new-tokns 8", "No such option: --max-new-tokns"),
        ("generate in.jsonl --dtype float8", "float8"),
        ("generate in.jsonl -n 0", "-n"),
        ("ppo prompts.jsonl -o runs/ppo", "Missing option '--policy'"),
        ("sft a.jsonl b.jsonl -o runs/sft", "unexpected extra argument"),
        ("generat in.jsonl", "no such command"),
        ("constitution frobnicate harmless", "no such command"),
    ],
)
def test_a_line_the_cli_would_refuse_is_refused(line, message):
    with pytest.raises(CommandLineError, match=message):
        check_command_line(line)


def test_a_line_the_cli_accepts_is_accepted():
    check_command_line("eval a.jsonl b.jsonl -m base=default -m sft=runs/sft --judge none -o runs/eval")
    check_command_line(["constitution", "check", "constitutions/harmless.yaml"])
    check_command_line("ppo --help")
    check_command_line("--help")


def test_the_site_hook_puts_every_command_in_the_nav():
    pytest.importorskip("mkdocs")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "hooks" / "cli_reference.py"
    spec = importlib.util.spec_from_file_location("cli_reference_hook", path)
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    nav = hook._expand([{"Home": "index.md"}, {"Command reference": "reference/index.md"}])
    assert nav[0] == {"Home": "index.md"}
    section = nav[1]["Command reference"]
    assert section[0] == {"Overview": "reference/index.md"}
    pages = [next(iter(entry.values())) for entry in section[1:]]
    assert pages == [f"reference/{command.page}" for command in commands()]
