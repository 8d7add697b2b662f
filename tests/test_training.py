import json
import platform

import pytest
import torch
from transformers import AutoModelForCausalLM

from caitool.processes import Processes
from caitool.provenance import MODEL_MANIFEST
from caitool.training import (
    JsonlLog,
    atomic_model_dir,
    checkpoint_step,
    config_dtype,
    keep_log_until,
    release_freed_memory,
    resume_checkpoint,
    save_like_base,
    staging_dir,
)
from tests.test_reward import separable_prefs  # noqa: F401 (fixture)
from tests.test_sft import revised_file, sft_cli  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def bf16_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model saved in bfloat16, as most 7B bases are."""
    from caitool.models import load_tokenizer

    directory = tmp_path_factory.mktemp("tiny-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(directory)
    load_tokenizer(tiny_model_dir).save_pretrained(directory)
    return directory


def test_a_half_precision_base_is_saved_back_in_its_precision(tiny_model_dir, bf16_model_dir, tmp_path):
    assert config_dtype(bf16_model_dir) == "bfloat16" and config_dtype(tiny_model_dir) == "float32"
    trained = AutoModelForCausalLM.from_pretrained(bf16_model_dir, dtype=torch.float32)
    assert save_like_base(trained, tmp_path / "half", bf16_model_dir) == "bfloat16"
    assert config_dtype(tmp_path / "half") == "bfloat16"
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert save_like_base(full, tmp_path / "full", tiny_model_dir) == "float32"
    assert config_dtype(tmp_path / "adapter-without-config") is None


def test_sft_on_a_bf16_base_trains_in_fp32_and_saves_bf16(bf16_model_dir, revised_file, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    out = tmp_path / "sft"
    result = sft_cli(revised_file, "-o", out, "--model", bf16_model_dir, "--batch-size", 4, "--lr", "1e-3")
    assert result.exit_code == 0, result.output
    saved = load_file(out / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    base = load_file(bf16_model_dir / "model.safetensors")
    assert any(not saved[k].equal(base[k]) for k in base)
    assert json.loads((out / MODEL_MANIFEST).read_text())["counts"]["saved_dtype"] == "bfloat16"


def test_a_model_merged_from_an_adapter_is_saved_in_its_bases_precision(
    bf16_model_dir,
    revised_file,  # noqa: F811
    tmp_path,
):
    """An adapter directory has no config.json: the dtype is its base's, not fp32 by default."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from caitool.models import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(bf16_model_dir, dtype=torch.float32)
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    load_tokenizer(bf16_model_dir).save_pretrained(adapter)
    assert config_dtype(adapter) == "bfloat16"

    out = tmp_path / "sft"
    lora = ["--lora", "--lora-rank", 2]
    result = sft_cli(revised_file, "-o", out, "--model", adapter, *lora, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / MODEL_MANIFEST).read_text())["counts"]["saved_dtype"] == "bfloat16"


def test_train_rm_on_a_bf16_base_trains_in_fp32_and_saves_bf16(
    bf16_model_dir,
    separable_prefs,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """Adam's updates round away in bf16 weights: the optimiser must hold fp32 master weights."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from caitool import reward
    from caitool.cli import app

    optimised_dtypes: set[torch.dtype] = set()
    trainer_class = reward.soft_label_trainer_class

    def recording_trainer_class():
        trainer, collator = trainer_class()

        class RecordingTrainer(trainer):
            def create_optimizer(self, *args, **kwargs):
                optimizer = super().create_optimizer(*args, **kwargs)
                optimised_dtypes.update(p.dtype for g in optimizer.param_groups for p in g["params"])
                return optimizer

        return RecordingTrainer, collator

    monkeypatch.setattr(reward, "soft_label_trainer_class", recording_trainer_class)
    out = tmp_path / "rm"
    args = ["train-rm", separable_prefs, "-o", out, "--model", bf16_model_dir, "--epochs", 1, "--lr", 1e-3]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert optimised_dtypes == {torch.float32}
    saved = load_file(out / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((out / reward.METRICS_FILE).read_text())["saved_dtype"] == "bfloat16"


def test_resume_checkpoint_resumes_only_the_same_run_and_never_discards_silently(tmp_path):
    from caitool.errors import CaitoolError

    assert resume_checkpoint(tmp_path, {"lr": 1}, resume=True) is None  # nothing to resume
    (tmp_path / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    found = resume_checkpoint(tmp_path, {"lr": 1}, resume=True)
    assert found is not None and checkpoint_step(found) == 4
    with pytest.raises(CaitoolError, match=r"checkpoint-4 of a killed run with other settings \(lr\)"):
        resume_checkpoint(tmp_path, {"lr": 2}, resume=True)
    assert (tmp_path / "checkpoints" / "checkpoint-4").exists()
    assert resume_checkpoint(tmp_path, {"lr": 2}, resume=False) is None
    assert not (tmp_path / "checkpoints").exists()


def test_keep_log_until_drops_steps_after_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3)))
    assert [e["step"] for e in keep_log_until(log, 2)] == [1, 2]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    assert keep_log_until(tmp_path / "missing.jsonl", 2) == []


class Follower(Processes):
    """Process 1 of 2, its barriers free: what a process other than the main one does alone."""

    def wait(self) -> None:
        pass


def test_only_the_main_process_creates_deletes_writes_and_renames(tmp_path):
    follower = Follower(index=1, count=2)
    out = tmp_path / "model"
    with pytest.raises(FileNotFoundError):
        with atomic_model_dir(out, follower) as staging:
            assert not staging.exists()  # the main process creates it
            staging.mkdir()
            (staging / MODEL_MANIFEST).write_text("{}")
            (staging / "checkpoints" / "checkpoint-2").mkdir(parents=True)
            assert resume_checkpoint(staging, {"lr": 1}, resume=False, processes=follower) is None
            assert (
                staging / "checkpoints" / "checkpoint-2"
            ).exists()  # --no-resume deletes on the main process
            assert not (staging / "run_key.json").exists()
            log = staging / "log.jsonl"
            log.write_text('{"step": 1}\n{"step": 2}\n')
            assert [e["step"] for e in keep_log_until(log, 1, follower)] == [1]
            assert log.read_text().count("step") == 2  # only the main process rewrites the log
            JsonlLog(log, enabled=follower.is_main).write({"step": 3})
            assert log.read_text().count("step") == 2
            raise FileNotFoundError  # leave before the end: the rename is the main process's alone
    assert not out.exists()
    with atomic_model_dir(out, follower):
        pass
    assert not out.exists() and staging_dir(out).exists()  # a follower never publishes


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim"
)
def test_release_freed_memory_hands_freed_heap_pages_back():
    # 64 KB blocks stay below glibc's mmap threshold: they live in the heap, and freeing them
    # (with a live block above, so the heap's top is not trimmed) keeps their pages resident.
    blocks = [b"x" * (64 * 1024) for _ in range(3200)]
    keep = blocks[-1]
    del blocks
    before = resident_bytes()
    release_freed_memory()
    assert before - resident_bytes() > 100e6
    assert len(keep) == 64 * 1024
