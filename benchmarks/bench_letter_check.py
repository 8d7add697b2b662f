"""Labelling through a vLLM server without ``--tokenizer``: letters checked by ``/tokenize``
against the older way, the prompt with each letter appended sent through the chat route.

Before a question's letters can be scored exactly, caitool must know each letter's token id
after that prompt and that the letter is one token of its own there. Without a local tokenizer
it asks the server: vLLM's ``/tokenize`` renders the prompt, and the prompt with each letter
appended, without running the model; a server without that route gets the same renderings from
chat requests that each generate one token. Both then send one scoring request a question.

One server (the default model as ``smol``, started here unless --base-url), one served backend,
--pairs comparisons labelled both orders by the ``Labeller`` that ``label-preferences`` runs,
the two ways in --rounds alternating rounds; printed: comparisons/s and requests per question
of each, each round's ratio and their median, and whether the probabilities agree.

    python benchmarks/bench_letter_check.py [--pairs 32] [--rounds 4] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_engines import alternating_rounds, listed, load_line  # noqa: E402
from benchmarks.bench_labeller import synthetic_comparisons  # noqa: E402
from caitool.backends import BackendOptions, load_backend  # noqa: E402
from caitool.backends.vllm_engine import set_cpu_defaults  # noqa: E402
from caitool.constitution import load_constitution  # noqa: E402
from caitool.label import Labeller  # noqa: E402
from tests.vllm_server import SERVED_NAME, default_model_server  # noqa: E402

WAYS = {"/tokenize": True, "one-token requests": False}


class Way:
    """One way of checking letters on the shared backend: its timings, requests and labels."""

    def __init__(self, name: str, backend, labeller: Labeller, comparisons: list):
        self.name, self.backend, self.labeller, self.comparisons = name, backend, labeller, comparisons
        self.requests_per_question: list[float] = []
        self.probabilities: list[float] = []

    def __call__(self) -> float:
        self.backend.tokenize_route = WAYS[self.name]
        before = self.backend.client.requests
        started = time.perf_counter()
        labels = self.labeller.judge(self.comparisons)
        seconds = time.perf_counter() - started
        if self.backend.tokenize_route != WAYS[self.name]:
            raise SystemExit(f"{self.name}: the backend stopped using it mid-run: not comparable")
        questions = 2 * len(self.comparisons)  # both orders
        self.requests_per_question.append((self.backend.client.requests - before) / questions)
        self.probabilities = [label.p_first for label in labels]
        return len(self.comparisons) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32, help="server requests in flight")
    parser.add_argument("--base-url", help="an already running server serving the default model as 'smol'")
    args = parser.parse_args()
    constitution = load_constitution("harmless")
    comparisons = synthetic_comparisons(str(REPO / "examples" / "red_team.jsonl"), args.pairs, constitution)
    print(f"{len(comparisons)} comparisons, both orders; {load_line('at the start')}")
    print(f"vLLM CPU settings: {set_cpu_defaults()}")
    with (
        tempfile.TemporaryDirectory() as tmp,
        default_model_server(args.base_url, Path(tmp), eager=False) as url,
    ):
        backend = load_backend(
            f"openai:{SERVED_NAME}", BackendOptions(base_urls=(url,), concurrency=args.concurrency)
        )
        try:
            labeller = Labeller(backend, constitution)
            first, second = (Way(name, backend, labeller, comparisons) for name in WAYS)
            first()  # warm-up: the few-shot prefix into the prefix cache, the route probed
            first.requests_per_question.clear()
            rounds = alternating_rounds(args.rounds, first, second)
        finally:
            backend.close()
    for index, (a, b) in enumerate(rounds, 1):
        print(f"round {index}: {first.name} {a:.2f}, {second.name} {b:.2f} comparisons/s: ratio {a / b:.2f}")
    for way, runs in zip((first, second), zip(*rounds, strict=True), strict=True):
        requests = statistics.mean(way.requests_per_question)
        print(
            f"{way.name}: best {max(runs):.2f} comparisons/s (runs: {listed(list(runs), 2)}), "
            f"{requests:.1f} requests a question"
        )
    ratios = [a / b for a, b in rounds]
    gap = max(abs(p - q) for p, q in zip(first.probabilities, second.probabilities, strict=True))
    median = statistics.median(ratios)
    print(f"summary: {first.name} / {second.name} per round: {listed(ratios, 2)}; median {median:.2f}")
    print(f"summary: largest difference in P(first) between the two ways: {gap:.1e}")
    print(load_line("at the end"))


if __name__ == "__main__":
    main()
