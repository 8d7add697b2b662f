"""A small OpenAI-compatible server on loopback for the served backend's unit tests.

It answers ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` from a script:
``reply(request_body) -> text`` decides generated text, ``letters`` the top log-probs of a
one-token scoring request (for vLLM's ``logprob_token_ids``, the log-prob of each requested
token id, unless ``letter_ids=False`` plays a vLLM that ignores that field; for
``prompt_logprobs``, the log-prob of a prompt that ends in that letter), and ``failures`` a
queue of status codes (or ``"stall"``) served before normal answers. Every request body and
its headers are recorded for assertions. Like vLLM, it answers ``/tokenize`` at the server's
root with the ids its chat route renders, unless ``tokenize=False`` plays a server without that
route; ``tokenize_differs`` makes that rendering start with one extra token.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StubOpenAIServer:
    def __init__(
        self,
        *,
        model: str = "stub",
        owned_by: str = "vllm",
        root: str | None = None,
        reply: Callable[[dict[str, Any]], str] | None = None,
        letters: dict[str, float] | Callable[[dict[str, Any]], dict[str, float]] | None = None,
        refuse_fields: tuple[str, ...] = (),
        vocabulary: dict[int, str] | None = None,
        glued: str | None = None,
        letter_ids: bool = True,
        tokenize: bool = True,
        tokenize_differs: bool = False,
        port: int = 0,
    ):
        self.model = model
        self.owned_by = owned_by
        self.root = root
        self.reply = reply or (lambda body: "stub answer")
        self.letters = letters if letters is not None else {"A": -0.5, "B": -1.0, "C": -4.0}
        self.refuse_fields = refuse_fields
        # Exact scoring (vLLM's prompt_logprobs): a prompt's last token gets its letter's log-prob.
        # Token-id prompts are read through ``vocabulary`` (id -> text); chat prompts are
        # tokenized here one character a token, except that ``glued`` at the end is one token.
        self.vocabulary = vocabulary or {}
        self.glued = glued
        self.letter_ids = letter_ids
        self.tokenize = tokenize
        self.tokenize_differs = tokenize_differs
        self.failures: list[int | str] = []
        self.retry_after: str | None = None  # sent as Retry-After with every failure answer
        self.fail_from: int | None = None  # every POST from this one on answers 500 (a dying server)
        self.posts = 0
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> StubOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def posted(self, path: str) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if r["path"] == path]

    # -- answers ------------------------------------------------------------------
    def _answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        refused = [f for f in self.refuse_fields if f in body]
        if refused:
            return 400, {"error": {"message": f"unknown field {refused[0]}", "code": 400}}
        if path == "/v1/models":
            return 200, {"data": [{"id": self.model, "owned_by": self.owned_by, "root": self.root}]}
        if path == "/tokenize":
            return self._tokenize_answer(body)
        if body.get("model") != self.model:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}}
        if body.get("logprob_token_ids") and self.letter_ids:
            return 200, self._letter_ids_answer(path, body)
        if "prompt_logprobs" in body or (body.get("return_token_ids") and body.get("max_tokens") == 1):
            return 200, self._exact_answer(path, body)
        if body.get("max_tokens") == 1 and (body.get("logprobs") or body.get("top_logprobs")):
            return 200, self._scoring_answer(path, body)
        n = body.get("n", 1)
        text = self.reply(body)
        finish = "length" if len(text.split()) >= body.get("max_tokens", 10**6) else "stop"
        if path == "/v1/completions":
            choices = [{"index": i, "text": text, "finish_reason": finish} for i in range(n)]
        else:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                for i in range(n)
            ]
        tokens = len(text.split()) + (finish == "stop")
        return 200, {"choices": choices, "usage": {"completion_tokens": tokens * n}}

    def _tokenize_answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if not self.tokenize:
            return 404, {"detail": "Not Found"}
        ids = [0] * self.tokenize_differs + self.chat_token_ids(body)
        return 200, {"count": len(ids), "max_model_len": 2048, "tokens": ids}

    def chat_token_ids(self, body: dict[str, Any]) -> list[int]:
        # "\n" plays the assistant turn's header, which the generation prompt adds on its own.
        text = "".join("\n" * (m["role"] == "assistant") + m["content"] for m in body["messages"])
        if body.get("add_generation_prompt", True):
            text += "\n"
        ids = [ord(c) for c in text]
        if self.glued and text.endswith(self.glued):
            ids[-len(self.glued) :] = [10**6 + len(self.glued)]
        return ids

    def _letters(self, body: dict[str, Any]) -> dict[str, float]:
        return self.letters(body) if callable(self.letters) else self.letters

    def _prompt_logprobs(
        self, body: dict[str, Any], ids: list[int], text_of: Callable[[int], str]
    ) -> list[Any]:
        logprob = self._letters(body).get(text_of(ids[-1]), -20.0)  # a real server scores any token
        return [None] * (len(ids) - 1) + [{str(ids[-1]): {"logprob": logprob}}]

    def _exact_answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        asked = "prompt_logprobs" in body
        if path == "/v1/completions":
            prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
            choices = [
                {
                    "index": i,
                    "text": "x",
                    "prompt_token_ids": ids,
                    "prompt_logprobs": self._prompt_logprobs(body, ids, self._token_text(path))
                    if asked
                    else None,
                }
                for i, ids in enumerate(prompts)
            ]
            return {"choices": choices}
        ids = self.chat_token_ids(body)
        answer: dict[str, Any] = {
            "choices": [{"index": 0, "message": {"content": "x"}}],
            "prompt_token_ids": ids,
        }
        if asked:
            answer["prompt_logprobs"] = self._prompt_logprobs(body, ids, self._token_text(path))
        return answer

    def _token_text(self, path: str) -> Callable[[int], str]:
        """A token id's text: through ``vocabulary`` for id prompts, one character a token in chat."""
        if path == "/v1/completions":
            return lambda t: self.vocabulary.get(t, "")
        return lambda t: chr(t) if t < 10**6 else ""

    def _letter_ids_answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's answer to ``logprob_token_ids`` with ``return_tokens_as_token_ids``."""
        letters = self._letters(body)
        ids = body["prompt"] if path == "/v1/completions" else self.chat_token_ids(body)
        text_of = self._token_text(path)
        requested = {f"token_id:{t}": letters.get(text_of(t), -20.0) for t in body["logprob_token_ids"]}
        if path == "/v1/completions":
            choice = {
                "index": 0,
                "text": "x",
                "prompt_token_ids": ids,
                "logprobs": {"top_logprobs": [requested]},
            }
            return {"choices": [choice]}
        top = [{"token": token, "logprob": logprob} for token, logprob in requested.items()]
        content = [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]
        choice = {"index": 0, "message": {"content": "x"}, "logprobs": {"content": content}}
        return {"choices": [choice], "prompt_token_ids": ids}

    def _scoring_answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        letters = self._letters(body)
        if path == "/v1/completions":
            logprobs: dict[str, Any] = {"top_logprobs": [dict(letters)]}
        else:
            top = [{"token": t, "logprob": lp} for t, lp in letters.items()]
            logprobs = {"content": [{"token": top[0]["token"], "top_logprobs": top}]}
        return {"choices": [{"index": 0, "message": {"content": "A"}, "logprobs": logprobs}]}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._respond("GET")

            def do_POST(self) -> None:
                self._respond("POST")

            def _respond(self, method: str) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                with stub._lock:
                    stub.requests.append({"path": self.path, "body": body, "time": time.monotonic()})
                    stub.headers.append(dict(self.headers))
                    failure = stub.failures.pop(0) if stub.failures and method == "POST" else None
                    if method == "POST":
                        stub.posts += 1
                        if stub.fail_from is not None and stub.posts >= stub.fail_from:
                            failure = 500
                if failure == "stall":
                    time.sleep(3)
                    return
                if failure is not None:
                    auth = self.headers.get("authorization", "")
                    status, payload = int(failure), {"error": {"message": f"busy (you sent {auth})"}}
                else:
                    status, payload = stub._answer(self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                if failure is not None and stub.retry_after is not None:
                    self.send_header("retry-after", stub.retry_after)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
