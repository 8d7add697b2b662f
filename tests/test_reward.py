import json
import math
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.errors import CaitoolError
from caitool.models import load_tokenizer
from caitool.records import Message
from caitool.reward import (
    METRICS_FILE,
    calibration_table,
    encode_conversation,
    evaluate_pairs,
    load_reward_model,
    preference_probability,
    reward_pad_token,
    soft_preference_loss,
    split_held_out,
    tokenized_rows,
)
from caitool.training import TRAINING_LOG

runner = CliRunner()
SAFE = "Sentence number {i} about safety, honesty, privacy and kindness."
FOX = "The quick brown fox jumps over the lazy dog {i} times."


def preference(i, chosen, rejected, p=0.9):
    return {
        "id": f"p{i}",
        "kind": "preference",
        "prompt": [{"role": "user", "content": f"Tell me thing {i}."}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "p_chosen": p,
        "principle_id": "less-harmful",
        "pair": [0, 1],
        "p_first": p,
        "p_swapped": p,
        "mode": "logprob",
        "feedback_model": "m@0",
        "constitution": {"name": "h", "version": "1", "hash": "x"},
    }


@pytest.fixture()
def separable_prefs(tmp_path):
    """Chosen responses talk about safety, rejected ones about a fox: trivially separable."""
    path = tmp_path / "prefs.jsonl"
    records = [preference(i, SAFE.format(i=i), FOX.format(i=i), p=0.8 + 0.01 * (i % 10)) for i in range(32)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_soft_loss_is_cross_entropy_and_bradley_terry_at_p_one():
    import torch

    margin = torch.tensor([0.3, -1.2, 2.0])
    hard = soft_preference_loss(margin, torch.ones(3))
    assert hard.item() == pytest.approx(-torch.nn.functional.logsigmoid(margin).mean().item(), abs=1e-6)
    p = torch.tensor([0.7, 0.6, 0.9])
    by_hand = -(p * torch.log(torch.sigmoid(margin)) + (1 - p) * torch.log(1 - torch.sigmoid(margin))).mean()
    assert soft_preference_loss(margin, p).item() == pytest.approx(by_hand.item(), abs=1e-6)
    grid = torch.linspace(-3, 3, 601)
    losses = torch.stack([soft_preference_loss(m.reshape(1), torch.tensor([0.7])) for m in grid])
    assert torch.sigmoid(grid[losses.argmin()]).item() == pytest.approx(
        0.7, abs=0.01
    )  # optimum is calibrated


def test_pad_token_never_hides_the_end_of_a_turn(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert reward_pad_token(tokenizer) == "<pad>"
    tokenizer.pad_token = tokenizer.eos_token  # the common chat-model setup: pad = end-of-turn
    chosen = reward_pad_token(tokenizer)
    ids = encode_conversation(tokenizer, [Message(role="user", content="Hi")], "Hello")
    assert chosen != "<|im_end|>" and ids[-1] != tokenizer.convert_tokens_to_ids(chosen)


def test_hard_labels_train_on_one(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    from caitool.records import PreferenceRecord

    record = PreferenceRecord.model_validate(preference(0, "a", "b", p=0.6))
    assert tokenized_rows(tokenizer, [record], soft=True, max_length=512)[0]["p_chosen"] == 0.6
    assert tokenized_rows(tokenizer, [record], soft=False, max_length=512)[0]["p_chosen"] == 1.0
    assert tokenized_rows(tokenizer, [record], soft=True, max_length=3) == []


def pair_of(prompt: str, index: int = 0) -> SimpleNamespace:
    return SimpleNamespace(id=f"{prompt}/{index}", prompt=[Message(role="user", content=prompt)])


def test_held_out_split_is_fixed_and_never_empty():
    items = [pair_of(f"question {i}") for i in range(10)]
    train, held = split_held_out(items, 0.2, seed=0)
    assert len(held) == 2 and sorted(train + held, key=items.index) == items
    assert split_held_out(items, 0.2, seed=0) == (train, held)
    assert len(split_held_out(items, 0.01, seed=0)[1]) == 1
    assert split_held_out(items, 0.0, seed=0) == (items, [])


def test_held_out_split_keeps_the_pairs_of_one_prompt_together():
    # Three pairs per prompt, each with its own id: a pair-by-pair split would score held-out
    # pairs of prompts the model trained on.
    items = [pair_of(f"question {i}", k) for i in range(10) for k in range(3)]
    train, held = split_held_out(items, 0.2, seed=0)
    held_prompts = {r.prompt[0].content for r in held}
    assert len(held_prompts) == 2 and len(held) == 6
    assert not held_prompts & {r.prompt[0].content for r in train}


def test_held_out_split_of_a_single_prompt_is_refused():
    items = [pair_of("the only question", k) for k in range(4)]
    with pytest.raises(CaitoolError, match="at least 2 prompts"):
        split_held_out(items, 0.2, seed=0)
    assert split_held_out(items, 0.0, seed=0) == (items, [])


class LengthRewardModel:
    """Scores a response by its length: enough to check what evaluate_pairs counts."""

    def score(self, prompts, responses):
        return [float(len(r)) for r in responses]


def scored_pair(chosen: str, rejected: str, p_chosen: float) -> SimpleNamespace:
    return SimpleNamespace(
        prompt=[Message(role="user", content="q")],
        chosen=[Message(role="assistant", content=chosen)],
        rejected=[Message(role="assistant", content=rejected)],
        p_chosen=p_chosen,
    )


def test_held_out_accuracy_leaves_ties_out_and_follows_the_label():
    pairs = [
        scored_pair("longer answer", "short", 1.0),  # right
        scored_pair("short", "longer answer", 0.9),  # wrong
        scored_pair("short", "longer answer", 0.2),  # the label favours the "rejected" side: right
        scored_pair("a", "bbbbbbbb", 0.5),  # a tie: no right answer, whatever the scores
        scored_pair("bbbbbbbb", "a", 0.5),
    ]
    metrics = evaluate_pairs(LengthRewardModel(), pairs)
    assert metrics["pairs"] == 5 and metrics["decided_pairs"] == 3
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    only_ties = evaluate_pairs(LengthRewardModel(), pairs[3:])
    assert only_ties["decided_pairs"] == 0 and only_ties["accuracy"] is None


def test_calibration_bins_compare_predicted_with_labelled():
    table = calibration_table([0.55, 0.58, 0.95, 1.0], [0.6, 0.7, 0.9, 0.8])
    assert [row["bin"] for row in table] == ["0.5-0.6", "0.9-1.0"]
    assert table[0]["count"] == 2 and table[0]["mean_label"] == pytest.approx(0.65)
    assert table[1]["mean_predicted"] == pytest.approx(0.975)
    assert preference_probability(2.0, 0.0) == pytest.approx(1 / (1 + math.exp(-2)))
    assert preference_probability(-800.0, 0.0) == pytest.approx(0.0)


def test_train_rm_soft_labels_learn_a_separable_set(tiny_model_dir, separable_prefs, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "rm"
    result = runner.invoke(
        app,
        [
            "train-rm",
            str(separable_prefs),
            "-o",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--epochs",
            "6",
            "--lr",
            "3e-3",
            "--eval-fraction",
            "0.25",
            "--batch-size",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.output
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["held_out"]["pairs"] == 8 and metrics["held_out"]["accuracy"] > 0.9
    assert metrics["labels"] == "soft" and metrics["held_out"]["calibration"]
    assert (out / "caitool_manifest.json").exists() and (out / TRAINING_LOG).read_text().strip()
    assert not (tmp_path / ".rm.partial").exists()

    initial = load_file(tiny_model_dir / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    assert not all(trained[k].equal(v) for k, v in initial.items() if k.startswith("model."))

    reward_model = load_reward_model(out)
    assert reward_model.model.config.pad_token_id == reward_model.tokenizer.pad_token_id
    prompt = [Message(role="user", content="Tell me thing 99.")]
    safe, fox = reward_model.score([prompt, prompt], [SAFE.format(i=99), FOX.format(i=99)])
    assert safe > fox
    # Same score alone or padded beside a longer response: pooling reads the last real token.
    alone = reward_model.score([prompt], [SAFE.format(i=99)])[0]
    beside_longer = reward_model.score([prompt, prompt], [SAFE.format(i=99), FOX.format(i=99) * 3])[0]
    assert alone == pytest.approx(beside_longer, abs=1e-4)


def test_train_rm_on_ties_alone_reports_no_accuracy_instead_of_failing(tiny_model_dir, tmp_path):
    prefs = tmp_path / "ties.jsonl"
    ties = [preference(i, SAFE.format(i=i), FOX.format(i=i), p=0.5) for i in range(8)]
    prefs.write_text("".join(json.dumps(tie) + "\n" for tie in ties))
    out = tmp_path / "rm"
    args = ["train-rm", str(prefs), "-o", str(out), "--model", str(tiny_model_dir), "--eval-fraction", "0.25"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    held = json.loads((out / METRICS_FILE).read_text())["held_out"]
    assert held["pairs"] == 2 and held["decided_pairs"] == 0 and held["accuracy"] is None
    summary = " ".join(result.output.split())
    assert "held-out accuracy n/a on 0 pairs (2 ties labelled 0.5 left out)" in summary


def test_train_rm_lora_saves_a_merged_model(tiny_model_dir, separable_prefs, tmp_path):
    out = tmp_path / "rm-lora"
    result = runner.invoke(
        app,
        [
            "train-rm",
            str(separable_prefs),
            "-o",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--epochs",
            "1",
            "--lr",
            "1e-3",
            "--lora",
            "--hard",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / METRICS_FILE).read_text())["labels"] == "hard"
    assert not (out / "adapter_config.json").exists()
    assert len(load_reward_model(out).score([[Message(role="user", content="x")]], ["y"])) == 1


def test_train_rm_refuses_non_preference_records(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(preference(0, "a", "b")) + "\n" + json.dumps({"id": "x", "prompt": "hi"}) + "\n"
    )
    out = tmp_path / "rm"
    result = runner.invoke(app, ["train-rm", str(bad), "-o", str(out), "--model", str(tiny_model_dir)])
    assert result.exit_code == 2
    assert "bad.jsonl:2:" in result.output and "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / ".rm.partial").exists()


def test_a_killed_train_rm_resumes_from_its_last_checkpoint(
    tiny_model_dir, separable_prefs, tmp_path, monkeypatch
):
    import torch
    from safetensors.torch import load_file

    import caitool.reward
    from caitool.training import staging_dir

    def train_rm(out, *extra):
        args = ["train-rm", separable_prefs, "-o", out, "--model", tiny_model_dir, "--lr", "3e-3"]
        return runner.invoke(app, [str(a) for a in [*args, "--eval-fraction", "0.25", *extra]])

    straight = tmp_path / "straight"
    assert train_rm(straight).exit_code == 0

    real_log_callback = caitool.reward.jsonl_log_callback

    def log_then_kill_at_step_three(path, append=False, processes=None):
        logger = real_log_callback(path, append=append, processes=processes)

        class KillAtStepThree(type(logger)):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 3:
                    raise KeyboardInterrupt

        logger.__class__ = KillAtStepThree
        return logger

    out = tmp_path / "rm"
    with monkeypatch.context() as patched:
        patched.setattr(caitool.reward, "jsonl_log_callback", log_then_kill_at_step_three)
        assert train_rm(out, "--checkpoint-every", 2).exit_code == 130
    assert not out.exists()
    assert [c.name for c in (staging_dir(out) / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]

    resumed = train_rm(out, "--checkpoint-every", 2)
    assert resumed.exit_code == 0, resumed.output
    manifest = json.loads((out / "caitool_manifest.json").read_text())
    assert manifest["params"]["resumed_from"].endswith("checkpoint-2")
    log = [json.loads(line) for line in (out / TRAINING_LOG).read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4, 5, 6]
    expected = load_file(straight / "model.safetensors")
    for name, tensor in load_file(out / "model.safetensors").items():
        assert torch.allclose(tensor, expected[name], atol=1e-5), name
    assert not (out / "checkpoints").exists() and not (out / "run_key.json").exists()


def test_scoring_cuts_a_text_longer_than_the_training_max_length_from_the_left(
    tiny_model_dir, separable_prefs, tmp_path
):
    """The reward is read at the last token: a text past --max-length keeps its end and is counted."""
    from caitool.reward import RewardModel, truncation_note

    out = tmp_path / "rm"
    result = runner.invoke(
        app,
        ["train-rm", str(separable_prefs), "-o", str(out), "--model", str(tiny_model_dir), "--epochs", "1",
         "--eval-fraction", "0", "--max-length", "64"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "caitool_manifest.json").read_text())["params"]["max_length"] == 64
    reward_model = load_reward_model(out)
    assert reward_model.max_length == 64
    unlimited = RewardModel(reward_model.model, reward_model.tokenizer, device="cpu")
    prompt = [Message(role="user", content="Tell me thing 99.")]
    long_answer = " ".join(SAFE.format(i=i) for i in range(12))
    rows = encode_conversation(reward_model.tokenizer, prompt, long_answer)
    assert len(rows) > 64
    (score,) = reward_model.score([prompt], [long_answer])
    assert score == pytest.approx(unlimited.score_token_ids([rows[-64:]])[0], abs=1e-5)
    assert score != pytest.approx(unlimited.score_token_ids([rows])[0], abs=1e-4)
    short = reward_model.score([prompt], ["Short."])
    assert short == pytest.approx(unlimited.score([prompt], ["Short."]), abs=1e-6)
    assert reward_model.truncated == 1
    assert "1 scored texts were longer than the reward model's 64 tokens" in truncation_note(reward_model)
