"""benchmarks/check_rl_learns.sh runs every stage end to end (on a tiny model, with small settings)."""

import json
import os
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


@pytest.mark.parametrize("algo", ["ppo", "dpo"])
def test_the_check_labels_by_the_rule_trains_and_prints_every_figure(tiny_model_dir, tmp_path, algo):
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
    work = tmp_path / "work"
    env = {
        **os.environ,
        **{name: str(path) for name, path in files.items()},
        **settings,
        "PY": sys.executable,
        "CAITOOL": str(Path(sys.executable).with_name("caitool")),
        "POLICY": str(tiny_model_dir),
        "ALGO": algo,
        "WORK": str(work),
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
        assert f"refusal rate on {prompt_set} (2 prompts)" in out
        assert f"reward-model score of the eval answers on {prompt_set}" in out
    assert out.count("met: ") == 3
    if algo == "ppo":
        assert "step   2  reward" in out and "KL to the starting policy" in out
