"""Memory of a PPO step per policy parameter, for each way ppo can hold its models.

Each configuration runs in a fresh process: the default model as policy, a reward model on the
same backbone (a seeded random head), the demo's rollout size (4 prompts, 64-token responses,
one mini-batch), ``--steps`` PPO steps on CPU. For each it prints

* model state: every tensor the run holds for the four roles (weights, gradients, Adam's two
  moments), counted once each, divided by the policy's parameter count. This is what scales
  with the model;
* peak RSS above the process's RSS before the models were loaded (so Python, torch and
  transformers are left out), per policy parameter: the state plus activations, the
  allocator's slack and everything else a real run holds.

``--dtype bfloat16`` holds the frozen weights in bf16 with autocast, as ppo does on a GPU by
default, so its model-state figure is the one a GPU run would hold. From it the script predicts
the model state of 1B, 7B and 70B policies (with a reward model of the same size) and whether it
fits one 80 GB or one 141 GB GPU; activations come on top (they grow with the batch and
response length, not with the parameter count; gradient checkpointing and --forward-batch-size
keep them small).

    python benchmarks/bench_ppo_memory.py                       # fp32 and bf16, every configuration
    python benchmarks/bench_ppo_memory.py --dtype float32 --steps 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGURATIONS = {
    "full + separate value": {"lora": False, "value_model": "separate"},
    "full + shared value": {"lora": False, "value_model": "shared"},
    "LoRA + separate value": {"lora": True, "value_model": "separate"},
    "LoRA + shared value": {"lora": True, "value_model": "shared"},
}
SIZES = {"1B": 1e9, "7B": 7e9, "70B": 70e9}
GPUS = {"80 GB": 80e9, "141 GB": 141e9}
PROMPTS = "examples/red_team.jsonl"


def make_reward_model(directory: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from caitool.models import load_tokenizer, model_info
    from caitool.reward import prepare_reward_tokenizer

    info = model_info("default")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(info.path, num_labels=1)
    tokenizer = load_tokenizer(info.path)
    prepare_reward_tokenizer(tokenizer, model)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def model_state(trainer) -> dict[str, int]:
    models = [trainer.policy, trainer.value_model, trainer.ref, trainer.reward_model.model]
    parameters = [p for m in models if m is not None for p in m.parameters()]
    moments = [v for state in trainer.optimizer.state.values() for v in state.values() if v.dim() > 0]
    return {
        "weights": tensor_bytes(parameters),
        "gradients": tensor_bytes(p.grad for p in parameters),
        "adam": tensor_bytes(moments),
    }


def policy_parameters(trainer) -> int:
    from caitool.sampling import transformers_model

    policy = transformers_model(trainer.accelerator.unwrap_model(trainer.policy))
    return sum(p.numel() for n, p in policy.named_parameters() if "lora_" not in n)


def run_one(settings: dict, dtype: str, rm_dir: str, steps: int) -> dict:
    """One configuration in this process: state and peak RSS per policy parameter."""
    import resource

    import psutil

    from caitool.jsonl_io import read_records
    from caitool.ppo import PPOConfig, build_trainer, prompt_batches
    from caitool.records import parse_prompt_input

    baseline = psutil.Process().memory_info().rss
    config = PPOConfig(
        batch_size=4, mini_batches=1, response_length=64, lr=1e-5, steps=steps, dtype=dtype, **settings
    )
    trainer, _ = build_trainer(policy="default", reward_model=rm_dir, ref=None, config=config)
    records = list(read_records(PROMPTS, parse_prompt_input))
    seconds = []
    for step, batch in enumerate(prompt_batches(records, config, seed=0), start=1):
        _, metrics = trainer.step([r.prompt for r in batch], seed=step)
        seconds.append(metrics["seconds"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    count = policy_parameters(trainer)
    state = model_state(trainer)
    return {
        "policy_parameters": count,
        "trained_parameters": sum(p.numel() for p in trainer.trainable),
        "state_per_parameter": {k: v / count for k, v in state.items()},
        "peak_rss_gb": peak / 1e9,
        "rss_per_parameter": (peak - baseline) / count,
        "seconds_per_step": seconds,
    }


def child(name: str, dtype: str, rm_dir: str, steps: int) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--one", name, "--dtype", dtype, "--rm", rm_dir, "--steps", str(steps)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if result.returncode != 0:
        raise SystemExit(f"{name} ({dtype}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_tables(results: dict[tuple[str, str], dict]) -> None:
    print("\nmodel state and peak RSS per policy parameter (one PPO step on CPU, default model):")
    columns = ["frozen weights", "weights", "gradients", "Adam", "model state", "peak RSS - start", "s/step"]
    print("| configuration | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for (name, dtype), r in results.items():
        state = r["state_per_parameter"]
        cells = [
            dtype,
            *(f"{state[part]:.1f}" for part in ("weights", "gradients", "adam")),
            f"{sum(state.values()):.1f} B",
            f"{r['rss_per_parameter']:.1f} B ({r['peak_rss_gb']:.2f} GB peak)",
            f"{r['seconds_per_step'][-1]:.1f}",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    gpu_like = {name: r for (name, dtype), r in results.items() if dtype == "bfloat16"}
    if not gpu_like:
        return
    print("\npredicted model state on a GPU (bf16 frozen weights; reward model as large as the policy;")
    print("activations, CUDA context and allocator slack come on top):")
    print("| configuration | " + " | ".join(SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for name, r in gpu_like.items():
        per_parameter = sum(r["state_per_parameter"].values())
        cells = []
        for size in SIZES.values():
            gigabytes = per_parameter * size / 1e9
            fits = [gpu for gpu, capacity in GPUS.items() if per_parameter * size < capacity]
            cells.append(f"{gigabytes:.0f} GB ({'fits ' + ', '.join(fits) if fits else 'fits neither'})")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", action="append", choices=list(CONFIGURATIONS))
    parser.add_argument("--one", choices=list(CONFIGURATIONS), help=argparse.SUPPRESS)
    parser.add_argument("--rm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(CONFIGURATIONS[args.one], args.dtype[0], args.rm, args.steps)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as work:
        rm_dir = str(Path(work) / "rm")
        make_reward_model(Path(rm_dir))
        for dtype in args.dtype or ["float32", "bfloat16"]:
            for name in args.only or CONFIGURATIONS:
                results[(name, dtype)] = child(name, dtype, rm_dir, args.steps)
                r = results[(name, dtype)]
                print(
                    f"{name} ({dtype}): state {sum(r['state_per_parameter'].values()):.1f} B/param, "
                    f"peak RSS {r['peak_rss_gb']:.2f} GB, {r['trained_parameters'] / 1e6:.1f}M trained "
                    f"parameters, {[round(s, 1) for s in r['seconds_per_step']]} s/step",
                    flush=True,
                )
    print_tables(results)


if __name__ == "__main__":
    main()
