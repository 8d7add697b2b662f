"""The engines side by side in one run: transformers in this process, vLLM in this process
(``--engine vllm``), and a vLLM server reached through caitool (``openai:``).

Generation: the same 64 prompts (the first 32 of examples/red_team.jsonl and of
examples/helpful.jsonl), exactly --new-tokens new tokens each (``ignore_eos``), temperature 0.7,
through ``run_generate`` (the whole phase: validation, backend calls, JSONL output). Throughput
is generated tokens per second of the phase with the model already loaded (the engine start is
printed apart): the transformers backend at each --local-batch (best reported), the in-process
engine with --concurrency sequences at once, the server at --concurrency requests in flight.

Labelling: --pairs comparisons (a refusal against a compliance, as bench_labeller.py) labelled
by the same ``Labeller`` that ``label-preferences`` runs (both orders, few-shot turns), through
each engine; reported in comparisons per second.

Each measurement is the best of --repeats; the engines run one after another (never two at
once), in the order transformers, in-process vLLM, server. Needs vLLM importable here
(``make install-vllm``); the server starts from $CAITOOL_VLLM_PYTHON or the vllm-venv, or give
--base-url of one already serving the default model as ``smol``.

Both vLLM engines start with caitool's CPU settings (``set_cpu_defaults``: on a machine of a few
cores, no core held back for vLLM's scheduler), the server too, since it inherits this process's
environment; set VLLM_CPU_NUM_OF_RESERVED_CPU=1 to measure vLLM's own reservation instead.

    python benchmarks/bench_engines.py [--new-tokens 64] [--prompts 64] [--pairs 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


def bench_in_process(concurrency: int, setup: Setup, results: Results) -> None:
    options = BackendOptions(engine="vllm", concurrency=concurrency)
    engine, seconds = timed_load("default", options)
    print(f"vLLM in-process: engine up in {seconds:.1f}s ({engine.describe()['engine']})")
    try:
        measure("vLLM in-process", engine, options, setup, results)
    finally:
        engine.close()


def bench_server(base_url: str | None, eager: bool, concurrency: int, setup: Setup, results: Results) -> None:
    with default_model_server(base_url, setup.prompts.parent, eager=eager) as url:
        options = BackendOptions(base_urls=(url,), concurrency=concurrency)
        served, _ = timed_load(f"openai:{SERVED_NAME}", options)
        try:
            measure(f"vLLM server via caitool (concurrency {concurrency})", served, options, setup, results)
        finally:
            served.close()


def load_line(when: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {when}: {one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
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
        bench_in_process(args.engine_concurrency, setup, results)
        if not args.skip_server:
            bench_server(args.base_url, args.eager, args.concurrency, setup, results)

    names = list(results.generation)
    local = results.generation[names[0]]
    for name in names:
        rate = results.generation[name]
        print(f"summary: {name}: {rate:.0f} tok/s, {rate / local:.2f}x {names[0]}")
    if len(names) == 3:
        print(
            f"summary: in-process / server: {results.generation[names[1]] / results.generation[names[2]]:.2f}"
        )
    for name, rate in results.labelling.items():
        print(f"summary: label-preferences, {name}: {rate:.2f} comparisons/s")
    print(load_line("at the end"))


if __name__ == "__main__":
    main()
