"""Verdict mode (the judge answers in its own turn; P(A) from the generated letter's log-probs)
against logprob mode (the prefilled "The answer is (" and the next token's log-probs), on the
same served model and the same labelled comparisons (examples/judge_check.jsonl).

Both modes run through ``caitool judge-check`` against a vLLM (CPU) server serving the default
model as ``smol`` (started here unless --base-url names one). Printed:

* the judge-check table and verdict of each mode;
* agreement: the share of comparisons (readable in both modes) whose labels pick the same side;
* the mean absolute difference of the labels p (both orders averaged, as label-preferences writes);
* verdict mode's unparseable answers (left out, never guessed).

With ``--local`` the default model runs in this process instead (the local backend also
reports generated tokens' log-probs). Run it under the heavy-jobs lock on a shared machine:

    flock /tmp/caitool-heavy.lock .venv/bin/python benchmarks/bench_verdict_vs_logprob.py [--local]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from caitool.backends import BackendOptions  # noqa: E402
from caitool.display import show_judge_check  # noqa: E402
from caitool.judge_check import run_judge_check  # noqa: E402
from caitool.pipeline import Runtime  # noqa: E402
from tests.vllm_server import SERVED_NAME, default_model_server  # noqa: E402


def compare(report: dict, first: str, second: str) -> dict:
    """Agreement of the picked side and mean |p difference| over comparisons readable in both modes."""
    by_mode: dict[str, dict[str, float]] = {}
    for comparison in report["comparisons"]:
        by_mode.setdefault(comparison["mode"], {})[comparison["id"]] = comparison["p"]
    common = sorted(set(by_mode.get(first, {})) & set(by_mode.get(second, {})))
    agree = sum((by_mode[first][i] > 0.5) == (by_mode[second][i] > 0.5) for i in common)
    differences = [abs(by_mode[first][i] - by_mode[second][i]) for i in common]
    return {
        "compared": len(common),
        "agreement": agree / len(common) if common else None,
        "mean_abs_label_difference": sum(differences) / len(differences) if differences else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", help="a server already serving the default model as smol")
    parser.add_argument("--input", default=str(REPO / "examples" / "judge_check.jsonl"))
    parser.add_argument("--out", help="also write the judge-check report and the comparison here (JSON)")
    parser.add_argument(
        "--local", action="store_true", help="the default model in this process instead of a vLLM server"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        if args.local:
            model, runtime = "default", Runtime(backend=BackendOptions(batch_size=8))
        else:
            url = stack.enter_context(default_model_server(args.base_url, Path(scratch), eager=True))
            model = f"openai:{SERVED_NAME}"
            runtime = Runtime(backend=BackendOptions(base_urls=(url,), concurrency=8))
        report_path = Path(scratch) / "check.json"
        check = functools.partial(
            run_judge_check,
            model=model,
            modes=["logprob", "verdict"],
            max_unparseable=1.0,  # measure how often it happens rather than stop
            runtime=runtime,
        )
        # A fresh server answers its first few hundred questions several times slower than
        # later ones (on the CPU server: 1.18 s against 0.28 s a comparison; a warm-up on 8
        # comparisons was not enough), so the mode run first would be timed with that start:
        # the whole check runs once untimed.
        check(args.input, output=Path(scratch) / "warm-up.json")
        started = time.perf_counter()
        result = check(args.input, output=report_path)
        seconds = time.perf_counter() - started
        show_judge_check(result)
        report = json.loads(report_path.read_text())
    figures = compare(report, "logprob", "verdict")
    unparseable = report["modes"]["verdict"].get("unparseable", {})
    print(
        f"verdict vs logprob ({model}) on {args.input}: {figures['compared']} comparisons readable in both; "
        f"same side picked {figures['agreement']:.1%}; mean |label difference| "
        f"{figures['mean_abs_label_difference']:.3f}; verdict answers unparseable: "
        f"{unparseable.get('unparseable_answers')} of {unparseable.get('answers')}; "
        f"{seconds:.0f}s for both modes"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"comparison": figures, "report": report}, indent=1))


if __name__ == "__main__":
    main()
