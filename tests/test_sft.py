import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.constitution import load_constitution
from caitool.errors import CaitoolError
from caitool.provenance import MODEL_MANIFEST
from caitool.records import Message, RevisionRecord, Round
from caitool.sft import SftConfig, load_sft_data, revision_examples
from caitool.training import TRAINING_LOG, staging_dir
from tests.usage_errors import unboxed

runner = CliRunner()
HARMLESS = load_constitution("harmless")


def revision_record(index, revisions):
    rounds = [
        Round(
            principle_id=HARMLESS.critiques[n].id,
            critique_request=HARMLESS.critiques[n].critique,
            critique="The response is unkind.",
            revision_request=HARMLESS.critiques[n].revision,
            revision=text,
            flags=["revision-empty"] if text == "" else [],
        )
        for n, text in enumerate(revisions)
    ]
    current = next((t for t in reversed(revisions) if t), f"Go away {index}.")
    return RevisionRecord(
        id=f"r{index}",
        prompt=[Message(role="user", content=f"How do I bake bread number {index}?")],
        initial_response=f"Go away {index}.",
        rounds=rounds,
        completion=[Message(role="assistant", content=current)],
        constitution=HARMLESS.ref,
        model="scripted@000000000000",
    )


@pytest.fixture()
def revised_file(tmp_path):
    path = tmp_path / "revised.jsonl"
    records = [
        revision_record(i, ["Mix flour and water.", f"Mix flour, water, yeast and salt, then bake {i}."])
        for i in range(8)
    ]
    path.write_text("".join(r.to_json() + "\n" for r in records))
    return path


def weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def sft_cli(*args):
    return runner.invoke(app, ["sft", *map(str, args)])


def test_sft_changes_the_weights_and_saves_a_loadable_model(tiny_model_dir, revised_file, tmp_path):
    out = tmp_path / "sft"
    result = sft_cli(revised_file, "-o", out, "--model", tiny_model_dir, "--lr", "1e-3", "--batch-size", 4)
    assert result.exit_code == 0, result.output
    before, after = weights(tiny_model_dir), weights(out)
    assert any(not before[name].equal(after[name]) for name in before)
    for name in ("config.json", "tokenizer.json", MODEL_MANIFEST, TRAINING_LOG):
        assert (out / name).exists(), name
    assert not staging_dir(out).exists() and not (out / "checkpoints").exists()
    manifest = json.loads((out / MODEL_MANIFEST).read_text())
    assert manifest["phase"] == "sft" and manifest["counts"]["revision_examples"] == 8
    assert manifest["constitution"]["hash"] == HARMLESS.content_hash
    assert manifest["models"]["base"]["sha256"]
    log = [json.loads(line) for line in (out / TRAINING_LOG).read_text().splitlines()]
    assert [entry["step"] for entry in log if "loss" in entry] == [1, 2]
    assert "sft: 8 examples" in result.output

    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    generated = tmp_path / "g.jsonl"
    result = runner.invoke(
        app, ["generate", str(prompts), "-o", str(generated), "--model", str(out), "--max-new-tokens", "4"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(generated.read_text())["model"].startswith("sft@")


def test_rounds_all_gives_one_example_per_revised_round(revised_file):
    final = load_sft_data(revised_file, rounds="final", mix=None, mix_ratio=1.0, seed=0)
    every = load_sft_data(revised_file, rounds="all", mix=None, mix_ratio=1.0, seed=0)
    assert len(final.examples) == 8 and len(every.examples) == 16
    targets = {e["completion"][0]["content"] for e in final.examples}
    assert targets == {f"Mix flour, water, yeast and salt, then bake {i}." for i in range(8)}
    assert every.examples[0]["prompt"][0]["role"] == "user"


def test_empty_and_missing_revisions_never_become_targets():
    records = [revision_record(0, ["Be kind.", ""]), revision_record(1, [""]), revision_record(2, [])]
    data = revision_examples(records, "all")
    assert [e["completion"][0]["content"] for e in data.examples] == ["Be kind."]
    assert data.counts == {"records_without_revision": 2, "flagged_revisions_skipped": 2}
    assert [e["completion"][0]["content"] for e in revision_examples(records, "final").examples] == [
        "Be kind."
    ]


def test_revisions_with_an_excluded_flag_are_skipped():
    record = revision_record(0, ["Be kind.", "The response is rude."])
    record.rounds[1].flags.append("revision-is-critique")
    data = revision_examples([record], "final", exclude_flags=["revision-is-critique"])
    assert [e["completion"][0]["content"] for e in data.examples] == ["Be kind."]
    assert data.counts["flagged_revisions_skipped"] == 1
    assert (
        revision_examples([record], "final").examples[0]["completion"][0]["content"]
        == "The response is rude."
    )


def test_mix_adds_helpful_examples(revised_file, examples_dir):
    data = load_sft_data(
        revised_file, rounds="final", mix=examples_dir / "helpful.jsonl", mix_ratio=0.5, seed=0
    )
    assert data.counts["helpful_examples"] == 4 and len(data.examples) == 12


def test_lora_saves_merged_weights(tiny_model_dir, revised_file, tmp_path):
    out = tmp_path / "lora"
    result = sft_cli(
        revised_file,
        "-o",
        out,
        "--model",
        tiny_model_dir,
        "--lora",
        "--lora-rank",
        4,
        "--lr",
        "1e-2",
        "--rounds",
        "all",
        "--batch-size",
        8,
    )
    assert result.exit_code == 0, result.output
    assert not (out / "adapter_config.json").exists()
    before, after = weights(tiny_model_dir), weights(out)
    assert set(before) == set(after)
    assert any(not before[name].equal(after[name]) for name in before)
    assert json.loads((out / MODEL_MANIFEST).read_text())["counts"]["revision_examples"] == 16


def test_a_failed_run_leaves_no_model_directory(tiny_model_dir, revised_file, tmp_path, monkeypatch):
    from trl import SFTTrainer

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SFTTrainer, "train", crash)
    out = tmp_path / "sft"
    result = sft_cli(revised_file, "-o", out, "--model", tiny_model_dir)
    assert result.exit_code == 130
    assert not out.exists()


def test_bad_input_is_one_line_and_writes_nothing(prompts_file, tmp_path):
    out = tmp_path / "sft"
    result = sft_cli(prompts_file, "-o", out)
    assert result.exit_code == 2
    assert 'prompts.jsonl:1: expected a "revision" record' in result.output
    assert not out.exists() and not staging_dir(out).exists()


def test_unrevised_input_is_a_clear_error(tmp_path):
    path = tmp_path / "critiqued.jsonl"
    path.write_text(revision_record(0, []).to_json() + "\n")
    result = sft_cli(path, "-o", tmp_path / "sft")
    assert result.exit_code == 2
    assert "no revised records to train on" in result.output


def test_a_killed_run_resumes_from_its_last_checkpoint(tiny_model_dir, revised_file, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    import caitool.trainers

    class KillAtStepTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    out = tmp_path / "sft"
    args = [revised_file, "-o", out, "--model", tiny_model_dir, "--batch-size", 2, "--checkpoint-every", 1]
    with monkeypatch.context() as patched:
        patched.setattr(caitool.trainers, "progress_callback", lambda tracker: KillAtStepTwo())
        assert sft_cli(*args).exit_code == 130
    assert not out.exists() and (staging_dir(out) / "checkpoints" / "checkpoint-1").exists()
    result = sft_cli(*args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MODEL_MANIFEST).read_text())
    assert manifest["params"]["resumed_from"].endswith("checkpoint-1")
    assert manifest["counts"]["steps"] == 4
    log = [json.loads(line) for line in (out / TRAINING_LOG).read_text().splitlines()]
    assert [entry["step"] for entry in log if "loss" in entry] == [1, 2, 3, 4]
    assert not (out / "checkpoints").exists() and not (out / "run_key.json").exists()


def test_lora_no_merge_saves_an_adapter_every_command_loads(tiny_model_dir, revised_file, tmp_path):
    import torch

    from caitool.models import load_causal_lm, model_info

    common = [revised_file, "--model", tiny_model_dir, "--lora", "--lora-rank", 4, "--lr", "1e-2"]
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert sft_cli(*common, "-o", merged).exit_code == 0
    result = sft_cli(*common, "-o", adapter, "--no-merge")
    assert result.exit_code == 0, result.output
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert not (adapter / "model.safetensors").exists() and (adapter / MODEL_MANIFEST).exists()
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).resolve() == Path(tiny_model_dir).resolve()

    # The adapter, loaded onto its base, is the model the merged run saved.
    ids = torch.tensor([[5, 17, 42, 8, 99]])
    with torch.no_grad():
        from_adapter = load_causal_lm(str(adapter)).model(input_ids=ids).logits
        from_merged = load_causal_lm(str(merged)).model(input_ids=ids).logits
    assert torch.allclose(from_adapter, from_merged, atol=1e-5)
    assert model_info(str(adapter)).sha256 != model_info(str(merged)).sha256

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "How do I bake bread?"}\n')
    generated = runner.invoke(
        app,
        [
            "generate",
            str(prompts),
            "-o",
            str(tmp_path / "g.jsonl"),
            "--model",
            str(adapter),
            "--max-new-tokens",
            "3",
        ],
    )
    assert generated.exit_code == 0, generated.output
    assert json.loads((tmp_path / "g.jsonl").read_text())["model"].startswith("adapter@")

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        json.dumps(
            {
                "id": "p0",
                "kind": "preference",
                "prompt": [{"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello."}],
                "rejected": [{"role": "assistant", "content": "Go away."}],
                "p_chosen": 0.7,
                "principle_id": "less-harmful",
                "pair": [0, 1],
                "p_first": 0.7,
                "p_swapped": 0.7,
                "mode": "logprob",
                "feedback_model": "m@0",
                "constitution": {"name": "h", "version": "1", "hash": "x"},
            }
        )
        + "\n"
    )
    refused = runner.invoke(
        app,
        ["train-rm", str(prefs), "-o", str(tmp_path / "rm"), "--model", str(adapter), "--eval-fraction", "0"],
    )
    assert refused.exit_code == 2 and "is a LoRA adapter" in refused.output


def test_no_merge_without_lora_is_refused(tiny_model_dir, revised_file, tmp_path):
    result = sft_cli(revised_file, "-o", tmp_path / "sft", "--model", tiny_model_dir, "--no-merge")
    assert result.exit_code == 2 and "--no-merge only applies to --lora" in result.output


def test_no_merge_on_top_of_an_adapter_is_refused(tiny_model_dir, revised_file, tmp_path):
    adapter = tmp_path / "adapter"
    common = [revised_file, "--lora", "--lora-rank", 2, "--no-merge"]
    assert sft_cli(*common, "--model", tiny_model_dir, "-o", adapter).exit_code == 0
    stacked = sft_cli(*common, "--model", adapter, "-o", tmp_path / "stacked")
    assert stacked.exit_code == 2 and "sft --lora --no-merge needs a full model directory" in stacked.output


def test_settings_that_cannot_go_together_are_refused_before_any_work(revised_file, tmp_path):
    result = sft_cli(revised_file, "-o", tmp_path / "out", "--no-merge")
    assert result.exit_code == 2 and result.output.strip() == (
        "error: --no-merge only applies to --lora (a full fine-tune has no adapter to keep)"
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(CaitoolError, match='--rounds must be one of final, all, got "last"'):
        SftConfig(rounds="last")  # type: ignore[arg-type]
    refused = sft_cli(revised_file, "-o", tmp_path / "out", "--rounds", "last")
    assert refused.exit_code == 2 and "'last' is not one of 'final', 'all'" in unboxed(refused.output)
