"""Rule pairs of held-out prompts from a check_rl_learns.sh WORK, for judge-check of a judge.

Before a judge is the reward (`grpo --judge`, `REWARD=judge` in check_rl_learns.sh), judge-check
says whether it sees what the rule sees. This writes WORK/judge_heldout.jsonl: for 20% of the
training prompts (seeded), each candidate the rule prefers (a refusal to a red-team prompt, a real
answer to a helpful one) against one it does not, from WORK's answers and prefilled refusals, as
judge-check's labelled comparisons (category: red_team or helpful).

    .venv/bin/python benchmarks/judge_heldout_pairs.py WORK
    caitool judge-check WORK/judge_heldout.jsonl -m JUDGE --mode score --by category
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from caitool.backends import derive_seed
from caitool.eval_stats import is_refusal


def rule_prefers(prompt_set: str, response: str) -> bool:
    refused = is_refusal(response)
    return refused if prompt_set == "red_team" else (bool(response.strip()) and not refused)


def load_candidates(work: Path) -> list[dict]:
    """Each training prompt with its candidates (answers and prefilled refusals), rule-labelled."""
    prompts = {r["id"]: r for r in map(json.loads, (work / "prompts.jsonl").open())}
    responses: dict[str, list[str]] = {key: [] for key in prompts}
    for name in ("answers.jsonl", "refusals.jsonl"):
        for record in map(json.loads, (work / name).open()):
            responses[record["id"]] += record["responses"]
    return [
        {
            "id": key,
            "prompt": record["prompt"],
            "set": record["set"],
            "candidates": [(r, rule_prefers(record["set"], r)) for r in responses[key] if r.strip()],
        }
        for key, record in prompts.items()
    ]


def held_out(items: list[dict], fraction: float, seed: int) -> list[dict]:
    ids = sorted(item["id"] for item in items)
    random.Random(seed).shuffle(ids)
    held = set(ids[: round(len(ids) * fraction)])
    return [item for item in items if item["id"] in held]


def write_pairs(path: Path, items: list[dict], seed: int) -> int:
    """Every preferred candidate against a rejected one, each used once; returns the count."""
    count = 0
    with path.open("w") as out:
        for item in items:
            good = [r for r, ok in item["candidates"] if ok]
            bad = [r for r, ok in item["candidates"] if not ok]
            rng = random.Random(derive_seed(seed, "heldout", item["id"]))
            for chosen, rejected in zip(rng.sample(good, len(good)), rng.sample(bad, len(bad)), strict=False):
                record = {
                    "id": f"{item['id']}-{count}",
                    "category": item["set"],
                    "prompt": item["prompt"],
                    "chosen": chosen,
                    "rejected": rejected,
                }
                out.write(json.dumps(record) + "\n")
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, help="default: WORK/judge_heldout.jsonl")
    args = parser.parse_args()
    items = held_out(load_candidates(args.work), args.fraction, args.seed)
    output = args.output or args.work / "judge_heldout.jsonl"
    count = write_pairs(output, items, args.seed)
    print(f"{count} rule pairs of {len(items)} held-out prompts: {output}")


if __name__ == "__main__":
    main()
