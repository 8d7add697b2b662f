"""Wall time and peak memory of `make demo` runs side by side, one run per RL stage.

Reads each run directory's timings.tsv (one "step<TAB>seconds<TAB>peak RSS in KB" line per
step, written by GNU time in the Makefile; a rerun step's last line counts) and prints, per
step, the seconds and peak resident memory of every run, then the whole pipeline's wall time
(the sum of its steps) and peak, and the RL stage against the first run's. It also prints
what the RL stage logged (first and last reward, KL or loss) and eval's refusal rates.

    make demo RUN=runs/demo-ppo; make demo ALGO=dpo RUN=runs/demo-dpo; make demo ALGO=rloo RUN=runs/demo-rloo
    python benchmarks/compare_rl_stages.py runs/demo-ppo runs/demo-dpo runs/demo-rloo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RL_STAGES = ("ppo", "rloo", "dpo")


def read_timings(run: Path) -> dict[str, tuple[float, float]]:
    timings: dict[str, tuple[float, float]] = {}
    for line in (run / "timings.tsv").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            timings[parts[0]] = (float(parts[1]), float(parts[2]) / 1024)
    return timings


def rl_stage(run: Path, timings: dict[str, tuple[float, float]]) -> str:
    ran = [stage for stage in RL_STAGES if stage in timings and (run / stage).exists()]
    if len(ran) != 1:
        raise SystemExit(f"{run}: expected one RL stage among {RL_STAGES} in timings.tsv, found {ran}")
    return ran[0]


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


def refusal_rates(run: Path) -> str:
    summary = json.loads((run / "eval" / "summary.json").read_text())
    return "; ".join(
        f"{m['prompt_set']} {m['model_name']} {100 * m['refusal_rate']:.0f}%" for m in summary["per_model"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (the first is the reference)")
    runs = parser.parse_args().runs
    timings = {run: read_timings(run) for run in runs}
    stages = {run: rl_stage(run, timings[run]) for run in runs}
    steps = list(dict.fromkeys(step for run in runs for step in timings[run]))

    header = f"{'step':<20}" + "".join(f"{f'{run.name} ({stages[run]})':>32}" for run in runs)
    print(header)
    print(f"{'':<20}" + "".join(f"{'seconds':>16}{'peak RSS MB':>16}" for _ in runs))
    for step in steps:
        cells = []
        for run in runs:
            seconds, peak = timings[run].get(step, (None, None))
            cells.append(f"{'-':>16}{'-':>16}" if seconds is None else f"{seconds:>16.1f}{peak:>16,.0f}")
        print(f"{step:<20}" + "".join(cells))
    print()
    reference = runs[0]
    ref_seconds, ref_peak = timings[reference][stages[reference]]
    for run in runs:
        total = sum(seconds for seconds, _ in timings[run].values())
        peak = max(peak for _, peak in timings[run].values())
        seconds, stage_peak = timings[run][stages[run]]
        print(
            f"{run.name}: pipeline {total:.0f} s ({total / 60:.1f} min), peak {peak:,.0f} MB; "
            f"{stages[run]} {seconds:.0f} s ({seconds / ref_seconds:.2f}x {stages[reference]}), "
            f"peak {stage_peak:,.0f} MB ({stage_peak / ref_peak:.2f}x)"
        )
        print(f"  {stages[run]}: {stage_figures(run, stages[run])}")
        if (run / "eval" / "summary.json").exists():
            print(f"  refusal rates: {refusal_rates(run)}")


if __name__ == "__main__":
    main()
