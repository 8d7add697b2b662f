"""The demo's PPO step in its old and its new configuration: peak RSS and seconds per step.

Runs a real ``caitool ppo`` with ``make demo``'s PPO settings (the first ``N`` = 24 red-team
prompts, ``--steps 10 -b 4 --mini-batches 1 --response-length 64 --seed 0``) under
``/usr/bin/time -v``, once per configuration, one after the other in this session:

* full + separate: the demo's command before issue 10, a full-parameter policy and a separate
  value model started from the reward model (``--value-model separate``, default ``--lr``);
* LoRA + shared: the demo's command now (``--lora --value-model shared --lr 1e-5
  --gradient-checkpointing``).

The demo's policy is its SFT model; here it is the default model it is fine-tuned from (same
architecture and size). The reward model is the default backbone with a seeded random head, as
in ``bench_ppo_memory.py``. For each run it prints the peak RSS, the wall time and the seconds per
step from ``training_log.jsonl`` (mean over every step, and over steps 2 on, which leave out the
first step's one-off costs), then the ratios new / old.

``--checkpoint`` adds a short run of the new configuration (``--steps 2 --checkpoint-every 1``):
it copies ``checkpoint-1`` while step 2 runs (a finished run deletes its checkpoints) and prints
its size and the bytes per trained parameter it holds.

    python benchmarks/bench_demo_ppo.py --checkpoint     # run under the shared lock
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_ppo_memory import make_reward_model  # noqa: E402

CAITOOL = str(Path(sys.executable).with_name("caitool"))
DEMO_PROMPTS, DEMO_N = ROOT / "examples/red_team.jsonl", 24
DEMO_ARGS = ["-b", "4", "--mini-batches", "1", "--response-length", "64", "--seed", "0"]
CONFIGURATIONS = {
    "full + separate (old demo)": ["--value-model", "separate"],
    "LoRA + shared (demo now)": [
        *("--lora", "--value-model", "shared", "--lr", "1e-5", "--gradient-checkpointing"),
    ],
}


def ppo_command(prompts: Path, rm_dir: Path, out: Path, steps: int, extra: list[str]) -> list[str]:
    head = [CAITOOL, "ppo", str(prompts), "--policy", "default", "--rm", str(rm_dir), "-o", str(out)]
    return [*head, *DEMO_ARGS, "--steps", str(steps), *extra]


def time_field(report: str, label: str) -> str:
    match = re.search(rf"^\s*{re.escape(label)}: (.+)$", report, re.MULTILINE)
    if not match:
        raise SystemExit(f"/usr/bin/time -v printed no '{label}'")
    return match.group(1).strip()


def wall_seconds(clock: str) -> float:
    seconds = 0.0
    for part in clock.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def timed_run(command: list[str], work: Path, name: str) -> dict:
    """One ppo run under GNU time: its peak RSS, wall time and per-step seconds."""
    report = work / f"{name}.time"
    load = os.getloadavg()[0]
    with open(work / f"{name}.log", "w") as log:
        result = subprocess.run(["/usr/bin/time", "-v", "-o", str(report), *command], stderr=log, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed (exit {result.returncode}); see {work / f'{name}.log'}")
    text = report.read_text()
    out = Path(command[command.index("-o") + 1])
    steps = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    seconds = [s["seconds"] for s in steps]
    return {
        "peak_rss_gb": int(time_field(text, "Maximum resident set size (kbytes)")) * 1024 / 1e9,
        "wall_s": wall_seconds(time_field(text, "Elapsed (wall clock) time (h:mm:ss or m:ss)")),
        "steps": len(seconds),
        "s_per_step": sum(seconds) / len(seconds),
        "s_per_step_after_first": sum(seconds[1:]) / max(1, len(seconds) - 1),
        "load_before": load,
    }


def checkpoint_size(prompts: Path, rm_dir: Path, work: Path) -> dict:
    """Size of the new configuration's checkpoint, copied while the step after it runs."""
    out = work / "checkpointed"
    extra = [*CONFIGURATIONS["LoRA + shared (demo now)"], "--checkpoint-every", "1"]
    command = ppo_command(prompts, rm_dir, out, 2, extra)
    log_path = work / "checkpointed.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stderr=log, cwd=ROOT)
    checkpoint = out.parent / f".{out.name}.partial" / "checkpoints" / "checkpoint-1"
    copy = work / "checkpoint-1"
    while process.poll() is None and not copy.exists():
        if "saved checkpoint-1" in log_path.read_text():
            shutil.copytree(checkpoint, copy)
        time.sleep(0.2)
    if process.wait() != 0 or not copy.exists():
        raise SystemExit(f"the checkpointed run failed or saved no checkpoint; see {log_path}")
    files = {f.name: f.stat().st_size for f in copy.rglob("*") if f.is_file()}
    return {"files": files, "bytes": sum(files.values()), "trained_parameters": trained_parameters(copy)}


def trained_parameters(checkpoint: Path) -> int:
    """Parameters in the checkpoint's model files (accelerate saves one per trained model)."""
    import torch

    total = 0
    for path in sorted(checkpoint.glob("pytorch_model*.bin")):
        total += sum(t.numel() for t in torch.load(path, map_location="cpu", weights_only=True).values())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="PPO steps per run (the demo's PPO_STEPS).")
    parser.add_argument("--checkpoint", action="store_true", help="Also measure the new checkpoint's size.")
    parser.add_argument("--work", help="Keep the runs here (default: a temporary directory).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        make_reward_model(work / "rm")
        prompts = work / "prompts.jsonl"
        prompts.write_text("".join(DEMO_PROMPTS.read_text().splitlines(keepends=True)[:DEMO_N]))
        results = {}
        for index, (name, extra) in enumerate(CONFIGURATIONS.items()):
            command = ppo_command(prompts, work / "rm", work / f"ppo{index}", args.steps, extra)
            print(f"{name}: {' '.join(command[1:])}", flush=True)
            results[name] = r = timed_run(command, work, f"ppo{index}")
            print(
                f"  peak RSS {r['peak_rss_gb']:.2f} GB, wall {r['wall_s']:.0f} s, {r['steps']} steps, "
                f"{r['s_per_step']:.1f} s/step ({r['s_per_step_after_first']:.1f} s/step after step 1), "
                f"load average before {r['load_before']:.1f}",
                flush=True,
            )
        old, new = results.values()
        print("\n| configuration | peak RSS | wall | s/step | s/step after step 1 |")
        print("|---|---|---|---|---|")
        for name, r in results.items():
            print(
                f"| {name} | {r['peak_rss_gb']:.2f} GB | {r['wall_s']:.0f} s | {r['s_per_step']:.1f} | "
                f"{r['s_per_step_after_first']:.1f} |"
            )
        print(
            f"new / old: peak RSS {new['peak_rss_gb'] / old['peak_rss_gb']:.2f}, "
            f"s/step {new['s_per_step'] / old['s_per_step']:.2f} "
            f"(after step 1: {new['s_per_step_after_first'] / old['s_per_step_after_first']:.2f})"
        )
        if args.checkpoint:
            c = checkpoint_size(prompts, work / "rm", work)
            print(
                f"\nLoRA + shared checkpoint-1: {c['bytes'] / 1e6:.1f} MB "
                f"({c['trained_parameters'] / 1e6:.2f}M trained parameters, "
                f"{c['bytes'] / c['trained_parameters']:.1f} bytes each): "
                + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sorted(c["files"].items()))
            )


if __name__ == "__main__":
    main()
