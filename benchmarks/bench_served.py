"""Generation throughput: the local backend, a vLLM (CPU) server through caitool, and the same
requests from a plain HTTP client — is caitool's served path within 5% of the plain client?

Same 64 prompts for every run (the first 32 of examples/red_team.jsonl and of
examples/helpful.jsonl), exactly --new-tokens new tokens each (``ignore_eos``), sampling at
temperature 0.7 with one seed per request. Throughput is generated tokens per wall-clock
second of the generation itself:

* local: ``caitool generate`` in this process at each --local-batch size (best reported);
* caitool -> server: ``caitool generate -m openai:smol`` (the whole phase: validation, requests,
  JSONL output) at concurrency 1 and 32;
* plain client: the same request bodies sent with httpx's asyncio client, a semaphore holding
  the same number in flight, nothing else.

caitool and the plain client alternate, best of --repeats each, so drift on a shared machine
hits both. The server is started here (its venv: ``make vllm-venv``) unless --base-url names
one already serving the default model as ``smol``.

    .venv/bin/python benchmarks/bench_served.py [--new-tokens 64] [--repeats 2] [--base-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from caitool.backends import BackendOptions, SamplingParams, derive_seed  # noqa: E402
from caitool.generate import run_generate  # noqa: E402
from caitool.pipeline import Runtime  # noqa: E402
from caitool.records import parse_prompt_input  # noqa: E402
from caitool.tokens import as_dicts  # noqa: E402
from tests.vllm_server import default_model_server  # noqa: E402

SERVED = "smol"


def write_prompts(path: Path) -> Path:
    lines = []
    for name in ("red_team.jsonl", "helpful.jsonl"):
        lines += (REPO / "examples" / name).read_text().splitlines()[:32]
    path.write_text("\n".join(lines) + "\n")
    return path


def caitool_tokens_per_second(prompts: Path, out: Path, model: str, params: SamplingParams, options) -> float:
    started = time.perf_counter()
    result = run_generate(
        prompts, out, model=model, params=params, runtime=Runtime(backend=options, resume=False)
    )
    return result.tracker.tokens / (time.perf_counter() - started)


def plain_bodies(prompts: Path, params: SamplingParams, concurrency: int) -> list[dict]:
    """The bodies caitool sends for these prompts (same seeds: one chunk holds all 64 prompts
    at concurrency 32; at concurrency 1 the chunks are of 4, so seeds follow the chunks)."""
    records = [parse_prompt_input(json.loads(line)) for line in prompts.read_text().splitlines()]
    chunk = 4 * concurrency
    bodies = []
    for index, record in enumerate(records):
        call_seed = derive_seed(0, index // chunk)
        bodies.append(
            {
                "model": SERVED,
                "messages": as_dicts(record.prompt),
                "n": 1,
                "max_tokens": params.max_new_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "seed": derive_seed(call_seed, index % chunk),
                "ignore_eos": True,
                "return_token_ids": True,
            }
        )
    return bodies


async def plain_client(base_url: str, bodies: list[dict], concurrency: int) -> float:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(body: dict) -> int:
            async with gate:
                answer = await client.post(f"{base_url}/chat/completions", json=body)
                answer.raise_for_status()
                return answer.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(b) for b in bodies)))
        return tokens / (time.perf_counter() - started)


def listed(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--local-batch", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--base-url", help="an already running server serving the default model as 'smol'")
    parser.add_argument("--eager", action="store_true", help="start the server with --enforce-eager")
    args = parser.parse_args()
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=args.new_tokens, ignore_eos=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        prompts = write_prompts(tmp_dir / "prompts.jsonl")
        print(f"64 prompts, {args.new_tokens} new tokens each, fp32, 2-core CPU (shared machine)")
        local = {}
        for batch in args.local_batch:
            options = BackendOptions(batch_size=batch)
            local[batch] = caitool_tokens_per_second(
                prompts, tmp_dir / "local.jsonl", "default", params, options
            )
            print(f"local backend, batch {batch}: {local[batch]:.0f} tok/s")
        best = max(local, key=local.get)
        print(f"local backend at its best batch size ({best}): {local[best]:.0f} tok/s")

        with default_model_server(args.base_url, tmp_dir, eager=args.eager) as base_url:
            for concurrency in args.concurrency:
                options = BackendOptions(base_urls=(base_url,), concurrency=concurrency)
                bodies = plain_bodies(prompts, params, concurrency)
                ours, plain = [], []
                for _ in range(args.repeats):
                    plain.append(asyncio.run(plain_client(base_url, bodies, concurrency)))
                    ours.append(
                        caitool_tokens_per_second(
                            prompts, tmp_dir / "s.jsonl", f"openai:{SERVED}", params, options
                        )
                    )
                runs = f"caitool {listed(ours)}; plain {listed(plain)}"
                print(
                    f"concurrency {concurrency}: caitool -> server {max(ours):.0f} tok/s, plain client "
                    f"{max(plain):.0f} tok/s, ratio {max(ours) / max(plain):.3f} (runs: {runs})"
                )


if __name__ == "__main__":
    main()
