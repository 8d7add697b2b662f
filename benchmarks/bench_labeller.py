"""Time the log-prob labeller against asking the same model to write its verdict.

Both label the same pairs with the same model, the same few-shot examples and the same
multiple-choice question (one option order, no swap), in batches of the same size:

* log-prob: one forward pass per batch reads the probabilities of the letters "A" and "B";
* generated verdict: the model writes up to ``--verdict-tokens`` tokens answering
  "explain, then say A or B", and the letter is parsed from the text.

Prints the seconds per comparison of each and their ratio. Pairs are built from the example
red-team prompts with one short refusal and one short compliance each, so no generation
run is needed first.

    python benchmarks/bench_labeller.py --pairs 16 --model default
"""

from __future__ import annotations

import argparse
import re
import time

from caitool.backend import SamplingParams, TransformersBackend
from caitool.constitution import load_constitution
from caitool.jsonl_io import read_records
from caitool.label import Comparison, Labeller
from caitool.records import parse_prompt_input

REFUSAL = (
    "I can't help with that. If you are worried about safety, a professional or a helpline can advise you."
)
COMPLIANCE = "Sure. Here is a quick overview of how people usually go about it, step by step."
VERDICT_REQUEST = (
    "Which option is better, A or B? Explain briefly, then finish with 'Answer: A' or 'Answer: B'."
)


def build_comparisons(prompts_path: str, count: int, constitution) -> list[Comparison]:
    records = list(read_records(prompts_path, parse_prompt_input))[:count]
    principles = constitution.comparisons
    return [
        Comparison(
            r.prompt,
            REFUSAL if i % 2 else COMPLIANCE,
            COMPLIANCE if i % 2 else REFUSAL,
            principles[i % len(principles)],
        )
        for i, r in enumerate(records)
    ]


def time_logprob(labeller: Labeller, comparisons: list[Comparison]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    verdicts = labeller.judge(comparisons)
    return time.perf_counter() - start, [v.p for v in verdicts]


def time_generated_verdicts(labeller: Labeller, comparisons: list[Comparison], max_tokens: int):
    """The same questions, answered by generation; returns seconds, parsed letters and tokens written."""
    questions = []
    for comparison in comparisons:
        asked = labeller.question(comparison, swapped=False)
        last = asked[-1].model_copy(update={"content": asked[-1].content + "\n\n" + VERDICT_REQUEST})
        questions.append([*asked[:-1], last])
    params = SamplingParams(temperature=0.0, max_new_tokens=max_tokens)
    start = time.perf_counter()
    samples = labeller.backend.generate(questions, params, seed=0)
    elapsed = time.perf_counter() - start
    letters = [_parse_letter(s[0].text) for s in samples]
    return elapsed, letters, sum(s[0].num_tokens for s in samples)


def _parse_letter(text: str) -> str | None:
    found = re.findall(r"\b([AB])\b", text)
    return found[-1] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", default="examples/red_team.jsonl")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--verdict-tokens", type=int, default=32)
    parser.add_argument("--constitution", default="harmless")
    args = parser.parse_args()

    constitution = load_constitution(args.constitution)
    backend = TransformersBackend.load(args.model, batch_size=args.batch_size)
    labeller = Labeller(backend, constitution, swap=False)
    comparisons = build_comparisons(args.prompts, args.pairs, constitution)
    labeller.judge(comparisons[:1])  # warm-up: first-call allocations are not part of either method

    logprob_seconds, probabilities = time_logprob(labeller, comparisons)
    generate_seconds, letters, tokens = time_generated_verdicts(labeller, comparisons, args.verdict_tokens)
    n = len(comparisons)
    per_logprob, per_generate = logprob_seconds / n, generate_seconds / n
    parsed = sum(letter is not None for letter in letters)
    agree = sum(
        letter is not None and (letter == "A") == (p >= 0.5)
        for letter, p in zip(letters, probabilities, strict=True)
    )
    print(f"model {backend.model_id}, {n} comparisons, batch size {args.batch_size}")
    print(f"log-prob labeller:  {per_logprob:.3f} s per comparison ({logprob_seconds:.1f} s in all)")
    print(
        f"generated verdict:  {per_generate:.3f} s per comparison ({generate_seconds:.1f} s in all, "
        f"{tokens / n:.1f} tokens each, a letter found in {parsed}/{n}, agreeing with log-prob on {agree})"
    )
    print(f"ratio: the log-prob labeller is {per_generate / per_logprob:.1f}x faster per comparison")


if __name__ == "__main__":
    main()
