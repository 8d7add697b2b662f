"""Does TRL's vLLM colocate mode (``use_vllm=True, vllm_mode="colocate"``) run here?

Two RLOO steps of TRL's own RLOOTrainer on a tiny random chat model (head size 32, which vLLM's
CPU attention takes), rewards from the completion length, generation by vLLM in this process.
Prints "colocate: works" with the step's loss, or the exception that stopped it. CPU or GPU.

With --keep-weights-loadable the engine first gets the setting caitool's ``--use-vllm`` applies
on a CPU (:func:`caitool.backends.vllm_engine.keep_cpu_weights_loadable`): on a CPU where vLLM
packs linear weights at load time (oneDNN, AVX-512 machines), TRL's weight sync fails without it.

    python benchmarks/probe_trl_colocate.py [--keep-weights-loadable]
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.tiny_model import build_tiny_model  # noqa: E402


def main() -> None:
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if "--keep-weights-loadable" in sys.argv[1:]:
        from caitool.backends.vllm_engine import keep_cpu_weights_loadable

        keep_cpu_weights_loadable()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", hidden_size=128)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        prompts = Dataset.from_list(
            [{"prompt": [{"role": "user", "content": f"question {i}"}]} for i in range(4)]
        )
        config = RLOOConfig(
            output_dir=str(Path(tmp) / "out"),
            use_cpu=True,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            num_generations=2,
            max_completion_length=8,
            max_steps=2,  # the second step generates after a weight sync from an updated policy
            report_to="none",
            use_vllm=True,
            vllm_mode="colocate",
            vllm_max_model_length=512,
            vllm_gpu_memory_utilization=0.3,
        )
        try:
            trainer = RLOOTrainer(
                model=model,
                reward_funcs=lambda completions, **_: [float(len(str(c))) for c in completions],
                args=config,
                train_dataset=prompts,
                processing_class=tokenizer,
            )
            result = trainer.train()
            print(f"colocate: works (two steps, mean loss {result.training_loss:.4f})")
        except Exception as error:  # report the reason, whatever it is
            traceback.print_exc()
            print(f"colocate: fails: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
