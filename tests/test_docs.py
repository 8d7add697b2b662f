"""Every shell block a user would paste from README.md or docs/ is checked against the code.

Each ``caitool ...`` line (also after ``python -m``, ``accelerate launch ... -m``, ``torchrun ... -m``)
is parsed by the real CLI: an unknown command or option, or a value an option refuses, fails. Each
``make`` target must exist in the Makefile, each repository file a line names must exist, and the
lines that are cheap offline (constitution check/show, inspect of a bundled file, --help) are run.
New pages under docs/ are picked up without registration.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.cli_reference import CommandLineError, check_command_line

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)[^\n]*$")
REPO_DIRS = ("benchmarks/", "examples/", "configs/", "constitutions/", "docs/", "tests/", "src/")
# Commands whose doc lines run here when every file they name exists: no model, seconds at most.
CHEAP = {("constitution", "check"), ("constitution", "show"), ("inspect",)}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@dataclass(frozen=True)
class ShellLine:
    where: str  # file:line
    words: tuple[str, ...]


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of each fenced block in a shell language (or none)."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(opening["fence"]):
            end += 1
        if opening["lang"].lower() in SHELL_LANGUAGES:
            blocks.append((i + 2, "\n".join(lines[i + 1 : end])))
        i = end + 1
    return blocks


def simple_commands(line: str) -> list[list[str]]:
    """The words of each simple command of one shell line, split at ; && || | and redirections."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    skip_next = False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif token in {">", ">>", "<", "2>", "&>"}:
            skip_next = True
        elif set(token) <= set(";&|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def shell_lines(path: Path) -> list[ShellLine]:
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    for start, body in shell_blocks(path.read_text()):
        logical, first = "", None
        for offset, raw in enumerate(body.split("\n")):
            text = raw.strip()
            if first is None:
                first = start + offset
                text = text.removeprefix("$ ")
            logical += " " + text.removesuffix("\\")
            if text.endswith("\\"):
                continue
            for words in simple_commands(logical):
                found.append(ShellLine(f"{name}:{first}", tuple(words)))
            logical, first = "", None
    return found


def caitool_arguments(words: tuple[str, ...]) -> list[str] | None:
    """The arguments after ``caitool`` when the command runs caitool, else None."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value caitool ...
        words = words[1:]
    if not words:
        return None
    if Path(words[0]).name == "caitool":
        return list(words[1:])
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1] == "caitool":
            return list(words[i + 2 :])
    return None


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, flags=re.M))


def problems_in(path: Path) -> list[str]:
    """What is wrong with the shell lines of one Markdown file (empty: nothing)."""
    problems, targets = [], makefile_targets()
    for line in shell_lines(path):
        arguments = caitool_arguments(line.words)
        if arguments is not None:
            try:
                check_command_line(arguments)
            except CommandLineError as err:
                problems.append(f"{line.where}: {err}")
        elif line.words[0] == "make":
            for word in line.words[1:]:
                if not word.startswith("-") and "=" not in word and word not in targets:
                    problems.append(f"{line.where}: make has no target {word!r}")
        for word in line.words:
            if word.startswith(REPO_DIRS) and not any(c in word for c in "*$") and not (ROOT / word).exists():
                problems.append(f"{line.where}: no such file in the repository: {word}")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shell_line_in_a_doc_matches_the_code(path):
    assert problems_in(path) == []


def test_the_docs_have_shell_lines_to_check():
    lines = [line for path in doc_files() for line in shell_lines(path)]
    commands = {tuple(caitool_arguments(line.words) or ())[:1] for line in lines}
    # Every phase is shown somewhere; the pages are really read, not skipped.
    for name in ("generate", "critique", "revise", "sft", "label-preferences", "judge-check", "train-rm"):
        assert (name,) in commands, name
    for name in ("ppo", "rloo", "dpo", "pairs-from-revisions", "eval", "report", "inspect", "constitution"):
        assert (name,) in commands, name
    assert any(line.words[:2] == ("make", "demo") for line in lines)


def test_a_misspelt_option_in_a_doc_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n```bash\n# the tour\ncaitool generate runs/p.jsonl -o runs/base.jsonl \\\n"
        "    --max-new-tokns 64\nmake demo N=4\n```\n\n"
        "```python\ncaitool = 'not a shell line --frobnicate'\n```\n"
    )
    found = [(line.where.rsplit(":", 1)[1], line.words[:2]) for line in shell_lines(page)]
    assert found == [("5", ("caitool", "generate")), ("7", ("make", "demo"))]
    problems = problems_in(page)
    assert len(problems) == 1 and "No such option: --max-new-tokns" in problems[0]
    assert problems[0].startswith("page.md:5:")


def test_an_unknown_make_target_or_missing_file_in_a_doc_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\nmake docz\nbash examples/no_such_script.sh\n"
        "accelerate launch --config_file configs/accelerate/multi-gpu.yaml \\\n"
        "    -m caitool sft a.jsonl -o o --epoch 1\n```\n"
    )
    problems = problems_in(page)
    assert any("make has no target 'docz'" in p for p in problems)
    assert any("examples/no_such_script.sh" in p for p in problems)
    assert any("No such option: --epoch" in p for p in problems)
    assert len(problems) == 3


def test_the_cheap_lines_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    runner, ran = CliRunner(), []
    for path in doc_files():
        for line in shell_lines(path):
            arguments = caitool_arguments(line.words)
            if arguments is None:
                continue
            names = tuple(arguments[:2] if arguments[:1] == ["constitution"] else arguments[:1])
            cheap = names in CHEAP or arguments == ["--help"]
            files = [a for a in arguments[len(names) :] if not a.startswith("-")]
            if cheap and all((ROOT / f).exists() or "/" not in f for f in files):
                result = runner.invoke(app, arguments)
                assert result.exit_code == 0, f"{line.where}: caitool {' '.join(arguments)}\n{result.output}"
                ran.append(arguments)
    assert any(a[:2] == ["constitution", "check"] for a in ran)
    assert any(a[:2] == ["constitution", "show"] for a in ran)
    assert any(a[:1] == ["inspect"] for a in ran)


def test_the_readme_is_a_front_door_with_working_links():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).exists(), target
