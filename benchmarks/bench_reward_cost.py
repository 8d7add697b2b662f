"""What a judge as the reward costs against a reward model as the reward: seconds per grpo step.

The same grpo run (policy, prompts, batch, samples per prompt, response length, seed) three
times, with a different reward each time:

* ``rm``: a reward model on the policy's backbone (its head untrained: scoring costs the same);
* ``judge score``: the judge asks one yes/no question per sample (prefix-cached few-shot turns);
* ``judge group``: the judge compares each sample with each other sample of its group, both
  option orders: k(k-1) questions per group of k.

It prints, per reward, the mean seconds per step and the seconds spent in the reward itself
(steps after the first; the first loads and warms up), and their ratio to the reward model's.

    flock /tmp/caitool-heavy.lock .venv/bin/python benchmarks/bench_reward_cost.py
    .venv/bin/python benchmarks/bench_reward_cost.py --policy default --judge openai:smol --base-url URL
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def prompts_file(path: Path, count: int) -> Path:
    red = (REPO / "examples/red_team.jsonl").read_text().splitlines()[: count // 2]
    helpful = (REPO / "examples/helpful.jsonl").read_text().splitlines()[: count - count // 2]
    path.write_text("\n".join(red + helpful) + "\n")
    return path


def run(label: str, reward_args: list[str], args: argparse.Namespace, work: Path) -> dict[str, float]:
    out = work / f"grpo-{label.replace(' ', '-')}"
    command = [
        str(Path(sys.executable).with_name("caitool")),
        "grpo",
        str(work / "prompts.jsonl"),
        "--policy",
        args.policy,
        "-o",
        str(out),
        "--steps",
        str(args.steps),
        "-b",
        str(args.batch),
        "--num-generations",
        str(args.k),
        "--response-length",
        str(args.response_length),
        "--missing-eot-penalty",
        "0",
        "--seed",
        "0",
        *reward_args,
    ]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        sys.exit(f"{label}: grpo failed:\n{finished.stderr[-2000:]}")
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    timed = log[1:] or log
    return {
        "step_seconds": sum(e["seconds"] for e in timed) / len(timed),
        "reward_seconds": sum(e["reward_seconds"] for e in timed) / len(timed),
        "questions": sum(e.get("judge_calls", 0) for e in timed) / len(timed),
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="default")
    parser.add_argument("--judge", default="default", help="the judge's model spec")
    parser.add_argument("--rm", default=None, help="a reward model (default: a random head on the policy)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="prompts per step")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--response-length", type=int, default=16)
    parser.add_argument("--base-url", default=None, help="the judge's server, for --judge openai:NAME")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-reward-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts_file(work / "prompts.jsonl", 2 * args.batch)
    rm = args.rm
    if rm is None:
        from caitool.models import resolve_model_path
        from tests.tiny_model import save_reward_model

        rm = str(save_reward_model(resolve_model_path(args.policy), work / "rm"))
    served = ["--base-url", args.base_url] if args.base_url else []
    judge = ["--judge", args.judge, *served]
    rewards = {
        "rm": ["--rm", rm],
        "judge score": [*judge, "--judge-mode", "score"],
        "judge group": [*judge, "--judge-mode", "group"],
    }
    print(
        f"grpo, policy {args.policy}, judge {args.judge}: {args.batch} prompts x {args.k} samples per step, "
        f"{args.response_length}-token responses, {args.steps} steps (the first left out)"
    )
    results = {label: run(label, reward_args, args, work) for label, reward_args in rewards.items()}
    base = results["rm"]
    print(
        f"{'reward':<12} {'s/step':>8} {'x rm':>6} {'reward s/step':>14} {'x rm':>7} {'questions/step':>15}"
    )
    for label, figures in results.items():
        step, reward = figures["step_seconds"], figures["reward_seconds"]
        print(
            f"{label:<12} {step:>8.2f} {step / base['step_seconds']:>6.2f} "
            f"{reward:>14.2f} {reward / base['reward_seconds']:>7.1f} {figures['questions']:>15.0f}"
        )
    print(f"work files in {work}")


if __name__ == "__main__":
    main()
