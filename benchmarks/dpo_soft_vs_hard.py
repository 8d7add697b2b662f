"""`caitool dpo --soft` against `--hard` on the same pairs: where each drives the reward margins.

Trains twice from the same policy with the same settings (one run per label mode, or reads
runs already there), then prints per step the loss, the mean implicit reward margin
(beta h) and the share of pairs with a positive margin, and the margin the soft labels ask
for: logit(p_chosen), averaged over the pairs. Heavy on a real model: run it under the lock.

    python benchmarks/dpo_soft_vs_hard.py runs/demo-dpo/prefs.jsonl --policy runs/demo-dpo/sft \
        --out runs/dpo-labels --epochs 2 --lr 5e-6
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path


def train(prefs: Path, policy: str, out: Path, mode: str, extra: list[str]) -> Path:
    target = out / mode
    if not (target / "caitool_manifest.json").exists():
        command = [sys.executable, "-m", "caitool", "dpo", str(prefs), "--policy", policy, "-o", str(target)]
        subprocess.run([*command, f"--{mode}", *extra], check=True)
    return target


def step_entries(model_dir: Path) -> list[dict]:
    lines = (model_dir / "training_log.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if "loss" in entry]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefs", type=Path)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", default="2")
    parser.add_argument("--lr", default="5e-6")
    parser.add_argument("--max-length", default="384")
    args = parser.parse_args()
    extra = ["--epochs", args.epochs, "--lr", args.lr, "--max-length", args.max_length]
    runs = {
        mode: step_entries(train(args.prefs, args.policy, args.out, mode, extra)) for mode in ("soft", "hard")
    }

    labels = [json.loads(line)["p_chosen"] for line in args.prefs.read_text().splitlines() if line.strip()]
    wanted = sum(math.log(p / (1 - p)) if p < 1 else math.inf for p in labels) / len(labels)
    mean = sum(labels) / len(labels)
    print(f"{len(labels)} pairs, mean p_chosen {mean:.3f}; mean margin the soft labels ask for {wanted:+.4f}")
    columns = f"{'loss':>10} {'margin':>8} {'acc':>5}"
    print(f"{'':>4}  {'soft':^25}   {'hard':^25}")
    print(f"{'step':>4}  {columns}   {columns}")
    for soft, hard in zip(runs["soft"], runs["hard"], strict=True):
        print(
            f"{soft['step']:>4}  {soft['loss']:>10.4f} {soft['rewards/margins']:>+8.4f} "
            f"{soft['rewards/accuracies']:>5.2f}   {hard['loss']:>10.4f} {hard['rewards/margins']:>+8.4f} "
            f"{hard['rewards/accuracies']:>5.2f}"
        )


if __name__ == "__main__":
    main()
