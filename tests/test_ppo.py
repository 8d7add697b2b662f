import json

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.errors import CaitoolError
from caitool.ppo import PPOConfig, build_trainer, gae, masked_whiten, per_token_rewards, prompt_batches
from caitool.records import Message, PromptRecord
from caitool.reward import load_reward_model
from caitool.training import TRAINING_LOG, staging_dir
from tests.scripted_rewards import VowelShare
from tests.tiny_model import CORPUS, build_tiny_model, save_reward_model, variant_of
from tests.usage_errors import unboxed

runner = CliRunner()
PROMPTS = [
    [Message(role="user", content="How do I bake bread?")],
    [Message(role="user", content="Tell me a joke.")],
]


@pytest.fixture(scope="module")
def other_family_dirs(tmp_path_factory):
    """A policy and a reward model whose tokenizer has as many tokens as the tiny model's, other ids."""
    root = tmp_path_factory.mktemp("other-family")
    policy = build_tiny_model(root / "policy", corpus=[line.upper() for line in CORPUS])
    return policy, save_reward_model(policy, root / "rm")


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
    batches = list(prompt_batches(records, PPOConfig(steps=3, batch_size=2), seed=4))
    assert [len(b) for b in batches] == [2, 2, 2]
    ids = [r.id for b in batches for r in b]
    assert sorted(ids[:3]) == ["0", "1", "2"]
    assert ids == [r.id for b in prompt_batches(records, PPOConfig(steps=3, batch_size=2), seed=4) for r in b]


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


def test_one_full_parameter_step_changes_the_policy_and_logs_every_metric(tiny_model_dir, tiny_rm_dir):
    trainer = make_trainer(tiny_model_dir, tiny_rm_dir, value_model="separate")
    assert all(p.requires_grad for p in trainer.policy.parameters())
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    ref_before = {k: v.clone() for k, v in trainer.ref.state_dict().items()}
    value_before = {k: v.clone() for k, v in trainer.value_model.state_dict().items()}
    _, metrics = trainer.step(PROMPTS, seed=0)
    after = trainer.policy.state_dict()
    assert all(not after[k].equal(v) for k, v in before.items() if "embed" not in k and "norm" not in k)
    assert all(trainer.ref.state_dict()[k].equal(v) for k, v in ref_before.items())  # the reference is frozen
    assert any(not trainer.value_model.state_dict()[k].equal(v) for k, v in value_before.items())
    assert metrics["kl"] == 0.0
    for key in ("reward", "kl", "entropy", "policy_loss", "value_loss", "clip_fraction", "response_length"):
        assert key in metrics
    rollout = trainer.rollout(PROMPTS, seed=5)
    assert (
        rollout.kl.abs().max().item() > 0.0
    )  # after the update the policy has moved away from the reference


def test_ppo_raises_a_reward_whose_optimum_is_known(tiny_model_dir, tiny_rm_dir):
    """The machinery learns, not merely runs: with a reward whose optimum is known (the share of
    vowels in the response) 60 steps raise the mean reward of fresh rollouts well past its start.
    A sign error in the advantages, the ratio or the value targets makes it fall or stay put."""
    trainer = make_trainer(
        tiny_model_dir,
        tiny_rm_dir,
        batch_size=8,
        ppo_epochs=2,
        response_length=8,
        kl_coef=0.01,
        missing_eot_penalty=0.0,
    )
    trainer.reward_model = VowelShare()
    prompts = PROMPTS * 4

    def mean_reward():
        scores = [s for seed in range(100, 104) for s in trainer.rollout(prompts, seed=seed).rm_scores]
        return sum(scores) / len(scores)

    before = mean_reward()
    for step in range(60):
        trainer.step(prompts, seed=step)
    after = mean_reward()
    assert after > before + 0.1, (before, after)


def test_a_step_hands_freed_memory_back_after_the_rollout_and_every_update(
    tiny_model_dir, tiny_rm_dir, monkeypatch
):
    trainer = make_trainer(tiny_model_dir, tiny_rm_dir, lora=True, mini_batches=2, ppo_epochs=2)
    calls = []
    monkeypatch.setattr("caitool.ppo.release_freed_memory", lambda: calls.append("released"))
    trainer.step(PROMPTS, seed=0)
    assert len(calls) == 1 + 2 * 2  # after the rollout, then after each of the 2 x 2 updates


def test_value_model_can_start_from_the_policy(tiny_model_dir, tiny_rm_dir):
    trainer = make_trainer(tiny_model_dir, tiny_rm_dir, value_model="separate", value_from="policy")
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
    assert result.exit_code == 2 and "'ref' is not one of 'rm', 'policy'" in unboxed(result.output)
    with pytest.raises(CaitoolError, match='--value-from must be one of rm, policy, got "ref"'):
        PPOConfig(value_from="ref")  # type: ignore[arg-type]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    result = runner.invoke(app, ["ppo", str(bad), "--policy", "x", "--rm", "y", "-o", str(tmp_path / "p")])
    assert result.exit_code == 2 and 'bad.jsonl:2: missing field "prompt"' in result.output
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "holding", [{"value_model": "separate"}, {"lora": True}], ids=["full+separate", "lora+shared"]
)
def test_one_ppo_step_on_the_real_default_model(tmp_path, holding):
    """The default policy against a reward model with an untrained head: runs, KL starts at zero."""
    from caitool.models import ensure_default_model

    rm_dir = save_reward_model(ensure_default_model(), tmp_path / "rm", seed=0)
    trainer, _ = build_trainer(
        policy="default",
        reward_model=str(rm_dir),
        ref=None,
        config=PPOConfig(batch_size=2, mini_batches=1, ppo_epochs=1, response_length=8, lr=1e-6, **holding),
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

    def step_or_kill(self, prompts, seed, *rest):
        calls.append(seed)
        if len(calls) == kill_at_step:
            raise KeyboardInterrupt
        return real_step(self, prompts, seed, *rest)

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


# ---------------------------------------------------------------------------
# Sampling, training mode, model families


def test_rollouts_are_drawn_from_softmax_over_temperature_whatever_the_generation_config(
    tiny_model_dir, penalised_model_dir, tiny_rm_dir
):
    """A model whose generation_config sets a huge repetition_penalty (and more) samples as one without."""
    import torch

    plain = make_trainer(tiny_model_dir, tiny_rm_dir, response_length=12).rollout(PROMPTS, seed=3)
    penalised = make_trainer(penalised_model_dir, tiny_rm_dir, response_length=12).rollout(PROMPTS, seed=3)
    assert torch.equal(penalised.input_ids, plain.input_ids)
    assert penalised.responses == plain.responses


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory):
    return variant_of(
        tiny_model_dir, tmp_path_factory.mktemp("dropout") / "model", config={"attention_dropout": 0.5}
    )


def test_models_train_in_train_mode_with_dropout_off(dropout_model_dir, tiny_rm_dir):
    """train() so gradient checkpointing runs; dropout 0 so the update sees the rollout's numbers."""
    import torch

    from caitool.ppo import response_logprobs

    trainer = make_trainer(dropout_model_dir, tiny_rm_dir)
    assert trainer.policy.training and trainer.value_model.training
    attention = [m for m in trainer.policy.modules() if hasattr(m, "attention_dropout")]
    assert attention and all(m.attention_dropout == 0.0 for m in attention)
    rollout = trainer.rollout(PROMPTS, seed=0)
    assert rollout.kl.abs().max().item() == 0.0
    assert trainer.policy.training  # back in train mode after the rollout
    again, _ = response_logprobs(
        trainer.policy, rollout.input_ids, rollout.attention_mask, rollout.context, temperature=1.0
    )
    assert torch.allclose(again * rollout.response_mask, rollout.logprobs, atol=1e-6)


def layer_calls_during_an_update(trainer, monkeypatch):
    """How often the MLP of the policy's first decoder layer runs during one update on a fresh rollout
    (module hooks do not see a checkpoint's recomputation, so its forward is wrapped)."""
    import torch

    from caitool.ppo import gae

    rollout = trainer.rollout(PROMPTS, seed=0)
    mask = rollout.response_mask
    advantages, returns = gae(rollout.scores[:, None] * mask, rollout.values, mask, 1.0, 1.0)
    mlp = next(m for name, m in trainer.policy.named_modules() if name.endswith("layers.0.mlp"))
    calls = []
    forward = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs))
    trainer.update(rollout, advantages, returns, torch.arange(len(PROMPTS)))
    return len(calls)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_recomputes_the_layers_in_the_backward_pass(
    tiny_model_dir, tiny_rm_dir, lora, monkeypatch
):
    plain = make_trainer(tiny_model_dir, tiny_rm_dir, lora=lora)
    checkpointed = make_trainer(tiny_model_dir, tiny_rm_dir, lora=lora, gradient_checkpointing=True)
    assert layer_calls_during_an_update(plain, monkeypatch) == 1
    assert layer_calls_during_an_update(checkpointed, monkeypatch) == 2


def test_a_reward_model_of_another_family_is_refused_where_the_value_model_reads_policy_ids(
    tiny_model_dir, other_family_dirs, prompts_file, tmp_path
):
    other_policy, other_rm = other_family_dirs
    for extra in ([], ["--value-model", "separate"]):
        result = ppo_cli(prompts_file, tiny_model_dir, other_rm, tmp_path / "p", *extra)
        assert result.exit_code == 2, result.output
        assert f"--rm {other_rm} does not share the policy's tokenizer" in result.output
        assert len(result.output.strip().splitlines()) == 1
    # A value model started from the policy reads its ids; the reward model reads text: allowed.
    allowed = ppo_cli(
        prompts_file,
        tiny_model_dir,
        other_rm,
        tmp_path / "p",
        "--value-model",
        "separate",
        "--value-from",
        "policy",
        "--steps",
        1,
    )
    assert allowed.exit_code == 0, allowed.output


def test_a_reference_of_another_family_is_refused(
    tiny_model_dir, tiny_rm_dir, other_family_dirs, prompts_file, tmp_path
):
    other_policy, _ = other_family_dirs
    result = ppo_cli(prompts_file, tiny_model_dir, tiny_rm_dir, tmp_path / "p", "--ref", other_policy)
    assert result.exit_code == 2, result.output
    assert f"--ref {other_policy} does not share the policy's tokenizer" in result.output
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------
# LoRA, the shared value model, precision, micro-batches


def trainable_names(model):
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_lora_trains_adapters_and_the_reference_is_the_base_with_them_off(tiny_model_dir, tiny_rm_dir):
    trainer = make_trainer(tiny_model_dir, tiny_rm_dir, lora=True, lora_rank=4)
    assert trainer.ref is None
    names = trainable_names(trainer.policy)
    assert names and all("lora_" in name for name in names)
    frozen = {n: p.clone() for n, p in trainer.policy.named_parameters() if not p.requires_grad}
    _, metrics = trainer.step(PROMPTS, seed=0)
    assert metrics["kl"] == 0.0
    assert all(p.equal(frozen[n]) for n, p in trainer.policy.named_parameters() if n in frozen)
    assert trainer.rollout(PROMPTS, seed=5).kl.abs().max().item() > 0.0


def test_the_shared_value_model_trains_adapters_on_the_reward_model_and_the_reward_stays_put(
    tiny_model_dir, tiny_rm_dir
):
    import torch

    shared = make_trainer(tiny_model_dir, tiny_rm_dir)
    separate = make_trainer(tiny_model_dir, tiny_rm_dir, value_model="separate")
    names = trainable_names(shared.value_model)
    assert names and all("lora_" in n or "modules_to_save" in n for n in names)
    # Both start as the reward model, so both give the same first values.
    first = shared.rollout(PROMPTS, seed=0)
    assert torch.allclose(first.values, separate.rollout(PROMPTS, seed=0).values, atol=1e-5)
    shared.step(PROMPTS, seed=0)
    later = shared.rollout(PROMPTS, seed=5)
    independent = load_reward_model(tiny_rm_dir).score(PROMPTS, later.responses)
    assert later.rm_scores == pytest.approx(independent, abs=1e-5)  # read with the adapters off
    values = shared.rollout(PROMPTS, seed=0).values
    assert not torch.allclose(values, first.values)  # ... while the value model has moved


def test_bf16_frozen_weights_and_autocast_keep_the_kl_at_zero_and_master_weights_in_fp32(
    tiny_model_dir, tiny_rm_dir
):
    import torch

    for settings in ({"value_model": "separate"}, {"lora": True}):
        trainer = make_trainer(tiny_model_dir, tiny_rm_dir, dtype="bfloat16", **settings)
        assert all(p.dtype == torch.float32 for p in trainer.trainable)
        frozen = [
            p for m in (trainer.policy, trainer.value_model) for p in m.parameters() if not p.requires_grad
        ]
        linear_weights = [
            m.weight for m in (trainer.ref or trainer.policy).modules() if isinstance(m, torch.nn.Linear)
        ]
        assert any(p.dtype == torch.bfloat16 for p in frozen + linear_weights)
        _, metrics = trainer.step(PROMPTS, seed=0)
        assert metrics["kl"] == 0.0 and all(value == value for value in metrics.values())


def test_float16_is_refused(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path):
    result = ppo_cli(prompts_file, tiny_model_dir, tiny_rm_dir, tmp_path / "p", "--dtype", "float16")
    assert result.exit_code == 2 and "ppo --dtype float16 is not supported" in result.output


def test_micro_batches_read_and_update_as_whole_batches_do(tiny_model_dir, tiny_rm_dir):
    import torch

    from caitool.ppo import gae

    whole = make_trainer(tiny_model_dir, tiny_rm_dir, lora=True, value_model="shared")
    pieces = make_trainer(tiny_model_dir, tiny_rm_dir, lora=True, value_model="shared", forward_batch_size=1)
    rollout = whole.rollout(PROMPTS, seed=0)
    read_whole = whole.read(rollout.input_ids, rollout.attention_mask, rollout.context)
    read_pieces = pieces.read(rollout.input_ids, rollout.attention_mask, rollout.context)
    for a, b in zip(read_whole, read_pieces, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    advantages, returns = gae(
        rollout.scores[:, None] * rollout.response_mask, rollout.values, rollout.response_mask, 1.0, 1.0
    )
    indices = torch.arange(len(PROMPTS))
    losses_whole = whole.update(rollout, advantages, returns, indices)
    losses_pieces = pieces.update(rollout, advantages, returns, indices)
    assert losses_pieces == pytest.approx(losses_whole, abs=1e-6)
    for a, b in zip(whole.trainable, pieces.trainable, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            whole.trainable, make_trainer(tiny_model_dir, tiny_rm_dir, lora=True).trainable, strict=True
        )
    )
    rollout_in_pieces, metrics = pieces.step(PROMPTS, seed=1)
    assert rollout_in_pieces.input_ids.shape[0] == len(PROMPTS) and metrics["response_length"] > 0


def test_cli_lora_saves_a_merged_model_or_the_adapter(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path):
    from safetensors.torch import load_file

    base = load_file(str(tiny_model_dir / "model.safetensors"))
    merged = tmp_path / "merged"
    result = ppo_cli(prompts_file, tiny_model_dir, tiny_rm_dir, merged, "--lora", "--steps", 2)
    assert result.exit_code == 0, result.output
    assert not (merged / "adapter_config.json").exists()
    saved = weights(merged)
    assert saved.keys() == base.keys() and any(not saved[k].equal(base[k]) for k in base)
    manifest = json.loads((merged / "caitool_manifest.json").read_text())
    assert manifest["params"]["lora"] and manifest["counts"]["saved_dtype"] == "float32"
    assert manifest["params"]["ref"] == "the starting policy, adapters off"

    adapter = tmp_path / "adapter"
    result = ppo_cli(prompts_file, tiny_model_dir, tiny_rm_dir, adapter, "--lora", "--no-merge", "--steps", 2)
    assert result.exit_code == 0, result.output
    assert (adapter / "adapter_config.json").exists() and not (adapter / "model.safetensors").exists()
    assert json.loads((adapter / "caitool_manifest.json").read_text())["counts"]["saved_dtype"] == "adapter"
    # The same run saved two ways: the adapter loaded onto its base is the merged model.
    import torch

    from caitool.models import load_full_causal_lm

    reloaded = load_full_causal_lm(str(adapter), dtype=torch.float32).state_dict()
    for name, tensor in saved.items():
        assert torch.allclose(reloaded[name], tensor, atol=1e-6), name
    generated = runner.invoke(
        app,
        [
            "generate",
            str(prompts_file),
            "-o",
            str(tmp_path / "g.jsonl"),
            "-m",
            str(adapter),
            "--max-new-tokens",
            "3",
        ],
    )
    assert generated.exit_code == 0, generated.output


def test_lora_with_a_bf16_base_is_merged_in_fp32(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path):
    import torch

    out = tmp_path / "merged"
    result = ppo_cli(
        prompts_file, tiny_model_dir, tiny_rm_dir, out, "--lora", "--dtype", "bfloat16", "--steps", 1
    )
    assert result.exit_code == 0, result.output
    saved, base = weights(out), weights(tiny_model_dir)
    assert all(t.dtype == torch.float32 for t in saved.values())
    # Merged onto the fp32 base, not onto its bf16 copy: untouched weights are the base's exactly.
    assert saved["model.norm.weight"].equal(base["model.norm.weight"])
    assert json.loads((out / "caitool_manifest.json").read_text())["params"]["precision"] == "bfloat16"


def test_lora_option_misuse_is_one_line(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path):
    result = ppo_cli(prompts_file, tiny_model_dir, tiny_rm_dir, tmp_path / "p", "--no-merge")
    assert result.exit_code == 2 and "--no-merge only applies to --lora" in result.output
    result = ppo_cli(prompts_file, tiny_model_dir, tiny_rm_dir, tmp_path / "p", "--value-from", "policy")
    assert result.exit_code == 2 and "--value-from policy needs --value-model separate" in result.output


def test_a_killed_lora_run_resumes_from_a_checkpoint_of_trained_weights_only(
    tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path, monkeypatch
):
    import torch

    straight = tmp_path / "straight"
    assert ppo_cli(prompts_file, tiny_model_dir, tiny_rm_dir, straight, "--lora").exit_code == 0
    out = tmp_path / "resumed"
    killed_run(monkeypatch, 3, prompts_file, tiny_model_dir, tiny_rm_dir, out, "--lora")
    checkpoint = staging_dir(out) / "checkpoints" / "checkpoint-2"
    for saved in checkpoint.glob("pytorch_model*.bin"):
        names = torch.load(saved, weights_only=True).keys()
        assert names and all("lora_" in n or "modules_to_save" in n for n in names), saved.name
    resumed = ppo_cli(prompts_file, tiny_model_dir, tiny_rm_dir, out, "--lora", "--checkpoint-every", 1)
    assert resumed.exit_code == 0 and "resuming after step 2" in resumed.output, resumed.output
    expected = weights(straight)
    for name, tensor in weights(out).items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name


def test_a_reference_given_with_ref_is_loaded_apart(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path):
    out = tmp_path / "p"
    result = ppo_cli(prompts_file, tiny_model_dir, tiny_rm_dir, out, "--ref", tiny_model_dir, "--steps", 1)
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / TRAINING_LOG).read_text().splitlines()]
    assert log[0]["kl"] == 0.0  # the reference is the starting policy's weights
    assert json.loads((out / "caitool_manifest.json").read_text())["models"]["ref"]["sha256"]


def test_texts_over_the_reward_models_training_length_are_cut_and_counted(
    tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path
):
    import shutil

    rm = tmp_path / "rm"
    shutil.copytree(tiny_rm_dir, rm)
    (rm / "caitool_manifest.json").write_text(json.dumps({"phase": "train-rm", "params": {"max_length": 8}}))
    out = tmp_path / "ppo"
    result = ppo_cli(prompts_file, tiny_model_dir, rm, out, "--steps", 1)
    assert result.exit_code == 0, result.output
    assert "2 scored texts were longer than the reward model's 8 tokens" in result.output
    assert json.loads((out / "caitool_manifest.json").read_text())["counts"]["rm_truncated"] == 2


@pytest.fixture()
def bf16_launch(monkeypatch):
    """What ``accelerate launch`` with configs/accelerate/multi-gpu.yaml sets: bf16 mixed precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    yield
    AcceleratorState._reset_state(True)


def test_the_first_update_of_a_step_has_ratio_one_under_a_bf16_launch_config(
    tiny_model_dir, tiny_rm_dir, bf16_launch
):
    """The rollout's log-probs and the update's come from the same weights at the same precision
    (caitool's own autocast), so before any update the ratio is exactly 1."""
    trainer = make_trainer(tiny_model_dir, tiny_rm_dir, mini_batches=1)
    assert trainer.accelerator.mixed_precision == "no"
    _, metrics = trainer.step(PROMPTS, seed=0)
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["clip_fraction"] == 0.0


def test_max_grad_norm_is_the_clipping_deepspeed_applies(monkeypatch):
    """DeepSpeed's engine clips at its config's value; accelerate's clip_grad_norm_ does nothing there."""
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from caitool.ppo import clip_like_deepspeed

    def launched(**plugin_options):
        plugin = DeepSpeedPlugin(zero_stage=2, **plugin_options)
        return SimpleNamespace(
            state=SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, deepspeed_plugin=plugin)
        )

    monkeypatch.delenv("ACCELERATE_GRADIENT_CLIPPING", raising=False)
    auto = launched()
    assert auto.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == "auto"
    clip_like_deepspeed(auto, PPOConfig(max_grad_norm=0.3))
    assert auto.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0.3

    explicit = launched(gradient_clipping=1.0)
    clip_like_deepspeed(explicit, PPOConfig(max_grad_norm=1.0))  # the same value: nothing to refuse
    with pytest.raises(CaitoolError, match="the DeepSpeed config clips gradients at 1.0"):
        clip_like_deepspeed(explicit, PPOConfig(max_grad_norm=0.3))
