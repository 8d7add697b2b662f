"""The engines side by side in one run: transformers in this process, vLLM in this process
(``--engine vllm``), and a vLLM server reached through caitool (``openai:``).

Generation: the same 64 prompts (the first 32 of examples/red_team.jsonl and of
examples/helpful.jsonl), exactly --new-tokens new tokens each (``ignore_eos``), temperature 0.7,
through ``run_generate`` (the whole phase: validation, backend calls, JSONL output). Throughput
is generated tokens per second of the phase with the model already loaded (the engine start is
printed apart): the transformers backend at each --local-batch (best reported), the in-process
engine with --engine-concurrency sequences at once, the server at --concurrency requests in flight.

Labelling: --pairs comparisons (a refusal against a compliance, as bench_labeller.py) labelled
by the same ``Labeller`` that ``label-preferences`` runs (both orders, few-shot turns), through
each engine; reported in comparisons per second.

The transformers backend runs first, alone, best of --repeats at each batch size; then the
two vLLM engines are up together and measured in alternating rounds (never two at once; the
order flips each round, so a machine that speeds up or slows down during the run favours
neither): each round times one phase through each, and the round's in-process / server ratio
is printed, with the median over the rounds. On a shared machine whose speed drifts by 10%
within minutes, that paired median says more than a ratio of two bests taken minutes apart.
Needs vLLM importable here (``make install-vllm``); the server starts from $CAITOOL_VLLM_PYTHON
or the vllm-venv, or give --base-url of one already serving the default model as ``smol``.

Both vLLM engines start with caitool's CPU settings (``set_cpu_defaults``: on a machine of a few
cores, no core held back for vLLM's scheduler), the server too, since it inherits this process's
environment; set VLLM_CPU_NUM_OF_RESERVED_CPU=1 to measure vLLM's own reservation instead.

    python benchmarks/bench_engines.py [--new-tokens 64] [--prompts 64] [--pairs 32] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_labeller import synthetic_comparisons  # noqa: E402
from caitool.backends import BackendOptions, SamplingParams, load_backend  # noqa: E402
from caitool.backends.vllm_engine import set_cpu_defaults  # noqa: E402
from caitool.constitution import load_constitution  # noqa: E402
from caitool.generate import run_generate  # noqa: E402
from caitool.label import Labeller  # noqa: E402
from caitool.pipeline import Runtime  # noqa: E402
from tests.vllm_server import SERVED_NAME, default_model_server  # noqa: E402


def write_prompts(path: Path, count: int) -> Path:
    lines = []
    for name in ("red_team.jsonl", "helpful.jsonl"):
        lines += (REPO / "examples" / name).read_text().splitlines()[: (count + 1) // 2]
    path.write_text("\n".join(lines[:count]) + "\n")
    return path


def best_of(repeats: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    runs = [measure() for _ in range(repeats)]
    return max(runs), runs


def alternating_rounds(rounds: int, first: Callable[[], float], second: Callable[[], float]):
    """``rounds`` measurements of each, paired: first then second, then second then first, ..."""
    pairs = []
    for index in range(rounds):
        if index % 2:
            b, a = second(), first()
        else:
            a, b = first(), second()
        pairs.append((a, b))
    return pairs


def generation_rate(backend, prompts: Path, params: SamplingParams, options: BackendOptions) -> float:
    runtime = Runtime(backend=options, resume=False)
    out = prompts.with_name("out.jsonl")
    started = time.perf_counter()
    result = run_generate(prompts, out, model="default", params=params, runtime=runtime, backend=backend)
    return result.tracker.tokens / (time.perf_counter() - started)


def labelling_rate(backend, comparisons) -> float:
    labeller = Labeller(backend, load_constitution("harmless"))
    started = time.perf_counter()
    labeller.judge(comparisons)
    return len(comparisons) / (time.perf_counter() - started)


def timed_load(spec: str, options: BackendOptions):
    started = time.perf_counter()
    backend = load_backend(spec, options)
    return backend, time.perf_counter() - started


def listed(values: list[float], digits: int = 0) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def measure(name: str, backend, options: BackendOptions, setup: Setup, results: Results) -> None:
    """Generation then labelling throughput of one loaded backend, best of ``setup.repeats`` each."""
    rate, runs = best_of(
        setup.repeats, lambda: generation_rate(backend, setup.prompts, setup.params, options)
    )
    results.generation[name] = rate
    print(f"{name}: {rate:.0f} tok/s (runs: {listed(runs)})")
    measure_labelling(name, backend, setup, results)


def measure_labelling(name: str, backend, setup: Setup, results: Results) -> None:
    rate, runs = best_of(setup.repeats, lambda: labelling_rate(backend, setup.comparisons))
    results.labelling[name] = rate
    print(f"{name}, label-preferences: {rate:.2f} comparisons/s (runs: {listed(runs, 2)})")


@dataclass
class Setup:
    prompts: Path
    params: SamplingParams
    comparisons: list
    repeats: int


@dataclass
class Results:
    generation: dict[str, float] = field(default_factory=dict)
    labelling: dict[str, float] = field(default_factory=dict)
    # The median of the paired rounds' in-process / server ratios, by measurement.
    ratios: dict[str, float] = field(default_factory=dict)


def bench_transformers(batches: list[int], setup: Setup, results: Results) -> None:
    backend, seconds = timed_load("default", BackendOptions(batch_size=max(batches)))
    print(f"transformers: loaded in {seconds:.1f}s")
    rates = {}
    for batch in batches:
        backend.batch_size = batch
        options = BackendOptions(batch_size=batch)
        rates[batch], runs = best_of(
            setup.repeats, lambda o=options: generation_rate(backend, setup.prompts, setup.params, o)
        )
        print(f"transformers, batch {batch}: {rates[batch]:.0f} tok/s (runs: {listed(runs)})")
    best = max(rates, key=rates.get)
    backend.batch_size = best
    name = f"transformers (best batch {best})"
    results.generation[name] = rates[best]
    measure_labelling(name, backend, setup, results)


def bench_vllm_engines(args: argparse.Namespace, setup: Setup, results: Results) -> None:
    """The in-process engine, and the server unless --skip-server, in alternating rounds."""
    in_process = BackendOptions(engine="vllm", concurrency=args.engine_concurrency)
    engine, seconds = timed_load("default", in_process)
    print(f"vLLM in-process: engine up in {seconds:.1f}s ({engine.describe()['engine']})")
    try:
        if args.skip_server:
            measure("vLLM in-process", engine, in_process, replace(setup, repeats=args.rounds), results)
            return
        with default_model_server(args.base_url, setup.prompts.parent, eager=args.eager) as url:
            over_http = BackendOptions(base_urls=(url,), concurrency=args.concurrency)
            served, _ = timed_load(f"openai:{SERVED_NAME}", over_http)
            try:
                server_name = f"vLLM server via caitool (concurrency {args.concurrency})"
                pair = (("vLLM in-process", engine, in_process), (server_name, served, over_http))
                compare_in_rounds(*pair, replace(setup, repeats=args.rounds), results)
            finally:
                served.close()
    finally:
        engine.close()


def compare_in_rounds(first: tuple, second: tuple, setup: Setup, results: Results) -> None:
    (name_a, backend_a, options_a), (name_b, backend_b, options_b) = first, second
    generation = alternating_rounds(
        setup.repeats,
        lambda: generation_rate(backend_a, setup.prompts, setup.params, options_a),
        lambda: generation_rate(backend_b, setup.prompts, setup.params, options_b),
    )
    report_rounds("generation", "tok/s", 0, (name_a, name_b), generation, results.generation, results)
    labelling = alternating_rounds(
        setup.repeats,
        lambda: labelling_rate(backend_a, setup.comparisons),
        lambda: labelling_rate(backend_b, setup.comparisons),
    )
    report_rounds(
        "label-preferences", "comparisons/s", 2, (name_a, name_b), labelling, results.labelling, results
    )


def report_rounds(
    what: str, unit: str, digits: int, names: tuple[str, str], pairs, bests: dict, results: Results
) -> None:
    """Print each round and each engine's runs; keep the bests in ``bests``, the median ratio in results."""
    for index, (a, b) in enumerate(pairs, 1):
        rates = f"{names[0]} {a:.{digits}f}, {names[1]} {b:.{digits}f} {unit}"
        print(f"{what}, round {index}: {rates}: ratio {a / b:.2f}")
    for name, runs in zip(names, zip(*pairs, strict=True), strict=True):
        bests[name] = max(runs)
        print(f"{name}, {what}: {max(runs):.{digits}f} {unit} (runs: {listed(list(runs), digits)})")
    ratios = [a / b for a, b in pairs]
    results.ratios[what] = statistics.median(ratios)
    print(
        f"{what}: {names[0]} / {names[1]} per round: {listed(ratios, 2)}; median {results.ratios[what]:.2f}"
    )


def load_line(when: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {when}: {one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs of the transformers backend, best kept")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of the two vLLM engines")
    parser.add_argument("--local-batch", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--concurrency", type=int, default=32, help="server requests in flight")
    parser.add_argument("--engine-concurrency", type=int, default=64, help="in-process sequences at once")
    parser.add_argument("--base-url", help="an already running server serving the default model as 'smol'")
    parser.add_argument("--eager", action="store_true", help="start the server with --enforce-eager")
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args()
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=args.new_tokens, ignore_eos=True)
    constitution = load_constitution("harmless")
    comparisons = synthetic_comparisons(str(REPO / "examples" / "red_team.jsonl"), args.pairs, constitution)
    print(
        f"{args.prompts} prompts x {args.new_tokens} new tokens, {len(comparisons)} comparisons, fp32, "
        f"{os.cpu_count()} CPUs; {load_line('at the start')}"
    )
    print(f"vLLM CPU settings (both vLLM engines): {set_cpu_defaults()}")
    results = Results()
    with tempfile.TemporaryDirectory() as tmp:
        prompts = write_prompts(Path(tmp) / "prompts.jsonl", args.prompts)
        setup = Setup(prompts, params, comparisons, args.repeats)
        bench_transformers(args.local_batch, setup, results)
        bench_vllm_engines(args, setup, results)

    print_summary(results)
    print(load_line("at the end"))


def print_summary(results: Results) -> None:
    names = list(results.generation)
    local = results.generation[names[0]]
    for name in names:
        rate = results.generation[name]
        print(f"summary: {name}: {rate:.0f} tok/s (best), {rate / local:.2f}x {names[0]}")
    if len(names) == 3:
        of_bests = results.generation[names[1]] / results.generation[names[2]]
        print(
            f"summary: in-process / server: {of_bests:.2f} (bests), "
            f"{results.ratios['generation']:.2f} (median of the paired rounds)"
        )
    for name, rate in results.labelling.items():
        print(f"summary: label-preferences, {name}: {rate:.2f} comparisons/s")
    if "label-preferences" in results.ratios:
        print(
            "summary: label-preferences, in-process / server: "
            f"{results.ratios['label-preferences']:.2f} (median of the paired rounds)"
        )


if __name__ == "__main__":
    main()
