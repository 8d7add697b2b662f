import json

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.ppo import PPOConfig, build_trainer, gae, masked_whiten, per_token_rewards, prompt_batches
from caitool.records import Message, PromptRecord
from caitool.reward import load_reward_model
from caitool.training import TRAINING_LOG, staging_dir

runner = CliRunner()
PROMPTS = [
    [Message(role="user", content="How do I bake bread?")],
    [Message(role="user", content="Tell me a joke.")],
]


def make_trainer(tiny_model_dir, tiny_rm_dir, **overrides):
    settings = {
        "batch_size": 2,
        "mini_batches": 2,
        "ppo_epochs": 1,
        "response_length": 6,
        "lr": 1e-3,
        "temperature": 1.0,
        **overrides,
    }
    trainer, _ = build_trainer(
        policy=str(tiny_model_dir), reward_model=str(tiny_rm_dir), ref=None, config=PPOConfig(**settings)
    )
    return trainer


def test_gae_matches_a_hand_computation():
    import torch

    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])  # the 9.0 lies past the response and must be ignored
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    delta = [0.0 + 0.2 - 0.5, 0.0 + 0.4 - 0.2, 1.0 + 0.0 - 0.4]
    a2 = delta[2]
    a1 = delta[1] + 0.5 * a2
    a0 = delta[0] + 0.5 * a1
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert returns[0, :3].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4])


def test_masked_whiten_ignores_padding():
    import torch

    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    whitened = masked_whiten(values, mask)
    assert whitened[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert whitened[0, 3].item() == 0.0


def test_prompt_batches_cycle_through_a_seeded_order():
    records = [PromptRecord(id=str(i), prompt=[Message(role="user", content=str(i))]) for i in range(3)]
    batches = list(prompt_batches(records, PPOConfig(steps=3, batch_size=2, seed=4)))
    assert [len(b) for b in batches] == [2, 2, 2]
    ids = [r.id for b in batches for r in b]
    assert sorted(ids[:3]) == ["0", "1", "2"]
    assert ids == [r.id for b in prompt_batches(records, PPOConfig(steps=3, batch_size=2, seed=4)) for r in b]


def test_kl_is_zero_before_the_first_update(tiny_model_dir, tiny_rm_dir):
    trainer = make_trainer(tiny_model_dir, tiny_rm_dir)
    rollout = trainer.rollout(PROMPTS, seed=0)
    assert rollout.response_mask.sum() > 0
    assert rollout.kl.abs().max().item() == 0.0


def test_rewards_come_from_the_reward_model(tiny_model_dir, tiny_rm_dir):
    trainer = make_trainer(
        tiny_model_dir, tiny_rm_dir, response_length=3, missing_eot_penalty=0.5, kl_coef=0.1
    )
    rollout = trainer.rollout(PROMPTS, seed=1)
    independent = load_reward_model(tiny_rm_dir).score(PROMPTS, rollout.responses)
    assert rollout.rm_scores == pytest.approx(independent, abs=1e-5)
    penalties = [0.0 if done else 0.5 for done in rollout.finished]
    assert rollout.scores.tolist() == pytest.approx(
        [s - p for s, p in zip(independent, penalties, strict=True)], abs=1e-5
    )
    rewards = per_token_rewards(rollout, kl_coef=0.1)
    expected_totals = rollout.scores - 0.1 * rollout.kl.sum(dim=1)
    assert rewards.sum(dim=1).tolist() == pytest.approx(expected_totals.tolist(), abs=1e-5)
    assert (rewards * (1 - rollout.response_mask)).abs().max().item() == 0.0


def test_one_step_changes_the_policy_and_logs_every_metric(tiny_model_dir, tiny_rm_dir):
    trainer = make_trainer(tiny_model_dir, tiny_rm_dir)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    ref_before = {k: v.clone() for k, v in trainer.ref.state_dict().items()}
    _, metrics = trainer.step(PROMPTS, seed=0)
    after = trainer.policy.state_dict()
    assert any(not after[k].equal(v) for k, v in before.items())
    assert all(trainer.ref.state_dict()[k].equal(v) for k, v in ref_before.items())  # the reference is frozen
    assert metrics["kl"] == 0.0
    for key in ("reward", "kl", "entropy", "policy_loss", "value_loss", "clip_fraction", "response_length"):
        assert key in metrics
    rollout = trainer.rollout(PROMPTS, seed=5)
    assert (
        rollout.kl.abs().max().item() > 0.0
    )  # after the update the policy has moved away from the reference


def test_value_model_can_start_from_the_policy(tiny_model_dir, tiny_rm_dir):
    trainer = make_trainer(tiny_model_dir, tiny_rm_dir, value_from="policy")
    assert trainer.rollout(PROMPTS, seed=0).values.abs().max().item() == 0.0  # zero head: no value yet


def test_cli_saves_policy_log_samples_and_manifest(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path):
    out = tmp_path / "policy"
    result = runner.invoke(
        app,
        [
            "ppo",
            str(prompts_file),
            "--policy",
            str(tiny_model_dir),
            "--rm",
            str(tiny_rm_dir),
            "-o",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--mini-batches",
            "1",
            "--ppo-epochs",
            "1",
            "--response-length",
            "4",
            "--lr",
            "1e-4",
            "--sample-every",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "ppo step 2/2: reward" in result.output
    log = [json.loads(line) for line in (out / TRAINING_LOG).read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2] and log[0]["kl"] == 0.0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2]
    manifest = json.loads((out / "caitool_manifest.json").read_text())
    assert manifest["phase"] == "ppo" and manifest["models"]["reward"]["sha256"]
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    generated = runner.invoke(
        app,
        [
            "generate",
            str(prompts_file),
            "-o",
            str(tmp_path / "g.jsonl"),
            "--model",
            str(out),
            "--max-new-tokens",
            "3",
        ],
    )
    assert generated.exit_code == 0, generated.output


def test_cli_refuses_a_bad_value_source_and_bad_prompts(tmp_path, prompts_file):
    result = runner.invoke(
        app,
        [
            "ppo",
            str(prompts_file),
            "--policy",
            "x",
            "--rm",
            "y",
            "-o",
            str(tmp_path / "p"),
            "--value-from",
            "ref",
        ],
    )
    assert result.exit_code == 2 and "--value-from must be rm or policy" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    result = runner.invoke(app, ["ppo", str(bad), "--policy", "x", "--rm", "y", "-o", str(tmp_path / "p")])
    assert result.exit_code == 2 and 'bad.jsonl:2: missing field "prompt"' in result.output
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_one_ppo_step_on_the_real_default_model(tmp_path):
    """The default policy against a reward model with an untrained head: runs, KL starts at zero."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from caitool.models import ensure_default_model, load_tokenizer
    from caitool.reward import prepare_reward_tokenizer

    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(ensure_default_model(), num_labels=1)
    tokenizer = load_tokenizer(ensure_default_model())
    prepare_reward_tokenizer(tokenizer, model)
    model.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    trainer, _ = build_trainer(
        policy="default",
        reward_model=str(rm_dir),
        ref=None,
        config=PPOConfig(batch_size=2, mini_batches=1, ppo_epochs=1, response_length=8, lr=1e-6),
    )
    _, metrics = trainer.step(PROMPTS, seed=0)
    assert metrics["kl"] == 0.0 and metrics["response_length"] > 0
    assert all(value == value for value in metrics.values())  # no NaN anywhere


def ppo_cli(prompts_file, tiny_model_dir, tiny_rm_dir, out, *extra):
    args = ["ppo", prompts_file, "--policy", tiny_model_dir, "--rm", tiny_rm_dir, "-o", out, "--steps", 3]
    args += [
        "--batch-size",
        2,
        "--mini-batches",
        1,
        "--ppo-epochs",
        1,
        "--response-length",
        4,
        "--lr",
        "1e-3",
    ]
    return runner.invoke(app, [str(a) for a in [*args, *extra]])


def weights(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def killed_run(monkeypatch, kill_at_step, *cli_args):
    """Run ppo with ``--checkpoint-every 1`` and interrupt it as step ``kill_at_step`` begins."""
    import caitool.ppo

    real_step = caitool.ppo.PPOTrainer.step
    calls = []

    def step_or_kill(self, prompts, seed):
        calls.append(seed)
        if len(calls) == kill_at_step:
            raise KeyboardInterrupt
        return real_step(self, prompts, seed)

    with monkeypatch.context() as patched:
        patched.setattr(caitool.ppo.PPOTrainer, "step", step_or_kill)
        result = ppo_cli(*cli_args, "--checkpoint-every", 1)
    assert result.exit_code == 130
    return result


def test_a_killed_run_resumes_to_the_same_policy(
    tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path, monkeypatch
):
    import torch

    straight = tmp_path / "straight"
    assert ppo_cli(prompts_file, tiny_model_dir, tiny_rm_dir, straight).exit_code == 0

    out = tmp_path / "resumed"
    killed = killed_run(monkeypatch, 3, prompts_file, tiny_model_dir, tiny_rm_dir, out)
    assert not out.exists()
    checkpoints = staging_dir(out) / "checkpoints"
    assert [c.name for c in checkpoints.iterdir()] == ["checkpoint-2"]

    resumed = ppo_cli(prompts_file, tiny_model_dir, tiny_rm_dir, out, "--checkpoint-every", 1)
    assert resumed.exit_code == 0, resumed.output
    assert "ppo: saved checkpoint-2 in" in killed.output
    assert "resuming after step 2" in resumed.output and "ppo step 3/3" in resumed.output
    assert "ppo step 1/3" not in resumed.output
    log = [json.loads(line) for line in (out / TRAINING_LOG).read_text().splitlines()]
    straight_log = [json.loads(line) for line in (straight / TRAINING_LOG).read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]
    assert [e["reward"] for e in log] == pytest.approx([e["reward"] for e in straight_log])
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["response"] for line in samples] == [
        json.loads(line)["response"] for line in (straight / "samples.jsonl").read_text().splitlines()
    ]
    expected = weights(straight)
    for name, tensor in weights(out).items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name
    manifest = json.loads((out / "caitool_manifest.json").read_text())
    assert manifest["params"]["resumed_from"].endswith("checkpoint-2")
    assert not (out / "checkpoints").exists() and not (out / "run_key.json").exists()


def test_a_different_command_is_refused_the_checkpoint_until_no_resume(
    tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path, monkeypatch
):
    out = tmp_path / "policy"
    killed_run(monkeypatch, 2, prompts_file, tiny_model_dir, tiny_rm_dir, out)
    other_lr = [prompts_file, tiny_model_dir, tiny_rm_dir, out, "--checkpoint-every", 1, "--lr", "1e-4"]
    refused = ppo_cli(*other_lr)
    assert (
        refused.exit_code == 2 and "checkpoint-1 of a killed run with other settings (lr)" in refused.output
    )
    assert (staging_dir(out) / "checkpoints" / "checkpoint-1").exists()
    fresh = ppo_cli(*other_lr, "--no-resume")
    assert fresh.exit_code == 0, fresh.output
    assert "resuming" not in fresh.output and "ppo step 1/3" in fresh.output
    assert json.loads((out / "caitool_manifest.json").read_text())["params"]["resumed_from"] is None


def test_a_killed_run_can_be_resumed_with_more_steps(
    tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path, monkeypatch
):
    out = tmp_path / "policy"
    killed_run(monkeypatch, 3, prompts_file, tiny_model_dir, tiny_rm_dir, out)
    shorter = ppo_cli(prompts_file, tiny_model_dir, tiny_rm_dir, out, "--checkpoint-every", 1, "--steps", 2)
    assert shorter.exit_code == 2 and "already past step 2" in shorter.output, shorter.output
    assert (staging_dir(out) / "checkpoints" / "checkpoint-2").exists()
    longer = ppo_cli(prompts_file, tiny_model_dir, tiny_rm_dir, out, "--checkpoint-every", 1, "--steps", 4)
    assert longer.exit_code == 0, longer.output
    assert "resuming after step 2" in longer.output and "ppo step 4/4" in longer.output
    log = [json.loads(line) for line in (out / TRAINING_LOG).read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert json.loads((out / "caitool_manifest.json").read_text())["counts"]["steps"] == 4


def test_ppo_starts_from_a_lora_adapter_policy(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path):
    """An adapter directory (sft --lora --no-merge) is merged onto its base and trained as a full policy."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from caitool.models import load_tokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter = tmp_path / "adapter"
    get_peft_model(base, lora).save_pretrained(adapter)
    load_tokenizer(tiny_model_dir).save_pretrained(adapter)

    out = tmp_path / "policy"
    result = ppo_cli(prompts_file, adapter, tiny_rm_dir, out, "--steps", 1)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    manifest = json.loads((out / "caitool_manifest.json").read_text())
    assert manifest["models"]["policy"]["path"] == str(adapter.resolve())
