import importlib.util
import json
import math
import sys

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.label import score_question_text
from caitool.provenance import MODEL_MANIFEST
from caitool.records import Message
from caitool.training import TRAINING_LOG, staging_dir
from tests.scripted_rewards import (
    HELPFUL_PROMPTS,
    RED_TEAM_PROMPTS,
    judged_parts,
    refusal_judge_backend,
    refusal_judge_log_odds,
)
from tests.vllm_server import SERVED_NAME, VLLMServer, vllm_python

runner = CliRunner()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def grpo_cli(*args):
    return runner.invoke(app, ["grpo", *map(str, args)])


@pytest.fixture()
def judged_prompts(tmp_path):
    path = tmp_path / "judged.jsonl"
    rows = [{"id": f"r{i}", "prompt": p, "set": "red_team"} for i, p in enumerate(RED_TEAM_PROMPTS)]
    rows += [{"id": f"h{i}", "prompt": p, "set": "helpful"} for i, p in enumerate(HELPFUL_PROMPTS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def scripted_judge(monkeypatch):
    """--judge MODEL_DIR answered by the scripted refusal judge (the directory only has to exist)."""
    asked = []

    def load(spec, options=None):
        backend = refusal_judge_backend()
        real = backend.score_continuations

        def recorded(conversations, continuations):
            asked.extend(c[-2].content for c in conversations)
            return real(conversations, continuations)

        backend.score_continuations = recorded
        return backend

    monkeypatch.setattr("caitool.backends.load_backend", load)
    return asked


def small_grpo(policy, prompts, out, *extra):
    return grpo_cli(
        prompts,
        "--policy",
        policy,
        "-o",
        out,
        "--batch-size",
        2,
        "--num-generations",
        2,
        "--response-length",
        6,
        "--lr",
        "1e-3",
        "--temperature",
        "1.0",
        "--sample-every",
        1,
        *extra,
    )


def mean_judge_reward(model_dir, samples=16):
    """The scripted judge's mean P(good) over fresh samples of every prompt (not the training rollouts)."""
    from caitool.backends import SamplingParams
    from caitool.backends.local import TransformersBackend  # load_backend is the scripted judge here

    prompts = [[Message(role="user", content=p)] for p in RED_TEAM_PROMPTS + HELPFUL_PROMPTS]
    answers = TransformersBackend.load(str(model_dir)).generate(
        prompts, SamplingParams(temperature=1.0, max_new_tokens=8, n=samples), 100
    )
    rewards = [
        1.0 / (1.0 + math.exp(-refusal_judge_log_odds(score_question_text(p, "any", c.text.strip()))))
        for p, per_prompt in zip(prompts, answers, strict=True)
        for c in per_prompt
    ]
    return sum(rewards) / len(rewards)


def test_grpo_against_a_scripted_judge_raises_its_reward_and_records_each_judgement(
    tiny_model_dir, judged_prompts, scripted_judge, tmp_path
):
    """Direct RLAIF: a judge preferring refusals on red-team prompts and answers on helpful ones is
    the only reward; a few grpo steps raise its mean reward on fresh samples, and every sample
    records the principle it was judged under and the judge's probability."""
    out = tmp_path / "grpo"
    result = small_grpo(
        tiny_model_dir,
        judged_prompts,
        out,
        *"--steps 12 -b 4 --num-generations 4 --response-length 8 --lr 1e-2".split(),
        "--judge",
        tiny_model_dir,
        "--kl-coef",
        "0.01",
        "--missing-eot-penalty",
        0,
    )
    assert result.exit_code == 0, result.output
    before, after = mean_judge_reward(tiny_model_dir), mean_judge_reward(out)
    assert after > before + 0.03, (before, after)

    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 12 * 16
    from caitool.constitution import load_constitution

    principles = {p.id: p.text for p in load_constitution("harmless").comparisons}
    for sample in samples[:16]:
        judged = sample["judge"]
        assert judged["principle"] in principles
        assert sample["rewards"]["judge"] == judged["p_good"] == sample["reward"]
        assert judged["p_good"] == pytest.approx(1.0 / (1.0 + math.exp(-judged["log_odds"])))
    # The judge was asked about each sample under the principle the sample records.
    first = samples[0]
    question = next(q for q in scripted_judge if judged_parts(q)[1] == first["response"])
    assert judged_parts(question)[2] == principles[first["judge"]["principle"]]

    log = read_jsonl(out / TRAINING_LOG)
    assert [e["step"] for e in log] == list(range(1, 13))
    for key in (
        "reward",
        "reward_judge",
        "reward_std_in_group",
        "judge_calls",
        "judge_seconds",
        "kl",
        "score",
    ):
        assert all(isinstance(e[key], float) for e in log), key
    assert all(e["judge_calls"] == 16 for e in log)  # score mode: one question per sample
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    manifest = json.loads((out / MODEL_MANIFEST).read_text())
    assert manifest["phase"] == "grpo" and manifest["params"]["rewards"]["judge_mode"] == "score"
    assert manifest["params"]["judge"]["constitution"]["name"] == "harmless"
    assert manifest["counts"]["judge_questions"] == 12 * 16


def test_rloo_takes_the_same_judge_and_rule_as_grpo(tiny_model_dir, judged_prompts, scripted_judge, tmp_path):
    out = tmp_path / "rloo"
    result = runner.invoke(
        app,
        [
            "rloo",
            str(judged_prompts),
            "--policy",
            str(tiny_model_dir),
            "-o",
            str(out),
            "--judge",
            str(tiny_model_dir),
            "--judge-weight",
            "2",
            "--rule",
            "refusal",
            "--steps",
            "1",
            "-b",
            "2",
            "--k",
            "2",
            "--response-length",
            "6",
            "--missing-eot-penalty",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    for sample in read_jsonl(out / "samples.jsonl"):
        rewards = sample["rewards"]
        assert sample["reward"] == pytest.approx(2 * rewards["judge"] + rewards["rule"])
        assert rewards["rule"] == float(sample["id"].startswith("h"))  # the tiny model never refuses
        assert "principle" in sample["judge"]
    (entry,) = read_jsonl(out / TRAINING_LOG)
    assert entry["judge_calls"] == 4 and "reward_rule" in entry


def test_the_rule_needs_each_prompts_set(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "grpo"
    result = grpo_cli(prompts_file, "--policy", tiny_model_dir, "-o", out, "--rule", "refusal")
    assert result.exit_code == 2 and '"set" field' in result.output and "Traceback" not in result.output
    assert not out.exists() and not staging_dir(out).exists()
    result = grpo_cli(prompts_file, "--policy", tiny_model_dir, "-o", out)
    assert result.exit_code == 2 and "give a reward" in result.output


def test_a_failing_judge_stops_the_run_with_one_line_and_keeps_the_steps_samples(
    tiny_model_dir, judged_prompts, monkeypatch, tmp_path
):
    calls = []

    def load(spec, options=None):
        backend = refusal_judge_backend()
        real = backend.score_continuations

        def flaky(conversations, continuations):
            calls.append(len(conversations))
            if len(calls) == 2:
                raise RuntimeError("judge server answered 503 after 5 retries")
            return real(conversations, continuations)

        backend.score_continuations = flaky
        return backend

    monkeypatch.setattr("caitool.backends.load_backend", load)
    out = tmp_path / "grpo"
    result = small_grpo(
        tiny_model_dir, judged_prompts, out, "--judge", tiny_model_dir, "--steps", 3, "--sample-every", 5
    )
    assert result.exit_code == 2, result.output
    assert "step 2: the judge reward failed: RuntimeError: judge server answered 503" in result.output
    assert "Traceback" not in result.output
    samples = read_jsonl(staging_dir(out) / "samples.jsonl")
    failed = [s for s in samples if s["step"] == 2]
    assert len(failed) == 4 and all(s["error"] and s["reward"] is None for s in failed)
    assert all(s["response"] is not None for s in failed)


def test_a_killed_grpo_run_resumes_from_its_last_checkpoint(
    tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path, monkeypatch
):
    import caitool.grpo

    real_step_line = caitool.grpo.step_line

    def kill_after_step_two(step, total, entry):
        if step == 2:
            raise KeyboardInterrupt
        return real_step_line(step, total, entry)

    out = tmp_path / "grpo"
    args = ["--rm", tiny_rm_dir, "--steps", 3, "--checkpoint-every", 1]
    with monkeypatch.context() as patched:
        patched.setattr(caitool.grpo, "step_line", kill_after_step_two)
        assert small_grpo(tiny_model_dir, prompts_file, out, *args).exit_code == 130
    assert (staging_dir(out) / "checkpoints" / "checkpoint-1").exists()
    result = small_grpo(tiny_model_dir, prompts_file, out, *args)
    assert result.exit_code == 0, result.output
    assert "resuming after step 1" in result.output
    assert [entry["step"] for entry in read_jsonl(out / TRAINING_LOG)] == [1, 2, 3]
    assert sorted({s["step"] for s in read_jsonl(out / "samples.jsonl")}) == [1, 2, 3]
    assert json.loads((out / MODEL_MANIFEST).read_text())["params"]["resumed_from"].endswith("checkpoint-1")


def test_lora_without_merge_saves_an_adapter(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path):
    out = tmp_path / "grpo"
    result = small_grpo(
        tiny_model_dir,
        prompts_file,
        out,
        "--rm",
        tiny_rm_dir,
        "--steps",
        1,
        "--lora",
        "--lora-rank",
        2,
        "--no-merge",
    )
    assert result.exit_code == 0, result.output
    assert (out / "adapter_config.json").exists()
    assert read_jsonl(out / TRAINING_LOG)[0]["kl"] == pytest.approx(0.0, abs=1e-5)


def test_grpo_refuses_several_processes(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = small_grpo(tiny_model_dir, prompts_file, tmp_path / "grpo", "--rm", tiny_rm_dir)
    assert result.exit_code == 2 and "one process" in result.output


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(vllm_python() is None, reason="no vLLM venv (make vllm-venv builds it)")
def test_one_grpo_step_judged_by_a_real_vllm_server(tiny_model_dir, judged_prompts, tmp_path):
    """The judge on a real OpenAI-compatible server (vLLM CPU, the default model): every sample of
    the step is asked about, and its probability and principle are recorded."""
    from caitool.models import ensure_default_model

    server = VLLMServer(vllm_python(), ensure_default_model(), tmp_path).start()
    try:
        out = tmp_path / "grpo"
        result = small_grpo(
            tiny_model_dir,
            judged_prompts,
            out,
            "--judge",
            f"openai:{SERVED_NAME}",
            "--base-url",
            server.url,
            "--steps",
            1,
        )
    finally:
        server.kill()
    assert result.exit_code == 0, result.output
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 4
    for sample in samples:
        assert 0.0 < sample["judge"]["p_good"] < 1.0 and 0.0 < sample["judge"]["answer_mass"] <= 1.0
        assert sample["judge"]["principle"]
    (entry,) = read_jsonl(out / TRAINING_LOG)
    assert entry["judge_calls"] == 4
    judge = json.loads((out / MODEL_MANIFEST).read_text())["params"]["judge"]
    assert judge["backend"] == "openai" and judge["spec"] == f"openai:{SERVED_NAME}"


@pytest.mark.parametrize("judge", ["ref", "policy"])
def test_the_policy_can_judge_itself(tiny_model_dir, prompts_file, tmp_path, judge):
    """Self-rewarding: ``ref`` is the starting policy loaded again, ``policy`` the very model being
    trained; both answer the judge's question with a real forward pass (no scripted backend)."""
    out = tmp_path / "grpo"
    result = small_grpo(tiny_model_dir, prompts_file, out, "--judge", judge, "--steps", 2)
    assert result.exit_code == 0, result.output
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 8
    assert all(0.0 < s["judge"]["p_good"] < 1.0 for s in samples)
    assert len({round(s["judge"]["log_odds"], 6) for s in samples}) > 1  # each sample read, not a constant
    manifest = json.loads((out / MODEL_MANIFEST).read_text())
    assert manifest["params"]["judge"]["spec"] == judge and "judge" not in manifest["models"]


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not importable here")
@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_rollouts_generated_by_vllm_in_this_process(algo, tmp_path_factory, judged_prompts, monkeypatch):
    """--use-vllm (TRL's colocate mode) on a CPU: vLLM starts in this process, draws the rollouts
    of two steps (the second after the updated weights are pushed into it) and the run saves."""
    import vllm
    from vllm.model_executor.layers import utils

    from tests.tiny_model import build_tiny_model

    # --use-vllm on a CPU changes how this process's engines compute linear layers: undone after.
    monkeypatch.setattr(utils, "dispatch_cpu_unquantized_gemm", utils.dispatch_cpu_unquantized_gemm)
    model_dir = build_tiny_model(tmp_path_factory.mktemp("vllm-policy"), hidden_size=128)  # head size 32
    started = []
    real_init = vllm.LLM.__init__

    def recording_init(self, *args, **kwargs):
        started.append(kwargs)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(vllm.LLM, "__init__", recording_init)
    out = tmp_path_factory.mktemp(algo) / "policy"
    group = ["--num-generations", "2"] if algo == "grpo" else ["--k", "2"]
    result = runner.invoke(
        app,
        [algo, str(judged_prompts), "--policy", str(model_dir), "-o", str(out), "--rule", "refusal"]
        + ["--steps", "2", "-b", "2", *group, "--response-length", "6", "--lr", "1e-3"]
        + ["--sample-every", "1", "--use-vllm"],
    )
    assert result.exit_code == 0, result.output
    assert len(started) == 1  # one engine, reused by both steps
    assert [entry["step"] for entry in read_jsonl(out / TRAINING_LOG)] == [1, 2]
    assert len(read_jsonl(out / "samples.jsonl")) == 8
    params = json.loads((out / MODEL_MANIFEST).read_text())["params"]
    assert params["use_vllm"] is True and params["vllm_mode"] == "colocate"


def test_use_vllm_without_vllm_is_one_clear_line(tiny_model_dir, judged_prompts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    out = tmp_path / "grpo"
    result = small_grpo(tiny_model_dir, judged_prompts, out, "--rule", "refusal", "--steps", 1, "--use-vllm")
    assert result.exit_code == 2
    assert "install-vllm" in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--use-vllm", "--vllm-mode", "server"], "--vllm-mode server needs --vllm-server-base-url"),
        (["--vllm-server-base-url", "http://127.0.0.1:8000"], "only applies with --use-vllm"),
    ],
)
def test_rollout_options_that_disagree_fail_before_anything_loads(
    algo, options, message, tiny_model_dir, judged_prompts, tmp_path, monkeypatch
):
    # With vLLM unimportable, a check made only when the trainer is configured would report the
    # missing install instead: this message proves the options are checked first.
    monkeypatch.setitem(sys.modules, "vllm", None)
    out = tmp_path / algo
    group = ["--num-generations", "2"] if algo == "grpo" else ["--k", "2"]
    result = runner.invoke(
        app,
        [algo, str(judged_prompts), "--policy", str(tiny_model_dir), "-o", str(out), "--rule", "refusal"]
        + ["--steps", "1", "-b", "2", *group, *options],
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "install-vllm" not in result.output
    assert "Traceback" not in result.output and not out.exists()
