"""Same model, two backends: does the vLLM (CPU) server agree with the local transformers backend?

1. Option-letter probabilities: pairs sampled locally (``generate -n 2``) from the first
   --pairs prompts of examples/red_team.jsonl are labelled by ``label-preferences`` through
   both backends (fp32); the largest and mean gaps of P(A) in both option orders are printed.
2. Greedy generation: the first --greedy/2 prompts of examples/red_team.jsonl and of
   examples/helpful.jsonl, --new-tokens tokens, through both backends. Identical answers are
   counted; for each answer that differs the script finds the first token where the two part
   and prints the local model's log-probabilities of both tokens there: a gap near zero is a
   near-tie that different float kernels can break either way.

    .venv/bin/python benchmarks/check_served_agreement.py [--pairs 16] [--greedy 32] [--base-url URL]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from caitool.backends import BackendOptions, SamplingParams  # noqa: E402
from caitool.generate import run_generate  # noqa: E402
from caitool.label import run_label_preferences  # noqa: E402
from caitool.pipeline import Runtime  # noqa: E402
from caitool.records import Message  # noqa: E402
from caitool.tokens import encode, render_chat  # noqa: E402
from tests.vllm_server import default_model_server  # noqa: E402

SERVED = "openai:smol"


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def take(names: list[tuple[str, int]], target: Path) -> Path:
    chosen = []
    for name, count in names:
        chosen += (REPO / "examples" / name).read_text().splitlines()[:count]
    target.write_text("\n".join(chosen) + "\n")
    return target


def letter_gaps(tmp: Path, count: int, served: Runtime) -> list[float]:
    prompts = take([("red_team.jsonl", count)], tmp / "pair-prompts.jsonl")
    pairs = tmp / "pairs.jsonl"
    run_generate(prompts, pairs, params=SamplingParams(n=2, max_new_tokens=48, temperature=1.0))
    run_label_preferences(pairs, tmp / "local.jsonl")
    run_label_preferences(pairs, tmp / "served.jsonl", model=SERVED, runtime=served)
    local, remote = lines(tmp / "local.jsonl"), lines(tmp / "served.jsonl")
    return [abs(a[k] - b[k]) for a, b in zip(local, remote, strict=True) for k in ("p_first", "p_swapped")]


def divergence(backend, prompt: list[dict], local_text: str, served_text: str) -> str:
    """Where two greedy answers part, and how close the local model's two choices were there."""
    import torch

    tokenizer, model = backend.tokenizer, backend.model
    ours, theirs = encode(tokenizer, local_text), encode(tokenizer, served_text)
    common = 0
    while common < min(len(ours), len(theirs)) and ours[common] == theirs[common]:
        common += 1
    if common == min(len(ours), len(theirs)):
        return f"one answer is a prefix of the other ({len(ours)} vs {len(theirs)} tokens)"
    turns = [Message(**m) for m in prompt]
    context = encode(tokenizer, render_chat(tokenizer, turns)) + ours[:common]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([context])).logits[0, -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    mine, other = logprobs[ours[common]].item(), logprobs[theirs[common]].item()
    return (
        f"part at token {common}: local {tokenizer.decode([ours[common]])!r} ({mine:.4f}) vs served "
        f"{tokenizer.decode([theirs[common]])!r} ({other:.4f}), log-prob gap {abs(mine - other):.4f}"
    )


def greedy_agreement(tmp: Path, count: int, new_tokens: int, served: Runtime) -> None:
    from caitool.backends.local import TransformersBackend

    prompts = take([("red_team.jsonl", count // 2), ("helpful.jsonl", count // 2)], tmp / "greedy.jsonl")
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    run_generate(prompts, tmp / "greedy-local.jsonl", params=params)
    run_generate(prompts, tmp / "greedy-served.jsonl", model=SERVED, params=params, runtime=served)
    local, remote = lines(tmp / "greedy-local.jsonl"), lines(tmp / "greedy-served.jsonl")
    differing = [(a, b) for a, b in zip(local, remote, strict=True) if a["responses"] != b["responses"]]
    same = len(local) - len(differing)
    print(f"greedy generation: {same}/{len(local)} answers identical ({new_tokens} new tokens at most)")
    if differing:
        backend = TransformersBackend.load("default")
        for a, b in differing:
            print(f"  {a['id']}: {divergence(backend, a['prompt'], a['responses'][0], b['responses'][0])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--greedy", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--base-url", help="an already running server serving the default model as 'smol'")
    parser.add_argument("--eager", action="store_true", help="start the server with --enforce-eager")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        with default_model_server(args.base_url, tmp, eager=args.eager) as base_url:
            served = Runtime(backend=BackendOptions(base_urls=(base_url,), concurrency=16))
            gaps = letter_gaps(tmp, args.pairs, served)
            print(
                f"option-letter P(A), {len(gaps)} questions ({args.pairs} pairs, both orders): "
                f"largest gap {max(gaps):.2e}, mean gap {sum(gaps) / len(gaps):.2e}"
            )
            greedy_agreement(tmp, args.greedy, args.new_tokens, served)


if __name__ == "__main__":
    main()
