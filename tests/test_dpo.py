import json
import math

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.dpo import DpoConfig, DpoData, build_trainer, dpo_example
from caitool.pipeline import Runtime
from caitool.processes import Processes
from caitool.provenance import MODEL_MANIFEST
from caitool.records import Message, PreferenceRecord, RevisionPairRecord
from caitool.reward import soft_preference_loss
from caitool.training import TRAINING_LOG, staging_dir

runner = CliRunner()
SAFE = "Sentence number {i} about safety, honesty, privacy and kindness."
FOX = "The quick brown fox jumps over the lazy dog {i} times."
CONSTITUTION = {"name": "h", "version": "1", "hash": "x"}


def preference(i, p=0.9, chosen=SAFE, rejected=FOX):
    return PreferenceRecord(
        id=f"p{i}",
        prompt=[Message(role="user", content=f"Tell me thing {i}.")],
        chosen=[Message(role="assistant", content=chosen.format(i=i))],
        rejected=[Message(role="assistant", content=rejected.format(i=i))],
        p_chosen=p,
        principle_id="less-harmful",
        pair=(0, 1),
        p_first=p,
        p_swapped=p,
        mode="logprob",
        feedback_model="m@0",
        constitution=CONSTITUTION,
    )


@pytest.fixture()
def separable_prefs(tmp_path):
    """Chosen responses talk about safety, rejected ones about a fox."""
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(preference(i, p=0.8 + 0.02 * (i % 10)).to_json() + "\n" for i in range(16)))
    return path


def dpo_cli(*args):
    return runner.invoke(app, ["dpo", *map(str, args)])


def weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def read_log(out):
    return [json.loads(line) for line in (out / TRAINING_LOG).read_text().splitlines()]


# ---------------------------------------------------------------------------
# The soft-label loss


def test_soft_loss_is_plain_dpo_at_one_and_flat_at_one_half():
    import torch

    beta = 0.1
    h = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0], requires_grad=True)
    plain = -torch.nn.functional.logsigmoid(beta * h)  # TRL's sigmoid loss, per pair
    assert soft_preference_loss(beta * h, torch.ones(5)).item() == pytest.approx(plain.mean().item())

    # The gradient in h is beta * (sigmoid(beta h) - p) / n: zero at h = 0 for a pair labelled 0.5,
    # and pulling h back to 0 elsewhere (the label says the two responses are equally good).
    soft_preference_loss(beta * h, torch.full((5,), 0.5)).backward()
    expected = beta * (torch.sigmoid(beta * h.detach()) - 0.5) / 5
    assert h.grad.tolist() == pytest.approx(expected.tolist(), abs=1e-7)
    assert h.grad[2].item() == 0.0


def batch_gradient(trainer, rows):
    """The gradient of the trainer's loss on ``rows`` of its dataset, as one flat vector."""
    import torch

    model = trainer.model
    model.zero_grad()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    trainer.compute_loss(model, batch).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("soft", [True, False])
def test_a_pair_labelled_one_half_contributes_no_preference_gradient(tiny_model_dir, tmp_path, soft):
    from caitool.trainers import load_policy

    _, tokenizer, policy, _ = load_policy(str(tiny_model_dir), False)
    import copy

    decided, undecided = preference(0, p=1.0), preference(1, p=0.5, chosen=FOX, rejected=SAFE)
    data = DpoData(examples=[dpo_example(decided), dpo_example(undecided)])
    trainer = build_trainer(
        policy,
        copy.deepcopy(policy),
        tokenizer,
        data,
        DpoConfig(soft=soft),
        Runtime(),
        tmp_path,
        "cpu",
        False,
        Processes(),
    )
    rows = {r["p_chosen"]: i for i, r in enumerate(trainer.train_dataset)}
    alone = batch_gradient(trainer, [rows[1.0]])
    with_undecided = batch_gradient(trainer, [rows[1.0], rows[0.5]])
    undecided_only = batch_gradient(trainer, [rows[0.5]])
    assert alone.norm() > 1e-3
    if soft:
        # Policy = reference, so h = 0: the undecided pair adds nothing but its share of the mean.
        assert undecided_only.norm().item() < 1e-6 * alone.norm().item()
        assert (with_undecided - alone / 2).norm().item() < 1e-6 * alone.norm().item()
    else:
        # Plain DPO trains the same pair as surely preferred.
        assert undecided_only.norm().item() > 0.1 * alone.norm().item()


# ---------------------------------------------------------------------------
# The command


def test_dpo_changes_the_weights_and_lowers_the_loss(tiny_model_dir, separable_prefs, tmp_path):
    out = tmp_path / "dpo"
    result = dpo_cli(
        separable_prefs, "--policy", tiny_model_dir, "-o", out, "--lr", "1e-3", "--epochs", 2, "--beta", 0.5
    )
    assert result.exit_code == 0, result.output
    before, after = weights(tiny_model_dir), weights(out)
    assert any(not before[name].equal(after[name]) for name in before)
    for name in ("config.json", "tokenizer.json", MODEL_MANIFEST, TRAINING_LOG):
        assert (out / name).exists(), name
    assert not staging_dir(out).exists() and not (out / "checkpoints").exists()

    log = [entry for entry in read_log(out) if "loss" in entry]
    assert [entry["step"] for entry in log] == list(range(1, 9))
    # The first step sees the policy equal to its reference: every margin is 0 and the loss log 2.
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    # The trained policy and the frozen reference run different fp32 CPU kernels (with and
    # without autograd): their log-probabilities of a response differed by ~1e-3 nats under load
    # (a margin of 1.05e-4 at beta 0.1), so the margin is checked at 1e-3.
    assert log[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-3)
    assert log[-1]["loss"] < log[0]["loss"] - 0.05
    assert log[-1]["rewards/margins"] > 0 and log[-1]["rewards/accuracies"] == 1.0
    assert log[0]["labels/p_chosen"] == pytest.approx(0.89, abs=0.1)

    manifest = json.loads((out / MODEL_MANIFEST).read_text())
    assert manifest["phase"] == "dpo" and manifest["params"]["soft"] is True
    assert manifest["counts"]["pairs"] == 16 and manifest["counts"]["steps"] == 8
    assert manifest["models"]["policy"]["sha256"] and manifest["constitution"] == CONSTITUTION
    assert "dpo: 16 pairs (soft labels" in result.output

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_dpo_trains_on_revision_pairs_as_they_are(tiny_model_dir, tmp_path):
    pairs = tmp_path / "revision-pairs.jsonl"
    records = [
        RevisionPairRecord(
            id=f"rt-{i}",
            prompt=[Message(role="user", content=f"How do I open lock {i}?")],
            chosen=[Message(role="assistant", content="I can't help with that.")],
            rejected=[Message(role="assistant", content=f"Sure, pick lock {i}.")],
            source_id=f"rt-{i}",
            round=1,
            principle_id="harmful-content",
            principle_ids=["harmful-content"],
            model="m@0",
            constitution=CONSTITUTION,
        )
        for i in range(4)
    ]
    pairs.write_text("".join(r.to_json() + "\n" for r in records))
    out = tmp_path / "dpo"
    result = dpo_cli(pairs, "--policy", tiny_model_dir, "-o", out, "--hard", "--loss", "ipo")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MODEL_MANIFEST).read_text())
    assert manifest["counts"]["kinds"] == {"revision_pair": 4} and manifest["params"]["loss"] == "ipo"


def test_lora_no_merge_saves_an_adapter(tiny_model_dir, separable_prefs, tmp_path):
    from caitool.models import load_causal_lm

    out = tmp_path / "adapter"
    result = dpo_cli(
        separable_prefs, "--policy", tiny_model_dir, "-o", out, "--lora", "--lora-rank", 2, "--no-merge"
    )
    assert result.exit_code == 0, result.output
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert json.loads((out / MODEL_MANIFEST).read_text())["counts"]["saved_dtype"] == "adapter"
    assert load_causal_lm(str(out)).info.short.startswith("adapter@")


def test_a_killed_run_resumes_from_its_last_checkpoint(
    tiny_model_dir, separable_prefs, tmp_path, monkeypatch
):
    from transformers import TrainerCallback

    import caitool.trainers

    class KillAtStepTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    out = tmp_path / "dpo"
    args = [
        separable_prefs,
        "--policy",
        tiny_model_dir,
        "-o",
        out,
        "--batch-size",
        8,
        "--checkpoint-every",
        1,
    ]
    with monkeypatch.context() as patched:
        patched.setattr(caitool.trainers, "progress_callback", lambda tracker: KillAtStepTwo())
        assert dpo_cli(*args, "--epochs", 2).exit_code == 130
    assert not out.exists() and (staging_dir(out) / "checkpoints" / "checkpoint-1").exists()
    refused = dpo_cli(*args, "--epochs", 2, "--beta", 0.2)
    assert refused.exit_code == 2 and "other settings (beta)" in refused.output
    result = dpo_cli(*args, "--epochs", 2)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MODEL_MANIFEST).read_text())
    assert manifest["params"]["resumed_from"].endswith("checkpoint-1")
    assert [entry["step"] for entry in read_log(out) if "loss" in entry] == [1, 2, 3, 4]


def test_bad_options_and_bad_input_are_one_line(tiny_model_dir, separable_prefs, prompts_file, tmp_path):
    out = tmp_path / "dpo"
    common = ["--policy", tiny_model_dir, "-o", out]
    soft_ipo = dpo_cli(separable_prefs, *common, "--loss", "ipo")
    assert soft_ipo.exit_code == 2 and "train --loss ipo with --hard" in soft_ipo.output
    assert dpo_cli(separable_prefs, *common, "--no-merge").exit_code == 2
    bad = dpo_cli(prompts_file, *common)
    assert bad.exit_code == 2 and "prompts.jsonl:1:" in bad.output and "Traceback" not in bad.output
    assert not out.exists() and not staging_dir(out).exists()


@pytest.mark.slow
def test_one_dpo_step_on_the_real_default_model(tmp_path):
    """SmolLM2's chat template splits into prompt and completion cleanly: the first loss is log 2."""
    path = tmp_path / "prefs.jsonl"
    records = [
        preference(
            0, p=0.8, chosen="I can't help with that, but a locksmith can.", rejected="Use a bump key."
        ),
        preference(
            1, p=0.5, chosen="Bread needs flour and water.", rejected="Bread needs flour, water, yeast."
        ),
    ]
    path.write_text("".join(r.to_json() + "\n" for r in records))
    out = tmp_path / "dpo"
    result = dpo_cli(path, "--policy", "default", "-o", out, "--batch-size", 2, "--lr", "1e-6")
    assert result.exit_code == 0, result.output
    log = [entry for entry in read_log(out) if "loss" in entry]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # The trained policy and the frozen reference run different fp32 CPU kernels (with and
    # without autograd): their log-probabilities of a response differed by ~1e-3 nats under load
    # (a margin of 1.05e-4 at beta 0.1), so the margin is checked at 1e-3.
    assert log[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-3)
    assert json.loads((out / MODEL_MANIFEST).read_text())["counts"]["undecided_pairs"] == 1


def test_robust_and_exo_pair_take_their_label_smoothing(tiny_model_dir, separable_prefs, tmp_path):
    """Robust DPO without a flip rate is plain DPO, and exo_pair cannot run without its epsilon."""
    from caitool.dpo import dpo_config

    common = [separable_prefs, "--policy", tiny_model_dir, "--hard"]
    robust = dpo_cli(*common, "-o", tmp_path / "robust", "--loss", "robust")
    assert robust.exit_code == 2 and "--loss robust needs --label-smoothing above 0" in robust.output
    exo = dpo_cli(*common, "-o", tmp_path / "exo", "--loss", "exo_pair")
    assert exo.exit_code == 2 and "--loss exo_pair needs --label-smoothing" in exo.output
    ignored = dpo_cli(*common, "-o", tmp_path / "ipo", "--loss", "ipo", "--label-smoothing", 0.1)
    assert ignored.exit_code == 2 and "--label-smoothing has no effect on --loss ipo" in ignored.output
    settings = DpoConfig(soft=False, loss="robust", label_smoothing=0.1)
    assert dpo_config(settings, Runtime(), tmp_path / "c", "cpu").label_smoothing == 0.1

    out = tmp_path / "exo-run"
    epsilon = 1e-3
    exo_options = ["--loss", "exo_pair", "--label-smoothing", epsilon]
    result = dpo_cli(*common, "-o", out, *exo_options, "--batch-size", 8)
    assert result.exit_code == 0, result.output
    # At the first step the policy is the reference (margin 0), where EXO's loss is
    # KL((1/2, 1/2) || (1 - eps, eps)).
    first = next(entry for entry in read_log(out) if "loss" in entry)
    assert first["loss"] == pytest.approx(-math.log(2) - 0.5 * math.log(epsilon * (1 - epsilon)), abs=1e-3)
    assert json.loads((out / MODEL_MANIFEST).read_text())["params"]["label_smoothing"] == epsilon


@pytest.fixture(scope="module")
def tiny_moe_dir(tiny_model_dir, tmp_path_factory):
    """A 2-layer Mixtral (4 experts, 2 per token) on the tiny tokenizer, with a visible router loss weight."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from caitool.models import load_tokenizer

    directory = tmp_path_factory.mktemp("tiny-moe")
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(directory)
    return directory


def test_soft_labels_train_a_mixture_of_experts_with_its_router_loss(tiny_moe_dir, separable_prefs, tmp_path):
    """TRL adds the router's load-balancing loss to its DPO losses; the soft-label loss adds it too."""
    out = tmp_path / "dpo"
    result = dpo_cli(separable_prefs, "--policy", tiny_moe_dir, "-o", out, "--batch-size", 8)
    assert result.exit_code == 0, result.output
    first = next(entry for entry in read_log(out) if "loss" in entry)
    # Before the first update the policy is the reference: the preference part of the loss is log 2.
    assert first["aux_loss"] > 0.0
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["aux_loss"], abs=1e-4)
