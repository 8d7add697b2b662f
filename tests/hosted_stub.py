"""Scripted stand-ins for hosted chat APIs, on loopback, for the verdict modes' tests.

Two kinds, both built on :class:`tests.openai_stub.StubOpenAIServer`:

* ``openai``: behaves like OpenAI's API for chat models: 400 on ``continue_final_message`` /
  ``add_generation_prompt`` (no prefill), 404 on ``/v1/completions``, 400 on ``max_tokens``
  (it wants ``max_completion_tokens``), and log-probabilities only of generated tokens
  (``logprobs: true, top_logprobs: N`` on chat completions);
* ``plain``: a chat API that returns no log-probabilities at all (it ignores the fields).

It serves several models. ``judge`` answers caitool's questions: it prefers the response
that contains ``GOOD_MARKER`` (P = ``confidence``), writes "The answer is (A)." or, asked to
reason, a few lines ending in "Answer: (B)"; yes/no questions get "Yes, it is." or "No.".
A question holding ``GARBLE_MARKER`` gets an answer that names no option. Other models
answer plain prompts from ``replies`` (name -> text). Sampled answers (temperature > 0)
follow the request's seed.
"""

from __future__ import annotations

import json
import math
import random
import re
from typing import Any

from tests.openai_stub import StubOpenAIServer

GOOD_MARKER = "kindly"
GARBLE_MARKER = "GARBLE"
MAX_TOKENS_REFUSAL = (
    "Unsupported parameter: 'max_tokens' is not supported with this model. "
    "Use 'max_completion_tokens' instead."
)
TOKEN = re.compile(r"\s*[A-Za-z]+|\s*\S")


class HostedStub(StubOpenAIServer):
    def __init__(
        self, kind: str = "openai", *, confidence: float = 0.9, replies: dict[str, str] | None = None
    ):
        super().__init__(model="judge", owned_by="system")
        self.kind = kind
        self.confidence = confidence
        self.replies = replies or {}

    # -- what the judge thinks ------------------------------------------------------
    def _p_first(self, question: str) -> tuple[float, tuple[str, str], str]:
        """P(first option), the two options' words, and the text to write around the answer."""
        if "Answer Yes or No" in question:
            shown = question.split("Assistant:")[-1]
            p = self.confidence if GOOD_MARKER in shown else 1 - self.confidence
            return p, ("Yes", "No"), "{answer}."
        options = question.split("Options:\n")[-1]
        option_a = options.split("\n(B)")[0]
        p = self.confidence if GOOD_MARKER in option_a else 1 - self.confidence
        if "step by step" in question:
            return p, ("A", "B"), "Response A and response B differ in tone.\nAnswer: ({answer})"
        return p, ("A", "B"), "The answer is ({answer})."

    def _judge_text(
        self, body: dict[str, Any], rng: random.Random
    ) -> tuple[str, list[dict[str, Any]] | None]:
        question = body["messages"][-1]["content"]
        if GARBLE_MARKER in question:
            text = "Both responses have their merits."
            return text, [{"token": t, "logprob": -0.01, "top_logprobs": []} for t in TOKEN.findall(text)]
        p, words, template = self._p_first(question)
        greedy = body.get("temperature", 1.0) == 0.0
        first = p >= 0.5 if greedy else rng.random() < p
        answer, other = words if first else words[::-1]
        chosen_p = p if first else 1 - p
        text = template.format(answer=answer)
        tokens = []
        for token in TOKEN.findall(text):
            if token.strip() == answer:
                variant = token.replace(answer, other)
                top = {token: math.log(chosen_p), variant: math.log(1 - chosen_p), "C": -9.0}
            else:
                top = {token: -0.01}
            tokens.append(
                {
                    "token": token,
                    "logprob": top[token],
                    "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()],
                }
            )
        return text, tokens

    # -- the API -------------------------------------------------------------------
    def _answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        models = ["judge", *self.replies]
        if path == "/v1/models":
            return 200, {"data": [{"id": m, "owned_by": "system"} for m in models]}
        if path != "/v1/chat/completions":
            return 404, {
                "error": {"message": "This is a chat model and not supported in the v1/completions endpoint."}
            }
        if self.kind == "openai":
            for name in ("continue_final_message", "add_generation_prompt"):
                if name in body:
                    return 400, {"error": {"message": f"Unrecognized request argument supplied: {name}"}}
            if "max_tokens" in body:
                return 400, {"error": {"message": MAX_TOKENS_REFUSAL, "param": "max_tokens"}}
        if body.get("model") not in models:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}}
        rng = random.Random(body.get("seed", 0))
        choices = []
        for index in range(body.get("n", 1)):
            if body["model"] == "judge":
                text, tokens = self._judge_text(body, rng)
            else:
                text, tokens = self.replies[body["model"]], None
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            if self.kind == "openai" and body.get("logprobs") and tokens is not None:
                choice["logprobs"] = {"content": tokens}
            choices.append(choice)
        completion_tokens = sum(len(TOKEN.findall(c["message"]["content"])) for c in choices)
        prompt_tokens = len(json.dumps(body["messages"])) // 4
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        return 200, {"choices": choices, "usage": usage}
