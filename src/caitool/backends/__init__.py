"""Generation backends and the one factory that turns what the user gave into a backend.

A model is named on the command line in one of two ways:

* a local Hugging Face model directory, a LoRA adapter directory, or ``default``: loaded
  into this process with transformers (:mod:`caitool.backends.local`);
* ``openai:NAME``: the model ``NAME`` served by an OpenAI-compatible server (vLLM, SGLang,
  llama.cpp's server...) at ``--base-url`` (repeat it for replicas, used round-robin), or
  with the address in the spec itself: ``openai:NAME@http://host:8000/v1[,http://host2:8000/v1]``
  (:mod:`caitool.backends.served`).

A local model runs with transformers unless ``--engine vllm`` asks for vLLM in this process
(:mod:`caitool.backends.vllm_engine`, installed with ``caitool[vllm]``).

Phases never name a concrete backend: they call :func:`load_backend`.
"""

from __future__ import annotations

from caitool.backends.base import (
    SERVED_PREFIX,
    BackendOptions,
    Completion,
    ContinuationsNotScored,
    GenerationBackend,
    SamplingParams,
    ServedSpec,
    TokenLogprobs,
    derive_seed,
)
from caitool.errors import CaitoolError

__all__ = [
    "BackendOptions",
    "Completion",
    "ContinuationsNotScored",
    "GenerationBackend",
    "SamplingParams",
    "ServedSpec",
    "TokenLogprobs",
    "check_model_spec",
    "derive_seed",
    "load_backend",
    "parse_served_spec",
]


def is_served(spec: str) -> bool:
    return spec.startswith(SERVED_PREFIX)


def parse_served_spec(spec: str, options: BackendOptions) -> ServedSpec | None:
    """``openai:NAME`` (addresses from ``--base-url``) or ``openai:NAME@URL[,URL...]``; None if local."""
    if not is_served(spec):
        return None
    name, _, urls = spec[len(SERVED_PREFIX) :].partition("@")
    if not name:
        raise CaitoolError(f'model "{spec}": name the served model, as in openai:NAME')
    base_urls = tuple(u.strip().rstrip("/") for u in urls.split(",") if u.strip()) or tuple(
        u.rstrip("/") for u in options.base_urls
    )
    if not base_urls:
        raise CaitoolError(
            f'model "{spec}" is served: give the server with --base-url http://HOST:PORT/v1 '
            "(or CAITOOL_BASE_URL, or openai:NAME@URL)"
        )
    for url in base_urls:
        if not url.startswith(("http://", "https://")):
            raise CaitoolError(f'--base-url "{url}" must start with http:// or https://')
    return ServedSpec(name=name, base_urls=base_urls)


def check_local_options(spec: str, options: BackendOptions) -> None:
    from caitool.choices import Engine, check_choice

    check_choice("--engine", options.engine, Engine)
    if options.dtype != "auto" and is_served(spec):
        raise CaitoolError(
            f"--dtype {options.dtype} cannot apply to {spec}: the server chooses its precision"
        )


def check_model_spec(spec: str, options: BackendOptions | None = None) -> None:
    """Fail before any model loads, not after an hour of work, on a mistyped path or missing server URL."""
    options = options or BackendOptions()
    check_local_options(spec, options)
    if parse_served_spec(spec, options) is None:
        from caitool.models import resolve_model_path

        resolve_model_path(spec)


def load_backend(spec: str, options: BackendOptions | None = None) -> GenerationBackend:
    """The backend for a model spec: a served model when it starts with ``openai:``, else a local one
    (run by transformers, or by vLLM under ``--engine vllm``)."""
    options = options or BackendOptions()
    check_local_options(spec, options)
    served = parse_served_spec(spec, options)
    if served is not None:
        from caitool.backends.served import OpenAIBackend

        return OpenAIBackend.connect(served, options)
    if options.engine == "vllm":
        from caitool.backends.vllm_engine import VLLMBackend

        return VLLMBackend.load(spec, options)
    from caitool.backends.local import TransformersBackend

    return TransformersBackend.load(
        spec, batch_size=options.batch_size, dtype=options.dtype, trust_remote_code=options.trust_remote_code
    )
