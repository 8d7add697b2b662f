import subprocess
import sys
import time

from typer.testing import CliRunner

from caitool.cli import app

runner = CliRunner()


def test_help_lists_the_subcommands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("generate", "constitution", "default-model"):
        assert command in result.output


def test_help_is_fast_and_imports_no_heavy_library():
    probe = (
        "import sys, time; t = time.perf_counter();"
        "from caitool.cli import app;"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules];"
        "print(heavy, time.perf_counter() - t)"
    )
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert output.startswith("[]"), output
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "caitool", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - started < 2.0


def test_every_command_help_has_an_example():
    for command in app.registered_commands:
        name = command.name or command.callback.__name__.replace("_", "-")
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0
        assert "Example" in result.output, name
