"""Does ``--engine vllm`` read and write what the transformers backend does, on the default model?

Letters: the --pairs comparisons of bench_labeller.py (a refusal against a compliance under a
comparison principle of the harmless constitution) labelled by the ``Labeller`` that
label-preferences runs, through each backend: in logprob mode each comparison is asked in both
option orders (P(A) of each question), in score mode each response alone (P(Yes) of the
question). Printed: the largest and mean absolute difference of those probabilities.

Greedy: the first --prompts prompts of examples/red_team.jsonl and examples/helpful.jsonl (half
each), --new-tokens tokens, temperature 0, through each backend. Printed: how many texts are
identical; for each that is not, the first token where the two differ and the transformers
model's own margin there (log-probability of its top token less that of the token vLLM chose):
a margin near zero means the two tokens were a near-tie that fp32 arithmetic in a different
order (vLLM's CPU attention kernels and batching) can tip either way.

Both backends load the model in float32 on this CPU. Needs vLLM importable (make install-vllm).

    python benchmarks/vllm_parity.py [--pairs 32] [--prompts 64] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_labeller import synthetic_comparisons  # noqa: E402
from caitool.backends import BackendOptions, SamplingParams, load_backend  # noqa: E402
from caitool.constitution import load_constitution  # noqa: E402
from caitool.label import Labeller  # noqa: E402
from caitool.records import Message  # noqa: E402
from caitool.tokens import encode, render_chat  # noqa: E402


def letter_probabilities(backend, comparisons, constitution) -> list[float]:
    """P(first) with the first shown as A, then with it shown as B, for every comparison."""
    verdicts = Labeller(backend, constitution, mode="logprob", clamp=None).judge(comparisons)
    return [v.p_first for v in verdicts] + [v.p_swapped for v in verdicts]


def score_probabilities(backend, comparisons, constitution) -> list[float]:
    """P(Yes) of score mode's question about each response alone (both responses of each pair)."""
    labeller = Labeller(backend, constitution, mode="score")
    prompts = [c.prompt for c in comparisons] * 2
    responses = [c.first for c in comparisons] + [c.second for c in comparisons]
    principles = [c.principle for c in comparisons] * 2
    return [1 / (1 + math.exp(-odds)) for odds, _ in labeller.score_responses(prompts, responses, principles)]


def conversations(count: int) -> list[list[Message]]:
    rows = []
    for name in ("red_team.jsonl", "helpful.jsonl"):
        lines = (REPO / "examples" / name).read_text().splitlines()[: (count + 1) // 2]
        rows += [[Message(role="user", content=json.loads(line)["prompt"])] for line in lines]
    return rows[:count]


def greedy_texts(backend, prompts, new_tokens: int) -> list[str]:
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    return [samples[0].text for samples in backend.generate(prompts, params, seed=0)]


def divergence(reference, prompt, ours: str, theirs: str) -> tuple[int, float]:
    """First differing token of the two responses, and the reference model's margin there:
    log P(its own top token) - log P(the token the other side chose), at that position."""
    import torch

    tokenizer = reference.tokenizer
    mine, other = encode(tokenizer, ours), encode(tokenizer, theirs)
    common = min(len(mine), len(other))
    at = next((i for i in range(common) if mine[i] != other[i]), common)
    if at >= len(other):
        return at, float("nan")  # the other side stopped where this one went on
    context = encode(tokenizer, render_chat(tokenizer, prompt)) + mine[:at]
    with torch.no_grad():
        logits = reference.model(torch.tensor([context], device=reference.device)).logits[0, -1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return at, float(logprobs.max() - logprobs[other[at]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    constitution = load_constitution("harmless")
    comparisons = synthetic_comparisons(str(REPO / "examples" / "red_team.jsonl"), args.pairs, constitution)
    prompts = conversations(args.prompts)

    reference = load_backend("default", BackendOptions(batch_size=16, dtype="float32"))
    engine = load_backend("default", BackendOptions(engine="vllm", concurrency=64, dtype="float32"))
    print(f"transformers: {reference.describe().get('dtype', '')} {reference.model.dtype}")
    print(f"vLLM in-process: {engine.describe()}")

    for what, read in (
        ("letters (logprob, both orders)", letter_probabilities),
        ("score P(Yes)", score_probabilities),
    ):
        want = read(reference, comparisons, constitution)
        got = read(engine, comparisons, constitution)
        gaps = [abs(a - b) for a, b in zip(got, want, strict=True)]
        print(
            f"{what}: {len(gaps)} probabilities, max |diff| {max(gaps):.1e}, "
            f"mean {sum(gaps) / len(gaps):.1e}, "
            f"within 0.02: {sum(g <= 0.02 for g in gaps)}/{len(gaps)}"
        )

    want = greedy_texts(reference, prompts, args.new_tokens)
    got = greedy_texts(engine, prompts, args.new_tokens)
    differing = [i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b]
    print(f"greedy, {args.new_tokens} tokens: {len(prompts) - len(differing)}/{len(prompts)} identical")
    for i in differing:
        at, margin = divergence(reference, prompts[i], want[i], got[i])
        print(f"  prompt {i}: first differs at token {at}; transformers' margin there {margin:.4f} nats")
    engine.close()


if __name__ == "__main__":
    main()
