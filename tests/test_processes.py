"""Training on several processes: 2 CPU processes over gloo (torchrun, or accelerate launch with
configs/accelerate/multi-cpu.yaml) against one process with the same global batch.

Tolerance. A 2-process step computes each process's half of the batch and averages the two
gradients; one process computes the whole batch at once. The sums are the same numbers added
in another order (and padded to another length), so float32 results differ by rounding,
about 1e-7 relative. The runs use lr 1e-3 with Adam, which moves every weight that has a
gradient by about lr per step; a run that saw other examples, another seed or a duplicated
batch differs by whole steps (1e-3 and more). Weights are compared at atol 1e-5 (1% of one
step) and losses at rel 1e-5; each test also checks that training moved the weights by far
more than that, so agreement is not the agreement of two untrained models.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.processes import Processes, launch_sharding
from caitool.provenance import MODEL_MANIFEST
from caitool.training import TRAINING_LOG, staging_dir
from tests.test_reward import separable_prefs  # noqa: F401 (fixture)
from tests.test_sft import revised_file, weights  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parent.parent
WRITE_AUDIT = Path(__file__).resolve().parent / "write_audit.py"
MULTI_CPU_CONFIG = REPO / "configs" / "accelerate" / "multi-cpu.yaml"
LAUNCH_TIMEOUT = 300  # seconds; a 2-process run on the tiny model takes about 20
WEIGHT_ATOL = 1e-5
LOSS_REL = 1e-5

runner = CliRunner()


def launch(launcher: list[str], args: list[object], audit: Path) -> subprocess.CompletedProcess:
    """Run ``caitool ARGS`` under ``launcher``, each process recording its writes in ``audit``.

    The launcher runs in its own process group, killed whole if it outlives the timeout.
    """
    audit.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "CAITOOL_WRITE_AUDIT": str(audit),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    command = [*launcher, str(WRITE_AUDIT), *map(str, args)]
    child = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = child.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        pytest.fail(f"{' '.join(command)} ran past {LAUNCH_TIMEOUT}s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, child.returncode, output, "")


def torchrun(processes: int = 2) -> list[str]:
    # --standalone: a rendezvous on a free local port, so parallel test runs never collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def accelerate_launch() -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTI_CPU_CONFIG)]


def audit_events(audit: Path) -> dict[int, list[dict[str, str]]]:
    return {
        int(path.stem.removeprefix("rank-")): [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(audit.glob("rank-*.jsonl"))
    }


def assert_written_once_by_the_main_process(
    audit: Path, out: Path, per_process_dirs: tuple[str, ...] = ()
) -> None:
    """Every file of the run is written by process 0 alone, and each caitool artifact once.

    ``per_process_dirs``: directories (relative to the staging directory) other processes may
    create because they save their own state there (the Trainer's RNG state in a checkpoint).
    """
    events = audit_events(audit)
    assert sorted(events) == [0, 1], "both processes ran and recorded their writes"
    staging = staging_dir(out)
    own = (str(out), str(staging))
    for event in events[1]:
        if event["path"].startswith(own):
            allowed = {str(staging / d) for d in per_process_dirs}
            assert event["op"] == "mkdir" and event["path"] in allowed, event

    def count(op: str, path: Path) -> int:
        return sum(e["op"] == op and e["path"] == str(path) for e in events[0])

    assert count("write", staging / f"{MODEL_MANIFEST}.tmp") == 1
    assert count("write", staging / "config.json") == 1
    assert count("write", staging / "run_key.json.tmp") == 1
    assert count("rename", staging) == 1  # the one rename that publishes the directory


def manifest(out: Path) -> dict:
    return json.loads((out / MODEL_MANIFEST).read_text())


def logged(out: Path, key: str = "loss") -> list[float]:
    return [e[key] for e in map(json.loads, (out / TRAINING_LOG).read_text().splitlines()) if key in e]


def assert_same_weights(one: Path, two: Path, base: Path) -> None:
    single, double, initial = weights(one), weights(two), weights(base)
    assert set(single) == set(double)
    for name, tensor in single.items():
        assert (tensor - double[name]).abs().max().item() <= WEIGHT_ATOL, name
    moved = max((single[k] - initial[k]).abs().max().item() for k in initial if k in single)
    assert moved > 100 * WEIGHT_ATOL, "training moved the weights far beyond the tolerance"


# ---------------------------------------------------------------------------
# Without a launcher


def test_a_single_process_waits_for_nobody():
    processes = Processes()
    assert processes.is_main and not processes.distributed
    processes.wait()  # no process group: returns at once


def test_launch_sharding_reads_what_accelerate_launch_sets(monkeypatch, tmp_path):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    assert launch_sharding() is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert launch_sharding() is None  # stage 2 by default: weights whole on every process
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert launch_sharding() == "DeepSpeed ZeRO-3"
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    assert launch_sharding() is None  # the DeepSpeed config file decides, as in accelerate
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert launch_sharding() == "FSDP"


def test_merging_lora_into_sharded_weights_is_refused_in_one_line(
    tiny_model_dir,
    revised_file,  # noqa: F811
    separable_prefs,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    result = runner.invoke(
        app, ["sft", str(revised_file), "-o", str(tmp_path / "sft"), "--model", str(tiny_model_dir), "--lora"]
    )
    assert result.exit_code == 2
    assert (
        "error: sft --lora cannot merge the adapter into weights sharded by DeepSpeed ZeRO-3; pass --no-merge"
        in result.output
    )
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(
        app,
        [
            "train-rm",
            str(separable_prefs),
            "-o",
            str(tmp_path / "rm"),
            "--model",
            str(tiny_model_dir),
            "--lora",
        ],
    )
    assert result.exit_code == 2 and "train-rm --lora cannot merge" in result.output
    assert not (tmp_path / "sft").exists() and not staging_dir(tmp_path / "sft").exists()


def test_the_accelerate_configs_load(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {path.stem: load_config_from_file(str(path)) for path in MULTI_CPU_CONFIG.parent.glob("*.yaml")}
    assert set(configs) == {"multi-cpu", "multi-gpu", "deepspeed-zero2", "deepspeed-zero3-offload", "fsdp"}
    assert configs["multi-cpu"].num_processes == 2 and configs["multi-cpu"].use_cpu
    assert configs["deepspeed-zero2"].deepspeed_config["zero_stage"] == 2
    zero3 = configs["deepspeed-zero3-offload"].deepspeed_config
    assert (
        zero3["zero_stage"] == 3
        and zero3["offload_param_device"] == "cpu"
        and zero3["zero3_save_16bit_model"]
    )
    assert configs["fsdp"].fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


# ---------------------------------------------------------------------------
# Two processes against one


def test_sft_on_two_processes_matches_one_process_with_twice_the_batch(
    tiny_model_dir,
    revised_file,  # noqa: F811
    tmp_path,
):
    common = ["--model", tiny_model_dir, "--lr", "1e-3", "--checkpoint-every", 1]
    one = tmp_path / "one"
    result = runner.invoke(app, ["sft", str(revised_file), "-o", str(one), *map(str, common), "-b", "4"])
    assert result.exit_code == 0, result.output

    two = tmp_path / "two"
    launched = launch(torchrun(), ["sft", revised_file, "-o", two, *common, "-b", 2], tmp_path / "audit")
    assert launched.returncode == 0, launched.stdout[-4000:]
    assert launched.stdout.count("sft: 8 examples") == 1  # one summary, from the main process
    assert manifest(two)["params"]["processes"] == 2 and manifest(one)["params"]["processes"] == 1
    assert manifest(two)["counts"]["steps"] == manifest(one)["counts"]["steps"] == 2
    assert logged(two) == pytest.approx(logged(one), rel=LOSS_REL)
    assert logged(two, "grad_norm") == pytest.approx(logged(one, "grad_norm"), rel=LOSS_REL)
    assert_same_weights(one, two, tiny_model_dir)
    assert_written_once_by_the_main_process(
        tmp_path / "audit", two, per_process_dirs=("checkpoints/checkpoint-1", "checkpoints/checkpoint-2")
    )


def test_train_rm_under_accelerate_launch_matches_one_process_with_twice_the_batch(
    tiny_model_dir,
    separable_prefs,  # noqa: F811
    tmp_path,
):
    common = ["--model", tiny_model_dir, "--lr", "1e-3", "--eval-fraction", "0.25"]
    one = tmp_path / "one"
    result = runner.invoke(
        app, ["train-rm", str(separable_prefs), "-o", str(one), *map(str, common), "-b", "8"]
    )
    assert result.exit_code == 0, result.output

    two = tmp_path / "two"
    launched = launch(
        accelerate_launch(), ["train-rm", separable_prefs, "-o", two, *common, "-b", 4], tmp_path / "audit"
    )
    assert launched.returncode == 0, launched.stdout[-4000:]
    assert launched.stdout.count("train-rm: 24 training pairs") == 1
    assert manifest(two)["params"]["processes"] == 2
    assert len(logged(two)) == len(logged(one)) == 3  # 24 pairs, 8 a step
    for key in ("loss", "accuracy", "margin", "mean_reward"):
        assert logged(two, key) == pytest.approx(logged(one, key), rel=LOSS_REL, abs=1e-6), key
    assert_same_weights(one, two, tiny_model_dir)
    held_one = json.loads((one / "metrics.json").read_text())["held_out"]
    held_two = json.loads((two / "metrics.json").read_text())["held_out"]
    assert held_two["pairs"] == held_one["pairs"] == 8
    assert held_two["log_loss"] == pytest.approx(held_one["log_loss"], rel=LOSS_REL)
    assert_written_once_by_the_main_process(tmp_path / "audit", two)
