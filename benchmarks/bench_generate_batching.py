"""Does batching pay? `caitool generate` on the default model at --batch-size 1 and 16.

Same prompts, greedy decoding, exactly --max-new-tokens new tokens per prompt (--ignore-eos),
so both runs do the same work. Throughput is new tokens per second of the generation phase,
as measured and printed by caitool itself (model loading excluded); wall time including the
load is printed too.

    .venv/bin/python benchmarks/bench_generate_batching.py [--prompts 32] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RATE = re.compile(r"\(([\d.]+) rec/s, ([\d.]+) tok/s\)")


def run(prompts: Path, out: Path, batch_size: int, new_tokens: int) -> tuple[float, float]:
    command = [
        sys.executable,
        "-m",
        "caitool",
        "generate",
        str(prompts),
        "-o",
        str(out),
        "--no-resume",
        "--batch-size",
        str(batch_size),
        "--max-new-tokens",
        str(new_tokens),
        "--temperature",
        "0",
        "--ignore-eos",
    ]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    match = RATE.search(finished.stderr)
    if match is None:
        raise SystemExit(f"no throughput in caitool's summary:\n{finished.stderr}")
    return float(match.group(2)), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--source", default=str(REPO / "examples" / "red_team.jsonl"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        lines = Path(args.source).read_text().splitlines()[: args.prompts]
        prompts.write_text("\n".join(lines) + "\n")
        results = {}
        for batch_size in (1, 16):
            results[batch_size] = run(
                prompts, Path(tmp) / f"b{batch_size}.jsonl", batch_size, args.new_tokens
            )
            rate, wall = results[batch_size]
            print(
                f"batch-size {batch_size:>2}: {rate:7.1f} new tokens/s  (wall {wall:.1f}s incl. model load)"
            )
    print(f"prompts {len(lines)}, new tokens each {args.new_tokens}, greedy")
    print(f"speed-up batch 16 / batch 1: {results[16][0] / results[1][0]:.1f}x")


if __name__ == "__main__":
    main()
