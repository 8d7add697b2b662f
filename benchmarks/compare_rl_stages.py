"""Wall time and peak memory of the RL stages `make demo` ran, side by side, with what they did.

One run directory can hold every stage: `make demo ALGO=dpo` in a directory where `make demo`
(ppo) already ran reuses the supervised phase and the labels and runs dpo, eval and the report.
eval and timings.tsv are shared by the stages, so snapshot them after each run:

    for algo in ppo dpo rloo; do
      make demo RUN=runs/rl ALGO=$algo
      cp runs/rl/timings.tsv runs/rl/timings-$algo.tsv; cp -a runs/rl/eval runs/rl/eval-$algo
    done
    python benchmarks/compare_rl_stages.py runs/rl

For each stage found (a directory ppo/, rloo/ or dpo/ and a line in timings.tsv) it prints the
seconds and peak resident memory (GNU time's, in timings.tsv) of every step the stage's pipeline
took, the whole pipeline's wall time (the sum of its steps) and peak (the largest step), the RL
step against the first stage's, what the stage logged (reward and KL, or loss and margin) and
its eval: refusal rates and the labeller's win rates. A stage's timings and eval are read from
``timings-STAGE.tsv`` and ``eval-STAGE/`` when present, else from ``timings.tsv`` and ``eval/``.
Several run directories (one stage each) work as well.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RL_STAGES = ("ppo", "rloo", "dpo")
# The steps only one kind of stage needs: the reward model (ppo, rloo) or revision pairs (dpo).
OWN_STEPS = {"train-rm": ("ppo", "rloo"), "pairs-from-revisions": ("dpo",)}


def read_timings(path: Path) -> dict[str, tuple[float, float]]:
    """step -> (seconds, peak MB); a rerun step's last line counts."""
    timings: dict[str, tuple[float, float]] = {}
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            timings[parts[0]] = (float(parts[1]), float(parts[2]) / 1024)
    return timings


def stage_timings(run: Path, stage: str) -> dict[str, tuple[float, float]]:
    """The steps the stage's pipeline took: the shared ones, its own, and no other stage's."""
    snapshot = run / f"timings-{stage}.tsv"
    timings = read_timings(snapshot if snapshot.exists() else run / "timings.tsv")
    return {
        step: figures
        for step, figures in timings.items()
        if step not in RL_STAGES or step == stage
        if stage in OWN_STEPS.get(step, (stage,))
    }


def stages_of(run: Path) -> list[str]:
    timings = read_timings(run / "timings.tsv")
    return [stage for stage in RL_STAGES if stage in timings and (run / stage).exists()]


def stage_figures(run: Path, stage: str) -> str:
    log = [json.loads(line) for line in (run / stage / "training_log.jsonl").read_text().splitlines()]
    log = [entry for entry in log if "loss" in entry or "reward" in entry]
    first, last = log[0], log[-1]
    if stage == "dpo":
        return (
            f"{len(log)} steps, loss {first['loss']:.4f} -> {last['loss']:.4f}, "
            f"reward margin {first['rewards/margins']:+.4f} -> {last['rewards/margins']:+.4f}, "
            f"accuracy {last['rewards/accuracies']:.2f}"
        )
    return (
        f"{len(log)} steps, reward {first['reward']:+.3f} -> {last['reward']:+.3f}, "
        f"KL {first['kl']:.4f} -> {last['kl']:.4f}, cut without end-of-turn {last['missing_eot']:.2f}"
    )


def eval_lines(run: Path, stage: str) -> list[str]:
    snapshot = run / f"eval-{stage}" / "summary.json"
    path = snapshot if snapshot.exists() else run / "eval" / "summary.json"
    if not path.exists():
        return []
    summary = json.loads(path.read_text())
    names = [m["name"] for m in summary.get("models", [])]
    if stage not in names:
        return [f"eval: {path} compared {', '.join(names)}, not {stage}"]
    refusals = "; ".join(
        f"{m['prompt_set']} {m['model_name']} {100 * m['refusal_rate']:.0f}%" for m in summary["per_model"]
    )
    lines = [f"refusal rates: {refusals}"]
    for pair in summary.get("pairwise", []):
        low, high = pair["win_rate_ci"]
        lines.append(
            f"{pair['prompt_set']}: {pair['model_a']} preferred over {pair['model_b']} in "
            f"{100 * pair['win_rate']:.0f}% (95% CI {100 * low:.0f}-{100 * high:.0f}%)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run directories (the first stage found is the reference)"
    )
    runs = parser.parse_args().runs
    columns = [(run, stage) for run in runs for stage in stages_of(run)]
    if not columns:
        raise SystemExit(f"no RL stage ({', '.join(RL_STAGES)}) with a timing line in {runs}")
    timings = {column: stage_timings(*column) for column in columns}
    steps = list(dict.fromkeys(step for column in columns for step in timings[column]))

    print(f"{'step':<22}" + "".join(f"{f'{run.name}/{stage}':>32}" for run, stage in columns))
    print(f"{'':<22}" + "".join(f"{'seconds':>16}{'peak RSS MB':>16}" for _ in columns))
    for step in steps:
        cells = []
        for column in columns:
            seconds, peak = timings[column].get(step, (None, None))
            cells.append(f"{'-':>16}{'-':>16}" if seconds is None else f"{seconds:>16.1f}{peak:>16,.0f}")
        print(f"{step:<22}" + "".join(cells))
    print()
    reference = columns[0]
    ref_seconds, ref_peak = timings[reference][reference[1]]
    for run, stage in columns:
        steps_taken = timings[(run, stage)]
        total = sum(seconds for seconds, _ in steps_taken.values())
        peak = max(peak for _, peak in steps_taken.values())
        seconds, stage_peak = steps_taken[stage]
        print(
            f"{run.name}/{stage}: pipeline {total:.0f} s ({total / 60:.1f} min), peak {peak:,.0f} MB; "
            f"{stage} step {seconds:.0f} s ({seconds / ref_seconds:.2f}x {reference[1]}), "
            f"peak {stage_peak:,.0f} MB ({stage_peak / ref_peak:.2f}x)"
        )
        print(f"  {stage}: {stage_figures(run, stage)}")
        for line in eval_lines(run, stage):
            print(f"  {line}")


if __name__ == "__main__":
    main()
