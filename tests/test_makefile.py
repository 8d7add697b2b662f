"""The demo Makefile remakes exactly the steps that read a changed variable."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def finish(tmp_path, *assignments):
    """A run directory whose every step make considers done (make -t), with a stand-in venv."""
    run, venv = tmp_path / "run", tmp_path / "venv"
    for sub in ("eval-prompts", "sft", "rm", "ppo", "rloo", "dpo", "grpo", "eval"):
        (run / sub).mkdir(parents=True)
    venv.mkdir()
    make(run, venv, "-t", *assignments)
    return run, venv


@pytest.fixture()
def finished_run(tmp_path):
    return finish(tmp_path)


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


def test_choosing_another_rl_stage_keeps_the_supervised_phase_and_the_labels(finished_run):
    assert steps_to_redo(*finished_run, "ALGO=rloo") == ["rloo", "eval", "report"]
    assert steps_to_redo(*finished_run, "ALGO=dpo") == ["dpo", "eval", "report"]
    redo = steps_to_redo(*finished_run, "ALGO=dpo", "DPO_PAIRS=revisions")
    assert redo == ["pairs-from-revisions", "dpo", "eval", "report"]


def test_eval_compares_the_stage_that_ran(finished_run):
    commands = make(*finished_run, "-n", "ALGO=dpo")
    eval_line = next(line for line in commands.splitlines() if "caitool eval" in line)
    assert "-m dpo=" in eval_line and "-m ppo=" not in eval_line
    assert "--rm" not in commands.split("caitool eval", 1)[1]  # dpo trains no reward model to score with


@pytest.mark.parametrize(
    ("algo", "change", "redo"),
    [
        ("dpo", None, []),
        ("dpo", "DPO_LR=1e-5", ["dpo", "eval", "report"]),
        # dpo trains no reward model, so new labels redo dpo and nothing else
        ("dpo", "FEEDBACK=some/judge", ["label-preferences", "dpo", "eval", "report"]),
        ("dpo", "PPO_STEPS=3", []),
        ("rloo", "RLOO_K=4", ["rloo", "eval", "report"]),
        ("rloo", "PPO_STEPS=3", ["rloo", "eval", "report"]),
        ("rloo", "DPO_LR=1e-5", []),
        # grpo's reward is the feedback model itself: new judge, new grpo; no labels or reward model
        ("grpo", None, []),
        ("grpo", "FEEDBACK=some/judge", ["grpo", "eval", "report"]),
        ("grpo", "JUDGE_MODE=group", ["grpo", "eval", "report"]),
        ("grpo", "GRPO_K=8", ["grpo", "eval", "report"]),
        ("grpo", "RLOO_K=4", []),
    ],
)
def test_each_rl_stage_follows_its_own_variables(tmp_path, algo, change, redo):
    run = finish(tmp_path, f"ALGO={algo}")
    assert steps_to_redo(*run, f"ALGO={algo}", *([change] if change else [])) == redo


def test_an_unknown_rl_stage_is_refused(finished_run):
    with pytest.raises(subprocess.CalledProcessError) as failure:
        make(*finished_run, "-n", "ALGO=a2c")
    assert "ALGO must be ppo, rloo, dpo or grpo" in failure.value.stderr


def test_grpo_is_judged_by_the_feedback_model_and_evaluated_without_a_reward_model(tmp_path):
    run = finish(tmp_path, "ALGO=grpo")
    commands = re.sub(
        r"\\\n\s*", " ", make(*run, "-n", "ALGO=grpo", "FEEDBACK=openai:judge", "BASE_URL=http://h:1/v1")
    )
    grpo = next(line for line in commands.splitlines() if "caitool grpo" in line)
    assert "--judge openai:judge --judge-mode score" in grpo and "--base-url http://h:1/v1" in grpo
    assert "--rm" not in grpo and "--rm" not in commands.split("caitool eval", 1)[1]


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


def test_the_demo_runs_ppo_with_the_settings_its_memory_benchmark_measures(finished_run):
    """benchmarks/bench_demo_ppo.py reports the demo's ppo memory; it must run the demo's command."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_demo_ppo", ROOT / "benchmarks/bench_demo_ppo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    commands = make(*finished_run, "-n", "PPO_STEPS=3").replace("\\\n", " ")
    ppo_line = next(line for line in commands.splitlines() if "caitool ppo" in line)
    settings = [*bench.DEMO_ARGS, *bench.CONFIGURATIONS["LoRA + shared (demo now)"]]
    assert " ".join(settings) in " ".join(ppo_line.split())
    assert "--gradient-checkpointing" in settings
