"""Time the log-prob labeller against asking the same model to write its verdict.

All methods label the same pairs with the same model, the same few-shot turns and the same
multiple-choice question (one option order, no swap), in batches of the same size:

* log-prob: the labeller as ``label-preferences`` runs it: one forward pass per batch reads
  the probabilities of the letters "A" and "B". The few-shot turns' key/value cache is built
  once per run; it is timed separately and shown both included and amortised.
* generated verdict: the model is asked to explain briefly and finish with "Answer: A" or
  "Answer: B", writes until it ends its turn (at most ``--verdict-tokens``), and the letter is
  parsed from its text. It writes whatever it chooses; nothing forces it to be long or short.
* reasoned verdict: ``--mode cot`` (the model reasons step by step, at most
  ``--reasoning-tokens``, then the letters are read after its reasoning), i.e. what a judge
  costs when it thinks aloud.

Prints seconds per comparison, tokens written, agreement with the log-prob letter, and the
speed ratios. By default pairs are built from the example red-team prompts with one short
refusal and one short compliance each; ``--pairs-file`` takes real ``generate -n 2`` output.

    python benchmarks/bench_labeller.py --pairs 16 --model default
    python benchmarks/bench_labeller.py --pairs-file runs/demo/rl/pairs.jsonl --pairs 16
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass

from caitool.backends import SamplingParams
from caitool.backends.local import TransformersBackend
from caitool.constitution import load_constitution
from caitool.jsonl_io import read_records
from caitool.label import Comparison, Labeller, parse_responses_input
from caitool.records import parse_prompt_input

REFUSAL = (
    "I can't help with that. If you are worried about safety, a professional or a helpline can advise you."
)
COMPLIANCE = "Sure. Here is a quick overview of how people usually go about it, step by step."
VERDICT_REQUEST = (
    "Which option is better, A or B? Explain briefly, then finish with 'Answer: A' or 'Answer: B'."
)


@dataclass
class Timing:
    seconds: float
    letters: list[str | None]
    tokens: int


def synthetic_comparisons(prompts_path: str, count: int, constitution) -> list[Comparison]:
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


def sampled_comparisons(pairs_path: str, count: int, constitution) -> list[Comparison]:
    records = list(read_records(pairs_path, parse_responses_input))[:count]
    principles = constitution.comparisons
    return [
        Comparison(r.prompt, r.responses[0], r.responses[1], principles[i % len(principles)])
        for i, r in enumerate(records)
    ]


def time_prefix(backend: TransformersBackend, labeller: Labeller, comparisons: list[Comparison]) -> float:
    """Seconds to build the few-shot turns' cache, which a run builds once."""
    backend._kept_prefix = None
    start = time.perf_counter()
    labeller.judge(comparisons[:2])
    with_prefix = time.perf_counter() - start
    start = time.perf_counter()
    labeller.judge(comparisons[:2])
    return max(with_prefix - (time.perf_counter() - start), 0.0)


def time_logprob(labeller: Labeller, comparisons: list[Comparison]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    verdicts = labeller.judge(comparisons)
    return time.perf_counter() - start, [v.p for v in verdicts]


def time_generated(labeller: Labeller, comparisons: list[Comparison], max_tokens: int) -> Timing:
    """The same questions answered by generation, the letter parsed from the text."""
    conversations = [labeller.question(c, swapped=False) for c in comparisons]
    params = SamplingParams(temperature=0.0, max_new_tokens=max_tokens)
    start = time.perf_counter()
    samples = labeller.backend.generate(conversations, params, seed=0)
    elapsed = time.perf_counter() - start
    return Timing(elapsed, [parse_letter(s[0].text) for s in samples], sum(s[0].num_tokens for s in samples))


def time_reasoned(labeller: Labeller, comparisons: list[Comparison], max_tokens: int) -> Timing:
    """``--mode cot`` as label-preferences runs it: reasoning written, then the letters read after it."""
    cot = Labeller(
        labeller.backend,
        labeller.constitution,
        mode="cot",
        swap=False,
        clamp=None,
        cot_max_new_tokens=max_tokens,
    )
    start = time.perf_counter()
    verdicts = cot.judge(comparisons)
    elapsed = time.perf_counter() - start
    tokens = sum(len(labeller.backend.tokenizer(v.reasoning[0])["input_ids"]) for v in verdicts)
    return Timing(elapsed, ["A" if v.p >= 0.5 else "B" for v in verdicts], tokens)


def parse_letter(text: str) -> str | None:
    found = re.findall(r"\b([AB])\b", text)
    return found[-1] if found else None


def with_verdict_request(labeller: Labeller) -> Labeller:
    """A labeller whose questions also carry the request for an explained verdict."""

    class Asking(Labeller):
        def question(self, comparison, *, swapped):
            asked = super().question(comparison, swapped=swapped)
            last = asked[-1].model_copy(update={"content": asked[-1].content + "\n\n" + VERDICT_REQUEST})
            return [*asked[:-1], last]

    return Asking(labeller.backend, labeller.constitution, swap=False)


def report(name: str, timing: Timing, n: int, probabilities: list[float], per_logprob: float) -> None:
    per = timing.seconds / n
    parsed = sum(letter is not None for letter in timing.letters)
    agree = sum(
        letter is not None and (letter == "A") == (p >= 0.5)
        for letter, p in zip(timing.letters, probabilities, strict=True)
    )
    print(
        f"{name}: {per:.3f} s per comparison ({timing.seconds:.1f} s in all, {timing.tokens / n:.1f} tokens "
        f"written each, a letter found in {parsed}/{n}, agreeing with log-prob on {agree}) "
        f"-> log-prob is {per / per_logprob:.1f}x faster"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", default="examples/red_team.jsonl")
    parser.add_argument("--pairs-file", help="generate -n 2 output to compare instead of synthetic pairs")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--verdict-tokens", type=int, default=64)
    parser.add_argument("--reasoning-tokens", type=int, default=128)
    parser.add_argument("--no-reasoned", action="store_true", help="skip the (slow) reasoned verdict")
    parser.add_argument("--constitution", default="harmless")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (both methods)")
    args = parser.parse_args()

    constitution = load_constitution(args.constitution)
    backend = TransformersBackend.load(args.model, batch_size=args.batch_size, dtype=args.dtype)
    labeller = Labeller(backend, constitution, swap=False)
    if args.pairs_file:
        comparisons = sampled_comparisons(args.pairs_file, args.pairs, constitution)
    else:
        comparisons = synthetic_comparisons(args.prompts, args.pairs, constitution)
    n = len(comparisons)
    asking = with_verdict_request(labeller)
    # Warm-up: first-call allocations belong to neither method.
    time_generated(asking, comparisons[:1], 4)
    prefix_seconds = time_prefix(backend, labeller, comparisons)

    logprob_seconds, probabilities = time_logprob(labeller, comparisons)
    per_logprob = logprob_seconds / n
    per_logprob_cold = (logprob_seconds + prefix_seconds) / n
    tokens = [len(backend.tokenizer(t)["input_ids"]) for t in (c.first + c.second for c in comparisons)]
    print(
        f"model {backend.model_id} ({backend.model.dtype}), {n} comparisons, batch size {args.batch_size}, "
        f"{sum(tokens) / n:.0f} response tokens per pair"
    )
    print(
        f"log-prob labeller: {per_logprob:.3f} s per comparison in a run ({logprob_seconds:.1f} s in all); "
        f"{per_logprob_cold:.3f} s counting the few-shot cache built once per run ({prefix_seconds:.2f} s)"
    )
    verdict = time_generated(asking, comparisons, args.verdict_tokens)
    report("generated verdict", verdict, n, probabilities, per_logprob)
    if not args.no_reasoned:
        reasoned = time_reasoned(labeller, comparisons, args.reasoning_tokens)
        report("reasoned verdict (--mode cot)", reasoned, n, probabilities, per_logprob)
    print(
        f"ratio: the log-prob labeller is {verdict.seconds / n / per_logprob:.1f}x faster per comparison "
        f"than a generated verdict ({verdict.seconds / n / per_logprob_cold:.1f}x counting its one-off cache)"
    )


if __name__ == "__main__":
    main()
