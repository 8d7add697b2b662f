"""The local backend: a transformers causal LM loaded in this process.

Batches are formed from conversations of similar length (fewer pad tokens), padded on the
left, and each batch is seeded from the call's seed and the batch position, so the same
inputs and seed give the same outputs. Samples are drawn from softmax(logits / T) within
``top_p`` and nothing else, whatever the model's generation config sets (:mod:`caitool.sampling`).
Letter scoring reads the next-token distribution at the end of each prompt (each letter's
token taken in context, as the model would write it there), sharing one key/value cache for
the prompts' common opening (the labeller's few-shot turns) across calls.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from caitool.backends.base import Completion, SamplingParams, TokenLogprobs, derive_seed
from caitool.records import Conversation
from caitool.sampling import plain_generation_config, sample
from caitool.tokens import cut_at_stop, decode, encode, left_padded, next_token_id, render_chat

# Below this many shared tokens a prefix cache saves less than copying it costs.
MIN_SHARED_PREFIX = 32


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens every row starts with, leaving at least one token of each row after them."""
    limit = min(len(r) for r in rows) - 1
    length = 0
    while length < limit and all(r[length] == rows[0][length] for r in rows):
        length += 1
    return max(length, 0)


class TransformersBackend:
    """Batched local generation and scoring with a transformers causal LM."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str,
        batch_size: int = 8,
        device: str = "cpu",
        info: Any = None,
    ):
        from caitool.models import end_of_turn_ids

        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.batch_size = max(1, batch_size)
        self.device = device
        self.info = info
        self.stop_ids = end_of_turn_ids(tokenizer, model)
        # The labeller's few-shot turns open every question of a run; their key/value cache is
        # computed once and kept between calls (the weights of a scoring backend never change).
        self._kept_prefix: tuple[tuple[int, ...], Any] | None = None

    @classmethod
    def load(
        cls,
        spec: str,
        *,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> TransformersBackend:
        from caitool.models import load_causal_lm

        loaded = load_causal_lm(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        return cls(
            loaded.model,
            loaded.tokenizer,
            model_id=loaded.info.short,
            batch_size=batch_size,
            device=loaded.device,
            info=loaded.info,
        )

    @property
    def parallelism(self) -> int:
        return self.batch_size

    def describe(self) -> dict[str, Any]:
        described = asdict(self.info) if self.info is not None else {"model_id": self.model_id}
        return {"backend": "transformers", **described}

    def stats(self) -> dict[str, int]:
        return {}

    # -- generation ------------------------------------------------------------
    def _length_sorted_batches(self, rows: list[list[int]]) -> list[list[int]]:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seed: int
    ) -> list[list[Completion]]:
        import torch

        rows = [encode(self.tokenizer, render_chat(self.tokenizer, c)) for c in conversations]
        pad = self.tokenizer.pad_token_id
        results: list[list[Completion]] = [[] for _ in rows]
        for batch_index, indices in enumerate(self._length_sorted_batches(rows)):
            torch.manual_seed(derive_seed(seed, batch_index))
            input_ids, attention_mask = left_padded([rows[i] for i in indices], pad, self.device)
            # Greedy decoding gives n identical samples, and transformers refuses n > 1 for it.
            copies = 1 if params.greedy else params.n
            config = plain_generation_config(
                self.model,
                temperature=0.0 if params.greedy else params.temperature,
                top_p=params.top_p,
                max_new_tokens=params.max_new_tokens,
                min_new_tokens=params.max_new_tokens if params.ignore_eos else None,
                num_return_sequences=copies,
                eos_token_id=self.stop_ids,
                pad_token_id=pad,
            )
            if params.top_logprobs:  # the raw distribution of every step, as a server reports it
                config.update(output_logits=True, return_dict_in_generate=True)
            with torch.inference_mode():
                output = sample(self.model, input_ids, attention_mask, config)
            sequences = output.sequences if params.top_logprobs else output
            new_tokens = sequences[:, input_ids.shape[1] :]
            for row, tokens in enumerate(new_tokens):
                steps = [step[row] for step in output.logits] if params.top_logprobs else None
                completion = self._completion(tokens.tolist(), steps, params.top_logprobs)
                results[indices[row // copies]].extend([completion] * (params.n // copies))
        return results

    def _completion(self, tokens: list[int], step_logits: Any = None, top: int = 0) -> Completion:
        kept, finished = cut_at_stop(tokens, self.stop_ids, self.tokenizer.pad_token_id)
        return Completion(
            text=decode(self.tokenizer, kept),
            num_tokens=len(kept) + int(finished),
            finished=finished,
            token_logprobs=self._token_logprobs(kept, step_logits, top) if step_logits is not None else None,
        )

    def _token_logprobs(self, kept: list[int], step_logits: Any, top: int) -> tuple[TokenLogprobs, ...]:
        """Each kept token with the ``top`` most likely tokens of its step, by their text (merged)."""
        import torch

        tokens = []
        for token_id, logits in zip(kept, step_logits, strict=False):
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            values, ids = logprobs.topk(top)
            alternatives: dict[str, float] = {}
            for value, alternative in zip(values.tolist(), ids.tolist(), strict=True):
                text = self.tokenizer.decode([alternative])
                known = alternatives.get(text)
                alternatives[text] = (
                    value
                    if known is None
                    else float(torch.logaddexp(torch.tensor(known), torch.tensor(value)))
                )
            tokens.append(
                TokenLogprobs(
                    text=self.tokenizer.decode([token_id]),
                    logprob=float(logprobs[token_id]),
                    top=alternatives,
                )
            )
        return tuple(tokens)

    # -- scoring -----------------------------------------------------------------
    def score_continuations(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[list[float]]:
        """Log-probability of each one-token continuation (an option letter) after each conversation.

        One forward pass per batch of prompts: the next-token distribution at the end of each
        prompt is read directly. Each continuation's token is the one it adds after that prompt's
        text (:func:`caitool.tokens.next_token_id`); one that is not a single token there is refused.
        """
        texts = [render_chat(self.tokenizer, c) for c in conversations]
        rows = [encode(self.tokenizer, t) for t in texts]
        token_ids = [
            [next_token_id(self.tokenizer, text, row, c) for c in continuations]
            for text, row in zip(texts, rows, strict=True)
        ]
        return self._score_next_tokens(rows, token_ids)

    def _score_next_tokens(self, rows: list[list[int]], token_ids: list[list[int]]) -> list[list[float]]:
        """Next-token log-probs of ``token_ids[i]`` at the end of ``rows[i]``.

        Rows that open alike (the labeller's few-shot turns) share one forward pass over their
        common token prefix: its key/value cache is computed once and reused by every batch.
        The rest is left-padded, so only the last position needs the vocabulary-sized output layer.
        """
        import torch

        prefix_cache, shared = self._shared_prefix_cache(rows[0][: shared_prefix_length(rows)])
        scores: list[list[float]] = [[] for _ in rows]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            input_ids, suffix_mask = left_padded(
                [rows[i][shared:] for i in indices], self.tokenizer.pad_token_id, self.device
            )
            positions = shared + (suffix_mask.cumsum(dim=1) - 1).clamp(min=0)
            prefix_mask = torch.ones(len(indices), shared, dtype=suffix_mask.dtype, device=self.device)
            inputs: dict[str, Any] = {
                "input_ids": input_ids,
                "attention_mask": torch.cat([prefix_mask, suffix_mask], dim=1),
                "position_ids": positions,
                "logits_to_keep": 1,
            }
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(indices))
                inputs[self._cache_argument] = cache
            with torch.inference_mode():
                final_logits = self.model(**inputs).logits[:, -1].float()
            logprobs = torch.log_softmax(final_logits, dim=-1)
            for row, i in enumerate(indices):
                scores[i] = logprobs[row, token_ids[i]].tolist()
        return scores

    @property
    def _cache_argument(self) -> str:
        """transformers 5 renamed ``past_key_values`` to ``cache``; use whichever this model takes."""
        import inspect

        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _shared_prefix_cache(self, prefix: list[int]) -> tuple[Any, int]:
        """A key/value cache for the start of ``prefix`` and how many tokens it covers (0: none).

        The cache kept from an earlier call is reused when it covers the start of this one's
        prefix, so a run of labelling chunks computes the few-shot turns once.
        """
        if self._kept_prefix is not None:
            tokens, cache = self._kept_prefix
            if len(tokens) <= len(prefix) and tuple(prefix[: len(tokens)]) == tokens:
                return cache, len(tokens)
        if len(prefix) < MIN_SHARED_PREFIX:
            return None, 0
        cache = self._prefix_cache(prefix)
        self._kept_prefix = (tuple(prefix), cache)
        return cache, len(prefix)

    def _prefix_cache(self, prefix: list[int]) -> Any:
        import torch

        with torch.inference_mode():
            output = self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True)
        return output.past_key_values
