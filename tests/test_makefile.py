"""The demo Makefile remakes exactly the steps that read a changed variable."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def finished_run(tmp_path):
    """A run directory whose every step make considers done (make -t), with a stand-in venv."""
    run, venv = tmp_path / "run", tmp_path / "venv"
    for sub in ("eval-prompts", "sft", "rm", "ppo", "eval"):
        (run / sub).mkdir(parents=True)
    venv.mkdir()
    make(run, venv, "-t")
    return run, venv


def make(run, venv, *args):
    result = subprocess.run(
        ["make", "-C", str(ROOT), "demo", f"RUN={run}", f"VENV={venv}", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def steps_to_redo(run, venv, *assignments):
    """The caitool subcommands ``make -n`` would run, in order."""
    return re.findall(r"caitool ([a-z-]+)", make(run, venv, "-n", *assignments))


def test_an_unchanged_run_redoes_nothing(finished_run):
    assert steps_to_redo(*finished_run) == []


def test_changing_a_late_variable_keeps_the_early_steps(finished_run):
    assert steps_to_redo(*finished_run, "PPO_STEPS=3") == ["ppo", "eval", "report"]


def test_changing_the_feedback_model_starts_at_the_labels(finished_run):
    redo = steps_to_redo(*finished_run, "FEEDBACK=some/judge")
    assert redo == ["label-preferences", "train-rm", "ppo", "eval", "report"]


def test_changing_the_prompt_count_redoes_everything(finished_run):
    redo = steps_to_redo(*finished_run, "N=5")
    assert redo[:3] == ["generate", "critique", "revise"] and redo[-1] == "report"
    assert "sft" in redo and "train-rm" in redo


def test_changing_the_precision_redoes_what_generates_or_scores(finished_run):
    redo = steps_to_redo(*finished_run, "DTYPE=bfloat16")
    assert redo[:3] == ["generate", "critique", "revise"]
    assert "--dtype bfloat16" in make(*finished_run, "-n", "DTYPE=bfloat16")


def test_a_served_generation_model_reaches_the_steps_that_generate(finished_run):
    assignments = ("GEN_MODEL=openai:smol", "BASE_URL=http://127.0.0.1:8000/v1 http://127.0.0.1:8001/v1")
    redo = steps_to_redo(*finished_run, *assignments)
    assert redo[:3] == ["generate", "critique", "revise"] and "label-preferences" in redo
    commands = re.sub(r"\\\n\s*", " ", make(*finished_run, "-n", *assignments))
    generate = next(line for line in commands.splitlines() if "caitool generate" in line)
    assert "-m openai:smol" in generate
    assert "--base-url http://127.0.0.1:8000/v1 --base-url http://127.0.0.1:8001/v1" in generate
    sft = next(line for line in commands.splitlines() if "caitool sft" in line)
    assert "-m default" in sft  # training needs the local weights
