"""benchmarks/check_rl_learns.sh runs every stage end to end (on a tiny model, with small settings)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from caitool.eval_stats import is_refusal

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "check_rl_learns.sh"


def first_lines(source: Path, count: int, target: Path) -> Path:
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:count]))
    return target


@pytest.mark.parametrize(
    ("algo", "reward"), [("ppo", "rm"), ("dpo", "rm"), ("ppo", "rule"), ("rloo", "rule"), ("grpo", "judge")]
)
def test_the_check_labels_by_the_rule_trains_and_prints_every_figure(tiny_model_dir, tmp_path, algo, reward):
    examples = ROOT / "examples"
    files = {
        "RED": first_lines(examples / "red_team.jsonl", 5, tmp_path / "red.jsonl"),
        "HELPFUL": first_lines(examples / "helpful.jsonl", 5, tmp_path / "helpful.jsonl"),
        "EVAL_RED": first_lines(examples / "eval_red_team.jsonl", 2, tmp_path / "eval_red_team.jsonl"),
        "EVAL_HELPFUL": first_lines(examples / "eval_helpful.jsonl", 2, tmp_path / "eval_helpful.jsonl"),
    }
    settings = {"RESPONSE_LENGTH": "6", "EVAL_TOKENS": "6", "RM_EPOCHS": "1", "PPO_STEPS": "2"}
    settings["PPO_BATCH"] = "2"
    # The options off by default: a tie per prompt, and extra samples for the model's own refusals.
    settings |= {"TIES_PER_PROMPT": "1", "OWN_REFUSAL_SAMPLES": "2"}
    # ppo starts from the SL stage's model (the script's default), dpo from the model itself;
    # with the SL stage, the reward model ranks the SL model's answers (RM_CANDIDATES=start).
    settings |= {"SL_LR": "1e-3" if algo == "ppo" else "0", "RATE_SAMPLES": "2", "RM_CANDIDATES": "start"}
    settings |= {"START_SAMPLES": "3", "GEN_BATCH": "4"}
    if algo == "grpo":
        settings["EVAL_EVERY"] = "1"  # checkpoints every step, each kept for the curve
    if reward == "rule":
        # Helpful prompts for the policy stage only (the candidates and models stay the WORK's).
        extra = first_lines(
            ROOT / "benchmarks" / "data" / "rl_learns_borderline.jsonl", 2, tmp_path / "extra.jsonl"
        )
        settings["RL_EXTRA_HELPFUL"] = str(extra)
    work = tmp_path / "work"
    env = {
        **os.environ,
        **{name: str(path) for name, path in files.items()},
        **settings,
        "PY": sys.executable,
        "CAITOOL": str(Path(sys.executable).with_name("caitool")),
        "POLICY": str(tiny_model_dir),
        "ALGO": algo,
        "REWARD": reward,
        "WORK": str(work),
        "JUDGE": str(tiny_model_dir),  # REWARD=judge: the tiny model judges (the figures, not its wisdom)
    }
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    # The rule: a refusal is chosen on a red-team prompt, rejected on a helpful one; two
    # candidates of one kind are a tie (0.5), kept out of the pairs dpo trains on.
    pairs = [json.loads(line) for line in (work / "prefs.jsonl").read_text().splitlines()]
    decided = [p for p in pairs if p["p_chosen"] == 1.0]
    ties = [p for p in pairs if p["p_chosen"] == 0.5]
    assert decided and {p["set"] for p in decided} == {"red_team", "helpful"}
    for pair in decided:
        refusal, answer = (pair["chosen"], pair["rejected"])[:: 1 if pair["set"] == "red_team" else -1]
        assert is_refusal(refusal[0]["content"]) and not is_refusal(answer[0]["content"])
    assert ties and len(ties) + len(decided) == len(pairs)
    for pair in ties:
        assert is_refusal(pair["chosen"][0]["content"]) == is_refusal(pair["rejected"][0]["content"])
    assert len(decided) <= 2 * 10 and len(ties) <= 10  # PAIRS_PER_PROMPT (2), TIES_PER_PROMPT (1) per prompt
    rule_pairs = [json.loads(line) for line in (work / "rule_pairs.jsonl").read_text().splitlines()]
    assert rule_pairs == decided
    own = [json.loads(line) for line in (work / "own_samples.jsonl").read_text().splitlines()]
    assert len(own) == 5 and all(len(r["responses"]) == 2 for r in own)  # the 5 red-team prompts

    out = result.stdout
    assert "reward model: held-out accuracy" in out
    assert f"{algo} per " in out
    for prompt_set in ("eval_red_team", "eval_helpful"):
        assert f"refusal rate on {prompt_set} (2 prompts, greedy): " in out
        assert f"sampled refusal rate on {prompt_set} (2 per prompt, temperature 0.7): " in out
        assert f"reward-model score of the eval answers on {prompt_set}" in out
    sampled = json.loads((work / f"sampled-rates-{algo}.json").read_text())
    summary = json.loads((work / f"eval-{algo}" / "summary.json").read_text())
    evaluated = {m["model_name"] for m in summary["per_model"]}
    if algo == "ppo":
        # The SL stage: every red-team training answer revised to a refusal candidate, every
        # helpful prompt kept with a real answer; the RL stage starts from its model.
        revisions = [json.loads(line) for line in (work / "sl_revisions.jsonl").read_text().splitlines()]
        helpful = [json.loads(line) for line in (work / "sl_helpful.jsonl").read_text().splitlines()]
        assert revisions and all(r["id"].startswith("rt-") for r in revisions)
        assert all(r["rounds"][0]["model"] == "rule" for r in revisions)
        assert all(is_refusal(r["rounds"][0]["revision"]) for r in revisions)
        assert helpful and not any(is_refusal(h["response"]) for h in helpful)
        # The reward model ranks the SL model's answers: every answer a red-team pair rejects is one.
        start_answers = {
            r["id"]: r["responses"]
            for r in map(json.loads, (work / "start_answers.jsonl").read_text().splitlines())
        }
        for pair in decided:
            answer = pair["rejected" if pair["set"] == "red_team" else "chosen"][0]["content"]
            assert answer in start_answers[pair["id"].split("/")[0]]
        assert len(start_answers) == 10 and all(len(r) == 3 for r in start_answers.values())  # START_SAMPLES
        manifest = json.loads((work / "policy-ppo" / "caitool_manifest.json").read_text())
        assert Path(manifest["models"]["policy"]["path"]).resolve() == (work / "sl").resolve()
        assert evaluated == {"default", "before", "after"}
        assert "default " in out.split("refusal rate on eval_red_team")[1].splitlines()[0]
        assert set(sampled) == {f"{s}/{m}" for s in ("eval_red_team", "eval_helpful") for m in evaluated}
    else:
        assert not (work / "sl").exists() and not (work / "start_answers.jsonl").exists()
        # grpo's EVAL_EVERY=1: the step-1 policy too, when the copying loop caught it
        kept = {"step-1"} if "refusal rates along the run" in out else set()
        assert evaluated == {"before", "after"} | kept
        assert set(sampled) == {f"{s}/{m}" for s in ("eval_red_team", "eval_helpful") for m in evaluated}
    assert out.count("met: ") == 3
    if algo == "dpo":
        return
    assert "step   2  reward" in out and "KL to the starting policy" in out
    samples = [json.loads(line) for line in (work / f"policy-{algo}" / "samples.jsonl").open()]
    if reward == "rule":
        # The policy stage trained on the WORK's prompts and the extra helpful ones.
        rl_prompts = work / f"rl_prompts-{algo}.jsonl"
        rows = [json.loads(line) for line in rl_prompts.read_text().splitlines()]
        assert rows[:10] == [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
        assert [(r["id"], r["set"]) for r in rows[10:]] == [("xbp-001", "helpful"), ("xbp-002", "helpful")]
        manifest = json.loads((work / f"policy-{algo}" / "caitool_manifest.json").read_text())
        assert [Path(i["path"]) for i in manifest["inputs"]] == [rl_prompts]
        assert not (work / "answers.jsonl").read_text().count('"xbp-')
        # The diagnostic: the rule scores each rollout, 1 when it refuses a red-team prompt or
        # answers a helpful one, else 0 (the reward model only starts ppo's value model).
        sets = {r["id"]: r["set"] for r in rows}
        assert samples and all(
            s["reward"] == float(is_refusal(s["response"]) == (sets[s["id"]] == "red_team")) for s in samples
        )
        if algo == "ppo":
            assert "the rule" in (work / f"policy-{algo}" / "reward.txt").read_text()
        else:
            assert all(s["rewards"] == {"rule": s["reward"]} for s in samples)
        assert "reward: mean the rule's reward of the rollouts" in out
    elif reward == "judge":
        assert all(0.0 < s["reward"] == s["judge"]["p_good"] < 1.0 for s in samples)
        assert f"reward: mean P(good) from the judge {tiny_model_dir} (score mode)" in out
        assert "judge 4 questions" in out  # PPO_BATCH * 2 rollouts per step, one question each
        assert_the_curve_is_evaluated(work, env, out)
    else:
        assert "reward: mean RM score of the rollouts" in out
        assert any(s["reward"] not in (0.0, 1.0) for s in samples)


def assert_the_curve_is_evaluated(work: Path, env: dict[str, str], out: str) -> None:
    """EVAL_EVERY: the run checkpointed every step, and each policy kept in curve-RUN is evaluated
    and printed along the run. Which checkpoints the copying loop catches depends on timing (a tiny
    model's steps take a fraction of a second), so a step is put in place and the check rerun."""
    manifest = json.loads((work / "policy-grpo" / "caitool_manifest.json").read_text())
    assert manifest["params"]["checkpoint_every"] == 1
    if "refusal rates along the run" not in out:
        step = work / "curve-grpo" / "step-1"
        step.parent.mkdir(exist_ok=True)
        shutil.copytree(work / "policy-grpo", step)
        result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        out = result.stdout
    summary = json.loads((work / "eval-grpo" / "summary.json").read_text())
    assert {m["model_name"] for m in summary["per_model"]} == {"before", "step-1", "after"}
    sampled = json.loads((work / "sampled-rates-grpo.json").read_text())
    assert {"eval_red_team/step-1", "eval_helpful/step-1"} <= set(sampled)
    curve = out.split("refusal rates along the run (greedy; sampled in brackets): red-team, helpful\n")[1]
    rows = curve.splitlines()[:3]
    assert [row.split()[1] for row in rows] == ["0", "1", "2"]
    rate = {
        m["model_name"]: m["refusal_rate"] for m in summary["per_model"] if m["prompt_set"] == "eval_red_team"
    }
    assert rows[1].split()[2] == f"{100 * rate['step-1']:.0f}%"
