"""What caitool samples from: softmax(logits / T), cut to the nucleus ``top_p`` when asked, and
nothing else.

transformers fills every generation option a call leaves unset from the model's
``generation_config.json``, and many chat models ship sampling settings there
(``repetition_penalty``, ``top_k``, ``min_p``, ``typical_p``, ``no_repeat_ngram_size``, a
minimum length...). caitool ignores them in every phase:

* ``ppo`` must: its policy ratio and KL penalty are computed from softmax(logits / T), so a
  rollout drawn from any other distribution makes both wrong.
* ``generate`` (including the ``-n 2`` pairs the reward model learns from), ``critique``,
  ``revise``, ``eval`` and ``label-preferences --mode cot``: the record and the manifest name
  the temperature and ``top_p`` that made an output, and that is then the whole truth; the
  same command gives the same distribution whichever model family it runs on.

Greedy decoding is the plain argmax. Only settings that cannot change which token is drawn
(the special token ids and the cache layout) are taken from the model's config.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

# Generation settings that say how to run, not what to draw.
NEUTRAL_SETTINGS = ("bos_token_id", "decoder_start_token_id", "cache_implementation", "cache_config")


def transformers_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (whose ``generate`` reads that model's config)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def plain_generation_config(
    model: Any,
    *,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int,
    eos_token_id: Sequence[int],
    pad_token_id: int,
    min_new_tokens: int | None = None,
    num_return_sequences: int = 1,
) -> Any:
    """A generation config that draws from softmax(logits / temperature) within ``top_p``
    (greedy when ``temperature`` is 0), whatever the model's own config says."""
    from transformers import GenerationConfig

    own = transformers_model(model).generation_config
    config = GenerationConfig(**{key: getattr(own, key, None) for key in NEUTRAL_SETTINGS})
    sampling = (
        {"do_sample": False}
        if temperature <= 0.0
        else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p}
    )
    config.update(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        num_return_sequences=num_return_sequences,
        eos_token_id=list(eos_token_id),
        pad_token_id=pad_token_id,
        **sampling,
    )
    return config


@contextmanager
def only_this_config(model: Any, config: Any) -> Iterator[None]:
    """Make ``config`` the model's generation config for one call.

    ``generate`` fills whatever a config passed to it leaves unset from the model's own config,
    so passing a clean one is not enough: the model's is swapped out while it runs.
    """
    inner = transformers_model(model)
    own = inner.generation_config
    inner.generation_config = config
    try:
        yield
    finally:
        inner.generation_config = own


def sample(model: Any, input_ids: Any, attention_mask: Any, config: Any) -> Any:
    """``model.generate`` drawing exactly from ``config`` (see :func:`plain_generation_config`)."""
    with only_this_config(model, config):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
