"""The local backend: a transformers causal LM loaded in this process.

Batches are formed from conversations of similar length (fewer pad tokens), padded on the
left, and each batch is seeded from the call's seed and the batch position, so the same
inputs and seed give the same outputs. Samples are drawn from softmax(logits / T) within
``top_p`` and nothing else, whatever the model's generation config sets (:mod:`caitool.sampling`).
Letter scoring reads the next-token distribution at the end of each prompt, sharing one
key/value cache for the prompts' common opening (the labeller's few-shot turns) across calls.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from caitool.backends.base import Completion, SamplingParams, derive_seed
from caitool.records import Conversation
from caitool.sampling import plain_generation_config, sample
from caitool.tokens import cut_at_stop, decode, encode, left_padded, render_chat, right_padded

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
            with torch.inference_mode():
                output = sample(self.model, input_ids, attention_mask, config)
            new_tokens = output[:, input_ids.shape[1] :]
            for row, tokens in enumerate(new_tokens):
                completion = self._completion(tokens.tolist())
                results[indices[row // copies]].extend([completion] * (params.n // copies))
        return results

    def _completion(self, tokens: list[int]) -> Completion:
        kept, finished = cut_at_stop(tokens, self.stop_ids, self.tokenizer.pad_token_id)
        return Completion(
            text=decode(self.tokenizer, kept), num_tokens=len(kept) + int(finished), finished=finished
        )

    # -- scoring -----------------------------------------------------------------
    def score_continuations(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[list[float]]:
        """Log-probability of each continuation after each conversation.

        Single-token continuations (option letters) cost one forward pass per batch of
        prompts: the next-token distribution at the end of each prompt is read directly.
        """
        texts = [render_chat(self.tokenizer, c) for c in conversations]
        cont_ids = [encode(self.tokenizer, c) for c in continuations]
        if all(len(ids) == 1 for ids in cont_ids):
            return self._score_next_tokens(texts, [ids[0] for ids in cont_ids])
        return self._score_sequences(texts, cont_ids)

    def _score_next_tokens(self, texts: list[str], token_ids: list[int]) -> list[list[float]]:
        """Next-token log-probs at the end of each text.

        Texts that open alike (the labeller's few-shot turns) share one forward pass over their
        common token prefix: its key/value cache is computed once and reused by every batch.
        The rest is left-padded, so only the last position needs the vocabulary-sized output layer.
        """
        import torch

        rows = [encode(self.tokenizer, t) for t in texts]
        prefix_cache, shared = self._shared_prefix_cache(rows[0][: shared_prefix_length(rows)])
        scores: list[list[float]] = [[] for _ in texts]
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
            logprobs = torch.log_softmax(final_logits, dim=-1)[:, token_ids]
            for row, i in enumerate(indices):
                scores[i] = logprobs[row].tolist()
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

    def _score_sequences(self, texts: list[str], cont_ids: list[list[int]]) -> list[list[float]]:
        import torch

        scores: list[list[float]] = []
        for text in texts:
            prefix = encode(self.tokenizer, text)
            input_ids, mask = right_padded(
                [prefix + ids for ids in cont_ids], self.tokenizer.pad_token_id, self.device
            )
            with torch.inference_mode():
                logprobs = torch.log_softmax(
                    self.model(input_ids=input_ids, attention_mask=mask).logits.float(), -1
                )
            row_scores = []
            for row, ids in enumerate(cont_ids):
                positions = range(len(prefix) - 1, len(prefix) - 1 + len(ids))
                row_scores.append(
                    sum(logprobs[row, p, t].item() for p, t in zip(positions, ids, strict=True))
                )
            scores.append(row_scores)
        return scores
