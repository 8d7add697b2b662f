"""Seconds per ppo step on 1 and on 2 processes, same global batch, on the default model.

One process takes ``--batch-size 2b`` prompts a step; two processes (torchrun, gloo on CPU or
NCCL on GPUs) take ``b`` each, so both runs train on the same prompts and should end with the
same policy. Prints each run's per-step seconds (from its training log), the mean over the
steps after the first (which also warms up), their ratio, and the largest weight difference
between the two final policies as a check that both runs did the same work.

Policy: the default model. Reward model: the default backbone with a seeded random scalar head
(enough to drive PPO; no labels needed). Run it under the shared lock:

    flock /tmp/caitool-heavy.lock .venv/bin/python benchmarks/bench_ppo_processes.py
    .venv/bin/python benchmarks/bench_ppo_processes.py --steps 4 --per-process-batch 4 --work /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build_reward_model(directory: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from caitool.models import load_tokenizer, model_info
    from caitool.reward import prepare_reward_tokenizer

    info = model_info("default")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(info.path, num_labels=1)
    tokenizer = load_tokenizer(info.path)
    prepare_reward_tokenizer(tokenizer, model)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def run(launcher: list[str], args: list[str], log: Path) -> None:
    with open(log, "w") as handle:
        done = subprocess.run([*launcher, *args], stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(launcher + args)} failed (exit {done.returncode}); see {log}")


def step_seconds(out: Path) -> list[float]:
    entries = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    return [entry["seconds"] for entry in entries]


def largest_difference(one: Path, two: Path) -> float:
    from safetensors.torch import load_file

    first, second = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    return max((first[name].float() - second[name].float()).abs().max().item() for name in first)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--per-process-batch", type=int, default=2)
    parser.add_argument("--response-length", type=int, default=24)
    parser.add_argument("--work", type=Path, default=None)
    options = parser.parse_args()
    work = options.work or Path(tempfile.mkdtemp(prefix="bench-ppo-processes-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    if not (work / "rm" / "config.json").exists():
        build_reward_model(work / "rm")
    prompts = work / "prompts.jsonl"
    lines = (REPO / "examples" / "red_team.jsonl").read_text().splitlines(keepends=True)
    prompts.write_text("".join(lines[:16]))
    common = [
        "ppo", str(prompts), "--policy", "default", "--rm", str(work / "rm"), "--steps", str(options.steps),
        "--response-length", str(options.response_length), "--mini-batches", "1", "--no-resume",
    ]  # fmt: skip
    b = options.per_process_batch
    caitool = [sys.executable, "-m", "caitool"]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "caitool",
    ]
    runs = {
        "1 process": (caitool, [*common, "-o", str(work / "one"), "--batch-size", str(2 * b)], work / "one"),
        "2 processes": (torchrun, [*common, "-o", str(work / "two"), "--batch-size", str(b)], work / "two"),
    }
    means = {}
    for name, (launcher, args, out) in runs.items():
        run(launcher, args, work / f"{out.name}.log")
        seconds = step_seconds(out)
        means[name] = statistics.mean(seconds[1:] or seconds)
        listed = ", ".join(f"{s:.1f}" for s in seconds)
        print(f"{name}: seconds per step {listed}; mean after step 1 {means[name]:.1f}")
    print(f"global batch {2 * b} prompts, {options.response_length} tokens, {os.cpu_count()} CPUs")
    print(f"2 processes / 1 process, seconds per step: {means['2 processes'] / means['1 process']:.2f}")
    difference = largest_difference(work / "one", work / "two")
    print(f"largest weight difference between the two final policies: {difference:.2e}")


if __name__ == "__main__":
    main()
