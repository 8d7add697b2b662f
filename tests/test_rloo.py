import json

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.provenance import MODEL_MANIFEST
from caitool.records import Message, parse_prompt_input
from caitool.reward import load_reward_model
from caitool.rewards import CombinedReward, RewardModelSource
from caitool.training import TRAINING_LOG, staging_dir
from tests.scripted_rewards import VowelShare, vowel_share
from tests.tiny_model import save_reward_model

runner = CliRunner()


def rloo_cli(*args):
    return runner.invoke(app, ["rloo", *map(str, args)])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def small_run(tiny_model_dir, tiny_rm_dir, prompts_file, out, *extra):
    return rloo_cli(
        prompts_file,
        "--policy",
        tiny_model_dir,
        "--rm",
        tiny_rm_dir,
        "-o",
        out,
        "--batch-size",
        2,
        "--k",
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


def test_reward_is_the_reward_model_score_less_the_missing_eot_penalty(tiny_rm_dir):
    scorer = load_reward_model(tiny_rm_dir)
    logged = {}
    reward = CombinedReward(
        [(RewardModelSource(scorer), 1.0)], stop_ids=[7], missing_eot_penalty=0.5, group_size=2
    )
    prompts = [[{"role": "user", "content": "How do I bake bread?"}]] * 2
    completions = [
        [{"role": "assistant", "content": " Knead it. "}],
        [{"role": "assistant", "content": "Mix"}],
    ]
    rewards = reward(
        prompts,
        completions,
        [[5, 6, 7], [5, 6]],
        log_metric=lambda k, v: logged.setdefault(k, v),
        id=["a", "a"],
    )
    conversation = [Message(role="user", content="How do I bake bread?")]
    expected = scorer.score([conversation, conversation], ["Knead it.", "Mix"])
    assert rewards == pytest.approx([expected[0], expected[1] - 0.5])
    assert reward.last.finished == [True, False] and reward.last.rollouts.ids == ["a", "a"]
    assert logged["caitool/missing_eot"] == 0.5
    assert logged["caitool/reward"] == pytest.approx(sum(expected) / 2)
    assert logged["caitool/reward_rm"] == pytest.approx(sum(expected) / 2)


def test_rloo_steps_change_the_policy_and_log_reward_and_kl(
    tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path
):
    out = tmp_path / "rloo"
    result = small_run(tiny_model_dir, tiny_rm_dir, prompts_file, out, "--steps", 2)
    assert result.exit_code == 0, result.output
    before, after = weights(tiny_model_dir), weights(out)
    assert any(not before[name].equal(after[name]) for name in before)
    assert not staging_dir(out).exists() and not (out / "checkpoints").exists()

    log = read_jsonl(out / TRAINING_LOG)
    assert [entry["step"] for entry in log] == [1, 2]
    for key in ("reward", "score", "kl", "kl_penalty", "entropy", "response_length", "missing_eot", "loss"):
        assert all(isinstance(entry[key], float) for entry in log), key
    # Step 1 samples from the starting policy, which is the reference; step 2 from the updated one.
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert log[1]["kl"] != pytest.approx(0.0, abs=1e-5)
    assert "rloo step 2/2: reward" in result.output

    samples = read_jsonl(out / "samples.jsonl")
    assert [s["step"] for s in samples] == [1] * 4 + [2] * 4
    assert {s["sample"] for s in samples} == {0, 1}
    prompt_ids = {parse_prompt_input(json.loads(line)).id for line in prompts_file.read_text().splitlines()}
    assert {s["id"] for s in samples} <= prompt_ids
    for step in (1, 2):  # each prompt's k samples come together
        ids = [s["id"] for s in samples if s["step"] == step]
        assert ids[0] == ids[1] and ids[2] == ids[3]
    # The logged reward is the mean reward-model score of the step's samples, scored as train-rm scores.
    scorer = load_reward_model(tiny_rm_dir)
    for step, entry in zip((1, 2), log, strict=True):
        batch = [s for s in samples if s["step"] == step]
        prompts = [[Message(**m) for m in s["prompt"]] for s in batch]
        scores = scorer.score(prompts, [s["response"] for s in batch])
        assert [s["reward"] for s in batch] == pytest.approx(scores, abs=1e-5)
        assert entry["reward"] == pytest.approx(sum(scores) / len(scores), abs=1e-5)
        assert entry["kl"] == pytest.approx(sum(s["kl"] for s in batch) / len(batch), abs=1e-5)
        penalties = sum(not s["finished"] for s in batch) / len(batch)
        assert entry["score"] == pytest.approx(entry["reward"] - penalties, abs=1e-5)

    manifest = json.loads((out / MODEL_MANIFEST).read_text())
    assert manifest["phase"] == "rloo" and manifest["params"]["k"] == 2
    assert manifest["counts"]["steps"] == 2 and manifest["counts"]["samples_per_step"] == 4
    assert set(manifest["models"]) == {"policy", "reward"}


def mean_sampled_reward(model_dir, prompts_file, samples=16):
    from caitool.backends import SamplingParams, load_backend
    from caitool.jsonl_io import read_records

    prompts = [r.prompt for r in read_records(prompts_file, parse_prompt_input)]
    answers = load_backend(str(model_dir)).generate(
        prompts, SamplingParams(temperature=1.0, max_new_tokens=8, n=samples), 100
    )
    scores = [vowel_share(c.text) for per_prompt in answers for c in per_prompt]
    return sum(scores) / len(scores)


def test_rloo_raises_a_reward_whose_optimum_is_known(
    tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path, monkeypatch
):
    """The machinery learns, not merely runs: against a reward whose optimum is known (the share
    of vowels in the response) the policy's samples score well above the starting policy's."""
    monkeypatch.setattr("caitool.reward.load_reward_model", lambda *args, **kwargs: VowelShare())
    out = tmp_path / "rloo"
    # small_run's options, with these given after them (the last of a repeated option counts).
    options = (
        "--steps 60 --batch-size 3 --k 4 --response-length 8 --lr 3e-3 --kl-coef 0.01 --missing-eot-penalty 0"
    )
    result = small_run(tiny_model_dir, tiny_rm_dir, prompts_file, out, *options.split())
    assert result.exit_code == 0, result.output
    before, after = mean_sampled_reward(tiny_model_dir, prompts_file), mean_sampled_reward(out, prompts_file)
    assert after > before + 0.1, (before, after)


def test_a_killed_run_resumes_from_its_last_checkpoint(
    tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path, monkeypatch
):
    import caitool.rloo

    real_step_line = caitool.rloo.step_line

    def kill_after_step_two(step, total, entry):
        if step == 2:
            raise KeyboardInterrupt
        return real_step_line(step, total, entry)

    out = tmp_path / "rloo"
    args = ["--steps", 3, "--checkpoint-every", 1]
    with monkeypatch.context() as patched:
        patched.setattr(caitool.rloo, "step_line", kill_after_step_two)
        assert small_run(tiny_model_dir, tiny_rm_dir, prompts_file, out, *args).exit_code == 130
    assert (staging_dir(out) / "checkpoints" / "checkpoint-1").exists()
    result = small_run(tiny_model_dir, tiny_rm_dir, prompts_file, out, *args)
    assert result.exit_code == 0, result.output
    assert "resuming after step 1" in result.output
    assert [entry["step"] for entry in read_jsonl(out / TRAINING_LOG)] == [1, 2, 3]
    assert sorted({s["step"] for s in read_jsonl(out / "samples.jsonl")}) == [1, 2, 3]
    assert json.loads((out / MODEL_MANIFEST).read_text())["params"]["resumed_from"].endswith("checkpoint-1")


def test_lora_trains_an_adapter_against_the_policy_with_it_off(
    tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path
):
    out = tmp_path / "rloo"
    result = small_run(
        tiny_model_dir, tiny_rm_dir, prompts_file, out, "--steps", 1, "--lora", "--lora-rank", 2, "--no-merge"
    )
    assert result.exit_code == 0, result.output
    assert (out / "adapter_config.json").exists()
    assert read_jsonl(out / TRAINING_LOG)[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    refused = small_run(
        tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path / "x", "--lora", "--ref", tiny_model_dir
    )
    assert refused.exit_code == 2 and "--ref cannot be used with --lora" in refused.output


def test_a_given_reference_is_the_one_used_and_recorded(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(other / "model.safetensors"))
    save_file(
        {k: v * 1.5 if v.dim() == 2 else v for k, v in tensors.items()}, str(other / "model.safetensors")
    )
    out = tmp_path / "rloo"
    result = small_run(tiny_model_dir, tiny_rm_dir, prompts_file, out, "--steps", 1, "--ref", other)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MODEL_MANIFEST).read_text())
    assert manifest["models"]["ref"]["path"] == str(other.resolve())
    # Another reference: the KL is no longer zero before the first update.
    assert abs(read_jsonl(out / TRAINING_LOG)[0]["kl"]) > 1e-3


def test_bad_prompts_and_a_single_sample_are_one_line(tiny_model_dir, tiny_rm_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"nothing": 1}\n')
    out = tmp_path / "rloo"
    result = rloo_cli(bad, "--policy", tiny_model_dir, "--rm", tiny_rm_dir, "-o", out)
    assert result.exit_code == 2 and "bad.jsonl:2:" in result.output and "Traceback" not in result.output
    assert rloo_cli(bad, "--policy", tiny_model_dir, "--rm", tiny_rm_dir, "-o", out, "--k", 1).exit_code == 2
    assert not out.exists() and not staging_dir(out).exists()


@pytest.mark.slow
def test_one_rloo_step_on_the_real_default_model(tmp_path):
    """The default policy against a reward model with an untrained head: runs, KL starts at zero."""
    from caitool.models import ensure_default_model

    rm_dir = save_reward_model(ensure_default_model(), tmp_path / "rm", seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"id": "a", "prompt": "How do I bake bread?"}\n{"id": "b", "prompt": "Tell me a joke."}\n'
    )
    out = tmp_path / "rloo"
    result = rloo_cli(
        prompts,
        "--policy",
        "default",
        "--rm",
        rm_dir,
        "-o",
        out,
        "--steps",
        1,
        "-b",
        2,
        "--response-length",
        8,
    )
    assert result.exit_code == 0, result.output
    (entry,) = read_jsonl(out / TRAINING_LOG)
    assert entry["kl"] == pytest.approx(0.0, abs=1e-5) and entry["response_length"] > 0
    assert all(value == value for value in entry.values() if isinstance(value, float))  # no NaN anywhere
    assert len(read_jsonl(out / "samples.jsonl")) == 4


def save_adapter(base_dir, out):
    """A LoRA adapter on ``base_dir`` (what ``sft --lora --no-merge`` writes)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from caitool.models import load_tokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(out)
    load_tokenizer(base_dir).save_pretrained(out)
    return out


def test_no_merge_on_top_of_an_adapter_is_refused(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path):
    """The new adapter would name the plain base, the first adapter merged into the policy being lost."""
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "stacked"
    result = small_run(adapter, tiny_rm_dir, prompts_file, out, "--steps", 1, "--lora", "--no-merge")
    assert result.exit_code == 2, result.output
    assert "rloo --lora --no-merge needs a full model directory" in result.output
    assert not out.exists() and not staging_dir(out).exists()


def test_rollouts_are_drawn_from_softmax_over_temperature_whatever_the_generation_config(
    tiny_model_dir, penalised_model_dir, tiny_rm_dir, prompts_file, tmp_path
):
    """A policy whose generation_config sets min_p, typical_p, a minimum length... samples its first
    rollouts (before any update) exactly as the same weights without them."""
    first = {}
    for name, policy in (("plain", tiny_model_dir), ("penalised", penalised_model_dir)):
        out = tmp_path / name
        result = small_run(policy, tiny_rm_dir, prompts_file, out, "--steps", 1, "--response-length", 10)
        assert result.exit_code == 0, result.output
        first[name] = [(s["id"], s["response"]) for s in read_jsonl(out / "samples.jsonl")]
    assert first["penalised"] == first["plain"]
    # The policy is saved with its own generation config unchanged (transformers 5.19 refuses to
    # save this one as it is: min_p without do_sample).
    saved = json.loads((tmp_path / "penalised" / "generation_config.json").read_text())
    given = json.loads((penalised_model_dir / "generation_config.json").read_text())
    assert {k: saved.get(k) for k in given if k != "transformers_version"} == {
        k: v for k, v in given.items() if k != "transformers_version"
    }


def test_texts_over_the_reward_models_training_length_are_cut_and_counted(
    tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path
):
    import shutil

    rm = tmp_path / "rm"
    shutil.copytree(tiny_rm_dir, rm)
    (rm / MODEL_MANIFEST).write_text(json.dumps({"phase": "train-rm", "params": {"max_length": 8}}))
    out = tmp_path / "rloo"
    result = small_run(tiny_model_dir, rm, prompts_file, out, "--steps", 1)
    assert result.exit_code == 0, result.output
    assert "4 scored texts were longer than the reward model's 8 tokens" in result.output
    assert json.loads((out / MODEL_MANIFEST).read_text())["counts"]["rm_truncated"] == 4
