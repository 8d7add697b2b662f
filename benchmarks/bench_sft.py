"""Time ``caitool sft`` against a plain SFTTrainer script on the same data, model and settings.

Both sides do the same work end to end: load the model and tokenizer, build the
prompt-completion dataset, train with the loss on completion tokens only, and save the
model and tokenizer. caitool additionally validates its input, hashes the base weights
(cached after the first run), writes the manifest and the training log and publishes the
directory atomically; this script measures what that costs.

The data are the first N records of examples/helpful.jsonl, written as revision records
(the helpful answer as the final revision) so ``caitool sft`` accepts them. Heavy imports
happen before either timer starts, and the two runs alternate order across repeats.

    python benchmarks/bench_sft.py                      # default model, 16 examples, 1 epoch
    python benchmarks/bench_sft.py --model PATH --examples 32 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_revision_records(count: int, path: Path, seed: int) -> list[dict]:
    """Revision records whose current response is the helpful answer; returns the TRL examples."""
    from caitool.constitution import load_constitution
    from caitool.records import Message, RevisionRecord, Round, parse_prompt_input

    constitution = load_constitution("harmless")
    principle = constitution.critiques[0]
    lines = (REPO / "examples" / "helpful.jsonl").read_text().splitlines()[:count]
    examples, records = [], []
    for line in lines:
        source = parse_prompt_input(json.loads(line))
        answer = source.response or ""
        round_ = Round(
            principle_id=principle.id,
            critique_request=principle.critique,
            critique="The response is fine.",
            revision_request=principle.revision,
            revision=answer,
        )
        records.append(
            RevisionRecord(
                id=source.id,
                prompt=source.prompt,
                initial_response=answer,
                rounds=[round_],
                completion=[Message(role="assistant", content=answer)],
                constitution=constitution.ref,
                model="bench",
            )
        )
        examples.append(
            {
                "prompt": [m.model_dump() for m in source.prompt],
                "completion": [{"role": "assistant", "content": answer}],
            }
        )
    path.write_text("".join(r.to_json() + "\n" for r in records))
    # caitool shuffles its examples with the run seed; the same order gives both sides the same
    # batches, hence the same padding and the same amount of work.
    random.Random(seed).shuffle(examples)
    return examples


def direct_trl(model_path: str, examples: list[dict], out: Path, args: argparse.Namespace) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = SFTConfig(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        completion_only_loss=True,
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(examples), processing_class=tokenizer
    )
    trainer.train()
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return time.perf_counter() - started


def caitool_sft(data: Path, out: Path, args: argparse.Namespace) -> float:
    from caitool.pipeline import Runtime
    from caitool.sft import SftConfig, run_sft

    config = SftConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length)
    started = time.perf_counter()
    run_sft(data, out, model=args.model, config=config, runtime=Runtime(seed=args.seed))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default", help="'default' or a local model directory")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from caitool.models import force_offline, quiet_transformers, resolve_model_path

    force_offline()
    quiet_transformers()
    import datasets  # noqa: F401 - imported before the timers, like everything heavy
    import torch  # noqa: F401
    import trl  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    datasets.disable_progress_bars()
    model_path = str(resolve_model_path(args.model))
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    try:
        data = work / "revised.jsonl"
        examples = write_revision_records(args.examples, data, args.seed)
        timings: dict[str, list[float]] = {"trl": [], "caitool": []}
        for repeat in range(args.repeats):
            order = ("trl", "caitool") if repeat % 2 == 0 else ("caitool", "trl")
            for side in order:
                out = work / f"{side}-{repeat}"
                if side == "trl":
                    timings[side].append(direct_trl(model_path, examples, out, args))
                else:
                    timings[side].append(caitool_sft(data, out, args))
                print(f"repeat {repeat + 1} {side}: {timings[side][-1]:.1f}s", flush=True)
        direct, ours = min(timings["trl"]), min(timings["caitool"])
        print(
            f"model {args.model}, {len(examples)} examples, {args.epochs:g} epoch(s), "
            f"batch {args.batch_size}: direct SFTTrainer {direct:.1f}s, caitool sft {ours:.1f}s, "
            f"ratio {ours / direct:.3f} (best of {args.repeats})"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
