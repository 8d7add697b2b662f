"""The served backend: a model behind an OpenAI-compatible HTTP API (vLLM, SGLang, llama.cpp...).

Generation goes through ``/v1/chat/completions`` (``n``, ``temperature``, ``top_p``,
``max_tokens``, ``seed``, and neutral values for every other sampling field the server would
otherwise fill from the model's generation config); ``finished`` comes from ``finish_reason``
and token counts from the response (vLLM's ``token_ids``) or ``usage``.

Letter scoring on vLLM is exact, as the local backend's: one request per conversation asks for
the log-probabilities of exactly the letters' token ids as the next token
(``logprob_token_ids``, vLLM's OpenAI routes since mid-2026), after checking that each letter is
one token of its own after the prefill (with ``--tokenizer`` by the local tokenizer, otherwise
by vLLM's ``/tokenize``, which renders the prefill with and without each letter and runs no
model, or, on a server without that route, by requests that generate one token each). The
prefill's prefix stays in vLLM's prefix cache. An older vLLM ignores that field; caitool then
appends each letter to the prompt and reads its ``prompt_logprobs``, as exact but recomputing
every prompt in full (labelling 7x slower on the CPU server in benchmarks/bench_engines.py), and
says so once. Other servers are asked for the top ``logprobs``/``top_logprobs`` of one generated
token; a letter is the token whose text is exactly the letter, which is what a model writes
right after "("; vLLM 0.32 reports a SentencePiece "▁A" (the letter after a space) as " A",
another answer that is not counted. (A server that stripped that space would report it as "A",
and the two would be added: see :func:`_top_logprobs`.) A letter missing from those fails that
conversation alone (:class:`~caitool.backends.base.ContinuationsNotScored`), never a guess.

A conversation ending in an assistant turn is a *prefill* (the labeller's "The answer is (").
Servers continue it in one of two ways:

* ``continue_final_message: true`` with ``add_generation_prompt: false`` in the chat request:
  vLLM and SGLang honour these (llama.cpp's server continues a final assistant turn by itself);
* with ``--tokenizer DIR`` the chat template is rendered here, with the model's own
  tokenizer, and its token ids go to ``/v1/completions``: any server with a completions
  endpoint, whatever it does with chat requests. Ids, not text, so that the server adds no
  second BOS to a template that starts with one.

A server that refuses the chat fields (OpenAI's own API answers 400) is reported with a hint
to pass ``--tokenizer``. Requests run ``concurrency`` at a time, spread round-robin over the
replicas, each retried with exponential backoff and jitter on 429, 5xx, time-outs and
connection errors, after at least the wait a ``Retry-After`` header asks for. Hosted APIs get
client-side pacing (``--max-requests-per-minute``, ``--max-tokens-per-minute``), token usage
summed from ``usage`` into the run's stats, ``max_completion_tokens`` where ``max_tokens`` is
refused, and generated tokens' log-probabilities when asked for (:mod:`caitool.backends.hosted`).
The API key is read from the environment variable the user named (``--api-key-env``), else from
``CAITOOL_API_KEY``; ``OPENAI_API_KEY`` is never read unasked, so a hosted API's key does not
reach another server. It is never written to records, manifests, logs or error messages, and a
warning says when it would go over plain http to another machine.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from caitool.backends.base import (
    BackendOptions,
    Completion,
    ContinuationsNotScored,
    SamplingParams,
    ServedSpec,
    derive_seed,
)
from caitool.backends.hosted import (
    RateLimiter,
    Usage,
    estimate_tokens,
    generated_token_logprobs,
    retry_after_seconds,
    wants_max_completion_tokens,
    with_max_completion_tokens,
)
from caitool.errors import CaitoolError
from caitool.records import Conversation, Message
from caitool.tokens import as_dicts, encode, next_token_id, render_chat

RETRIED_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0
# How many top tokens a scoring request asks for: vLLM's default --max-logprobs is 20.
TOP_LOGPROBS = 20
CAITOOL_API_KEY_ENV = "CAITOOL_API_KEY"

# A server fills every sampling field a request leaves out from its own defaults, and vLLM's
# come from the model's generation_config.json (Qwen2.5: top_k 20, repetition_penalty 1.05;
# vLLM applies a repetition penalty even to greedy decoding). Sent explicitly, these make the
# served distribution softmax(logits / T) within top_p, as the record says and as locally.
# The OpenAI API itself refuses unknown fields, so only the standard penalties go to a server
# not known to take the extensions (its own defaults then apply; the manifest says which).
STANDARD_NEUTRAL_SAMPLING: dict[str, Any] = {"presence_penalty": 0.0, "frequency_penalty": 0.0}
EXTENDED_NEUTRAL_SAMPLING: dict[str, dict[str, Any]] = {
    # vLLM and SGLang both read -1 as "no top-k" (vLLM also takes 0).
    "vllm": {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0},
    "sglang": {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0},
    # llama.cpp's server: top_k <= 0 is the whole vocabulary; its penalty is "repeat_penalty".
    "llamacpp": {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "typical_p": 1.0},
}
UNSENT_SAMPLING = ("top_k", "min_p", "repetition_penalty")


class RequestFailed(Exception):
    """One attempt failed; ``retry`` says whether another attempt may succeed."""

    def __init__(self, message: str, *, retry: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retry = retry
        self.retry_after = retry_after


def public_url(url: str) -> str:
    """The URL without any user:password part, fit for manifests and error messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def api_key(variable: str | None) -> str | None:
    """The key from the variable the user named, else from ``CAITOOL_API_KEY``, else none.

    Never ``OPENAI_API_KEY`` unasked: a hosted API's key must not reach whatever server
    ``--base-url`` names.
    """
    if variable:
        secret = os.environ.get(variable)
        if not secret:
            raise CaitoolError(f"--api-key-env {variable}: that environment variable is not set or empty")
        return secret
    return os.environ.get(CAITOOL_API_KEY_ENV) or None


_warned_hosts: set[str] = set()


def warn_plain_http(base_urls: Sequence[str]) -> None:
    """One warning per host (per process) when the key would cross a network unencrypted."""
    for url in base_urls:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme != "http" or _is_loopback(host) or host in _warned_hosts:
            continue
        _warned_hosts.add(host)
        from caitool.progress import print_summary

        print_summary(
            f"warning: the API key is sent unencrypted over plain http to {host}; "
            "use https (or an SSH tunnel to 127.0.0.1) unless this network is trusted"
        )


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def backoff_seconds(attempt: int, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0.5, 1.5) times base * 2^attempt, capped."""
    return min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt) * (0.5 + rng.random())


class ServerClient:
    """JSON over HTTP to a set of replicas: round-robin, retries, time-outs, counters."""

    def __init__(self, base_urls: Sequence[str], options: BackendOptions):
        import httpx

        self.base_urls = list(base_urls)
        self.max_retries = options.max_retries
        self._secret = api_key(options.api_key_env)
        if self._secret:
            warn_plain_http(self.base_urls)
        headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(options.request_timeout, connect=min(10.0, options.request_timeout)),
            limits=httpx.Limits(
                max_connections=options.concurrency, max_keepalive_connections=options.concurrency
            ),
        )
        self._next_replica = itertools.cycle(range(len(self.base_urls)))
        self._lock = threading.Lock()
        self._rng = random.Random()
        self.requests = 0
        self.retried_requests = 0
        self.retries = 0
        self.limiter = RateLimiter(options.max_requests_per_minute, options.max_tokens_per_minute)
        self.usage = Usage()

    def redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _replica(self) -> str:
        with self._lock:
            return self.base_urls[next(self._next_replica)]

    def get(self, base_url: str, path: str) -> Any:
        """One GET to one replica, no retries (start-up checks)."""
        return self._attempt("GET", base_url, path, None)

    def post(self, path: str, body: dict[str, Any], *, at_server_root: bool = False) -> Any:
        """POST to the next replica; retried (on the next replicas) while the failure is transient.

        ``at_server_root`` posts beside the API rather than under it (vLLM's ``/tokenize`` is at
        ``http://host:port/tokenize`` for a base URL ``http://host:port/v1``); such a request runs
        no model, so the rate limits do not count it.
        """
        with self._lock:
            self.requests += 1
        attempt = 0
        while True:
            base_url = self._replica()
            if at_server_root:
                base_url = server_root(base_url)
            else:
                self.limiter.acquire(_request_tokens(body))
            try:
                answer = self._attempt("POST", base_url, path, body)
                self.usage.add(answer)
                return answer
            except RequestFailed as failure:
                if not failure.retry or attempt >= self.max_retries:
                    tries = f" after {attempt + 1} tries" if attempt else ""
                    raise CaitoolError(f"{failure}{tries}") from None
                with self._lock:
                    self.retries += 1
                    self.retried_requests += attempt == 0
                    pause = max(backoff_seconds(attempt, self._rng), failure.retry_after or 0.0)
                time.sleep(pause)
                attempt += 1

    def _attempt(self, method: str, base_url: str, path: str, body: dict[str, Any] | None) -> Any:
        import httpx

        url = f"{base_url}{path}"
        shown = public_url(url)
        try:
            response = self._http.request(method, url, json=body)
        except httpx.TimeoutException:
            raise RequestFailed(f"{shown}: no answer within the request timeout", retry=True) from None
        except httpx.TransportError as error:
            reason = self.redact(str(error)) or type(error).__name__
            raise RequestFailed(f"cannot reach the server at {shown} ({reason})", retry=True) from None
        if response.status_code >= 400:
            message = self.redact(_error_message(response))
            raise RequestFailed(
                f"{shown} answered {response.status_code}: {message}",
                retry=response.status_code in RETRIED_STATUS,
                retry_after=retry_after_seconds(response.headers),
            )
        try:
            return response.json()
        except ValueError:
            raise RequestFailed(f"{shown} answered with something that is not JSON", retry=True) from None

    def close(self) -> None:
        self._http.close()


def server_root(base_url: str) -> str:
    """The server's own address for an OpenAI base URL ending in ``/v1``."""
    return base_url.rstrip("/").removesuffix("/v1")


def _request_tokens(body: dict[str, Any]) -> int:
    """What a request may cost before it is sent: its text, and the most it may generate."""
    most = body.get("max_tokens") or body.get("max_completion_tokens") or 0
    return estimate_tokens(json.dumps(body.get("messages") or body.get("prompt") or "")) + most * body.get(
        "n", 1
    )


def _error_message(response: Any) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text.strip().splitlines()[0][:300] if response.text.strip() else "no message"
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    message = error.get("message", error) if isinstance(error, dict) else error
    return " ".join(str(message).split())[:300]


class OpenAIBackend:
    """Generation and letter scoring through an OpenAI-compatible server."""

    def __init__(
        self,
        served: ServedSpec,
        client: ServerClient,
        *,
        concurrency: int,
        server: dict[str, Any],
        tokenizer: Any = None,
        tokenizer_dir: str | None = None,
    ):
        self.served = served
        self.client = client
        self.parallelism = max(1, concurrency)
        self.server = server
        self.tokenizer = tokenizer
        self.tokenizer_dir = tokenizer_dir
        self.vllm = server.get("owned_by") == "vllm"
        # Whether this vLLM answers logprob_token_ids; None until a scoring request shows it.
        self.letter_ids_honoured: bool | None = None
        # Whether this vLLM's /tokenize finds the letters' ids (no model run, where otherwise two
        # requests a question generate a token each); None until tried, False where it is missing
        # or renders a conversation unlike the chat route.
        self.tokenize_route: bool | None = None if all(_ends_in_v1(u) for u in served.base_urls) else False
        self.max_completion_tokens = False  # set once the API refuses max_tokens
        self.neutral_sampling = neutral_sampling(server.get("owned_by"))
        self.weights_sha256 = _local_weights_hash(server.get("root"))
        root_name = Path(str(server.get("root") or "")).name
        self.model_id = (
            f"{root_name}@{self.weights_sha256[:12]}" if self.weights_sha256 and root_name else served.spec
        )
        self._pool = ThreadPoolExecutor(max_workers=self.parallelism, thread_name_prefix="caitool-request")

    @classmethod
    def connect(cls, served: ServedSpec, options: BackendOptions) -> OpenAIBackend:
        """Check every replica answers and serves the model before any work starts."""
        client = ServerClient(served.base_urls, options)
        descriptions = [_served_model(client, url, served.name) for url in served.base_urls]
        tokenizer = None
        if options.tokenizer:
            from caitool.models import load_tokenizer

            tokenizer = load_tokenizer(options.tokenizer, trust_remote_code=options.trust_remote_code)
        return cls(
            served,
            client,
            concurrency=options.concurrency,
            server=descriptions[0],
            tokenizer=tokenizer,
            tokenizer_dir=options.tokenizer,
        )

    # -- the interface ------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "backend": "openai",
            "spec": self.served.spec,
            "served_model": self.served.name,
            "base_urls": [public_url(u) for u in self.served.base_urls],
            "server": self.server.get("owned_by"),
            "root": self.server.get("root"),
            "max_model_len": self.server.get("max_model_len"),
            "sha256": self.weights_sha256,
            "prefill": (
                f"chat template rendered here ({self.tokenizer_dir}), token ids to /v1/completions"
                if self.tokenizer is not None
                else "continue_final_message"
            ),
            "letter_scoring": self._letter_scoring(),
            "letter_check": self._letter_check(),
            "sampling_sent": self.neutral_sampling,
            "sampling_left_to_server": [
                name for name in UNSENT_SAMPLING if not _sends(self.neutral_sampling, name)
            ],
        }

    def _letter_scoring(self) -> str:
        if not self.vllm:
            return "top_logprobs"
        if self.letter_ids_honoured is False:
            return "prompt_logprobs"
        return "logprob_token_ids (prompt_logprobs if this vLLM ignores them)"

    def _letter_check(self) -> str:
        """How each letter is found to be one token of its own after the prompt."""
        if self.tokenizer is not None:
            return f"local tokenizer ({self.tokenizer_dir})"
        requests = "the prompt with each letter appended, one generated token each"
        if self.tokenize_route is None:
            return f"/tokenize (else {requests})"
        return "/tokenize" if self.tokenize_route else requests

    def stats(self) -> dict[str, int]:
        return {
            "requests": self.client.requests,
            "retried_requests": self.client.retried_requests,
            "retries": self.client.retries,
            **self.client.usage.stats(),
        }

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seed: int
    ) -> list[list[Completion]]:
        # Greedy decoding gives n identical samples: ask once and copy, as the local backend does.
        copies = 1 if params.greedy else params.n
        requests = [
            self._generation_request(c, params, copies, derive_seed(seed, index))
            for index, c in enumerate(conversations)
        ]
        answers = self._run_all(requests)
        results = []
        for answer in answers:
            completions = self._completions(answer, copies)
            results.append([c for c in completions for _ in range(params.n // copies)])
        return results

    def score_continuations(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[list[float]]:
        """Log-probability of each one-token continuation after each conversation.

        On vLLM exactly, as the local backend does: the log-probabilities of the continuations'
        token ids as the next token (``logprob_token_ids``), after checking that each is one token
        of its own there; on a vLLM that ignores that field, each continuation is appended to the
        prompt and read from ``prompt_logprobs``. Elsewhere from the server's top log-probs for the next
        token: a continuation not among them fails that conversation (:class:`ContinuationsNotScored`,
        the others' scores kept), never a guess.
        """
        if self.vllm and self.letter_ids_honoured is not False:
            scores = self._scores_of_letter_ids(conversations, continuations)
            if scores is not None:
                return scores
        if self.vllm and self.tokenizer is not None:
            return self._exact_scores_from_ids(conversations, continuations)
        if self.vllm:
            return self._exact_scores_from_chat(conversations, continuations)
        return self._top_scores(conversations, continuations)

    def _scores_of_letter_ids(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[list[float]] | None:
        """One request per conversation for exactly its letters' log-probabilities as the next
        token; ``None`` when the server ignored ``logprob_token_ids`` (an older vLLM)."""
        if self.tokenizer is not None:
            letter_ids = [self._prompt_and_letter_ids(c, continuations)[1] for c in conversations]
            continued: list[list[list[int]]] = []
        else:
            continued = self._continued_prompt_ids(conversations, continuations)
            letter_ids = [[ids[-1] for ids in row] for row in continued]
        answers = self._run_all(
            [self._letter_request(c, ids) for c, ids in zip(conversations, letter_ids, strict=True)]
        )
        rows = [_requested_logprobs(a, ids) for a, ids in zip(answers, letter_ids, strict=True)]
        if any(row is None for row in rows):
            if self.letter_ids_honoured:
                raise CaitoolError(
                    f"{self._where()} returned no log-probability for a requested option letter"
                )
            self._fall_back_to_prompt_logprobs()
            return None
        self.letter_ids_honoured = True
        if self.tokenizer is None:  # the local tokenizer checked the letters when it found their ids
            for conversation, answer, row in zip(conversations, answers, continued, strict=True):
                served_ids = self._prompt_token_ids(answer)
                if self.tokenize_route and not _one_token_each(served_ids, row):
                    self._stop_using_tokenize()
                    return self._scores_of_letter_ids(conversations, continuations)
                self._check_one_token(conversation, continuations, served_ids, row)
        return [row for row in rows if row is not None]

    def _prompt_and_letter_ids(
        self, conversation: Conversation, continuations: Sequence[str]
    ) -> tuple[list[int], list[int]]:
        """The prompt's ids, rendered here, and each continuation's id after it (checked one token)."""
        text = render_chat(self.tokenizer, conversation)
        ids = encode(self.tokenizer, text)
        return ids, [next_token_id(self.tokenizer, text, ids, c) for c in continuations]

    def _continued_prompt_ids(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[list[list[int]]]:
        """The ids the server renders for each conversation with each continuation appended: from
        vLLM's ``/tokenize`` where the server has it, else from prefix-cached requests that
        generate one token each and read no log-probabilities."""
        if self.tokenize_route is not False:
            tokenized = self._tokenized_continuations(conversations, continuations)
            if tokenized is not None:
                return tokenized
        requests = [
            self._with_conversation(self._exact_body(ids_only=True), _continued(conversation, c))
            for conversation in conversations
            for c in continuations
        ]
        answers = iter(self._run_all(requests))
        return [[self._prompt_token_ids(next(answers)) for _ in continuations] for _ in conversations]

    def _tokenized_continuations(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[list[list[int]]] | None:
        """Through ``/tokenize``: each conversation alone and with each continuation appended,
        each continuation checked to be one token of its own in that rendering; ``None`` where
        the route is missing, or fails the first time it is asked."""
        requests = [
            ("/tokenize", self._tokenize_body(variant))
            for conversation in conversations
            for variant in (conversation, *(_continued(conversation, c) for c in continuations))
        ]
        try:
            answers = self._run_all_once(requests, at_server_root=True)
            ids = iter([_tokenized_ids(answer, self._where()) for answer in answers])
        except CaitoolError as error:
            if self.tokenize_route:  # it answered before: this is the server failing, not the route
                raise
            # A server without the route, or a gateway in front that refuses or mangles it: the
            # chat route serves the same purpose, and a server that is really down fails there.
            self.tokenize_route = False
            if not _missing_route(str(error)):
                self._note_tokenize_dropped(f"/tokenize failed ({error})")
            return None
        self.tokenize_route = True
        continued = []
        for conversation in conversations:
            base = next(ids)
            row = [next(ids) for _ in continuations]
            self._check_one_token(conversation, continuations, base, row)
            continued.append(row)
        return continued

    def _tokenize_body(self, conversation: Conversation) -> dict[str, Any]:
        """vLLM's /tokenize request rendering ``conversation`` as the chat route does."""
        return {
            "model": self.served.name,
            "messages": as_dicts(conversation),
            "add_generation_prompt": True,
            "continue_final_message": False,
            **_prefill_fields(conversation),
        }

    def _stop_using_tokenize(self) -> None:
        self.tokenize_route = False
        self._note_tokenize_dropped("its /tokenize renders a prompt unlike its chat route")

    def _note_tokenize_dropped(self, reason: str) -> None:
        from caitool.progress import print_summary

        print_summary(
            f"note: {self._where()}: {reason}; option letters are checked with requests through "
            "the chat route instead (slower, as exact)"
        )

    def _letter_request(
        self, conversation: Conversation, letter_ids: list[int]
    ) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.served.name,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprob_token_ids": letter_ids,
            "return_tokens_as_token_ids": True,  # keys "token_id:N": ids, not ambiguous texts
            "return_token_ids": True,
        }
        path, body = self._with_conversation(body, conversation)
        body["logprobs"] = 1 if path == "/completions" else True
        return path, body

    def _check_one_token(
        self,
        conversation: Conversation,
        continuations: Sequence[str],
        base: list[int],
        continued: list[list[int]],
    ) -> None:
        """Each continuation, rendered after the prompt by the server, is the prompt plus one token."""
        for continuation, ids in zip(continuations, continued, strict=True):
            if not _one_token_each(base, [ids]):
                raise CaitoolError(
                    f"{continuation!r} written after {_ending(conversation)!r} is not one token of its "
                    f"own for {self.served.spec}'s tokenizer (the prompt went from {len(base)} to "
                    f"{len(ids)} tokens, and its start changed: {ids[: len(base)] != base}); caitool "
                    "reads an option letter as the one next token, so it cannot score with this model"
                )

    def _fall_back_to_prompt_logprobs(self) -> None:
        from caitool.progress import print_summary

        self.letter_ids_honoured = False
        print_summary(
            f"note: {self._where()} ignores logprob_token_ids (a vLLM from before mid-2026): option "
            "letters are scored through prompt_logprobs instead, as exact but without the prefix "
            "cache, so labelling is much slower; a newer vLLM server is faster"
        )

    def _exact_scores_from_ids(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[list[float]]:
        """One request per conversation: the prompt's ids with each continuation's id appended
        (found and checked here, as locally), the prompts batched, ``prompt_logprobs`` read."""
        requests, appended = [], []
        for conversation in conversations:
            ids, letters = self._prompt_and_letter_ids(conversation, continuations)
            appended.append(letters)
            prompts = [[*ids, letter] for letter in letters]
            requests.append(("/completions", {**self._exact_body(), "prompt": prompts}))
        answers = self._run_all(requests)
        scores = []
        for answer, letters in zip(answers, appended, strict=True):
            choices = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != len(letters):
                raise CaitoolError(
                    f"{self._where()} answered {len(choices)} choices for {len(letters)} prompts"
                )
            scores.append(
                [
                    self._last_prompt_logprob(c.get("prompt_logprobs"), letter)
                    for c, letter in zip(choices, letters, strict=True)
                ]
            )
        return scores

    def _exact_scores_from_chat(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[list[float]]:
        """Per conversation, the prompt alone and the prompt with each continuation appended to
        its assistant turn: the ids the server rendered show whether the continuation is one
        token of its own there, and ``prompt_logprobs`` give its log-probability."""
        requests = []
        for conversation in conversations:
            requests.append(self._with_conversation(self._exact_body(ids_only=True), conversation))
            requests += [
                self._with_conversation(self._exact_body(), _continued(conversation, c))
                for c in continuations
            ]
        answers = iter(self._run_all(requests))
        scores = []
        for conversation in conversations:
            base = self._prompt_token_ids(next(answers))
            row = []
            answered = [next(answers) for _ in continuations]
            continued = [self._prompt_token_ids(answer) for answer in answered]
            self._check_one_token(conversation, continuations, base, continued)
            for answer, ids in zip(answered, continued, strict=True):
                row.append(self._last_prompt_logprob(answer.get("prompt_logprobs"), ids[-1]))
            scores.append(row)
        return scores

    def _top_scores(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[list[float]]:
        """From the top log-probs of the next token: a server without ``prompt_logprobs``."""
        if self.tokenizer is not None:  # the one-token check, where the tokenizer is at hand
            for conversation in conversations:
                text = render_chat(self.tokenizer, conversation)
                ids = encode(self.tokenizer, text)
                for continuation in continuations:
                    next_token_id(self.tokenizer, text, ids, continuation)
        requests = [self._scoring_request(c) for c in conversations]
        answers = self._run_all(requests)
        scores: list[list[float] | None] = []
        reasons: dict[int, str] = {}
        for index, answer in enumerate(answers):
            try:
                scores.append(self._letter_logprobs(answer, continuations))
            except CaitoolError as missing:
                scores.append(None)
                reasons[index] = str(missing)
        if reasons:
            raise ContinuationsNotScored(scores, reasons)
        return [row for row in scores if row is not None]

    def _exact_body(self, *, ids_only: bool = False) -> dict[str, Any]:
        """A request reading the prompt (its ids and its tokens' log-probs); it generates one token."""
        body: dict[str, Any] = {"model": self.served.name, "max_tokens": 1, "temperature": 0.0}
        body["return_token_ids"] = True
        if not ids_only:
            body["prompt_logprobs"] = 0  # the prompt's own tokens only
        return body

    def _prompt_token_ids(self, answer: dict[str, Any]) -> list[int]:
        ids = answer.get("prompt_token_ids")
        if ids is None:  # completions put them on the choice
            ids = ((answer.get("choices") or [{}])[0] or {}).get("prompt_token_ids")
        if not isinstance(ids, list):
            raise CaitoolError(f"{self._where()} returned no prompt_token_ids (return_token_ids: true)")
        return ids

    def _last_prompt_logprob(self, prompt_logprobs: Any, token_id: int) -> float:
        """The log-probability vLLM gives the prompt's last token, which is ``token_id``."""
        last = prompt_logprobs[-1] if isinstance(prompt_logprobs, list) and prompt_logprobs else None
        entry = (last or {}).get(str(token_id))
        if not isinstance(entry, dict) or "logprob" not in entry:
            raise CaitoolError(
                f"{self._where()} returned no prompt log-probability for token {token_id} "
                "(the request asked for prompt_logprobs, which vLLM answers)"
            )
        return float(entry["logprob"])

    # -- requests -----------------------------------------------------------------
    def _generation_request(
        self, conversation: Conversation, params: SamplingParams, n: int, seed: int
    ) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.served.name,
            "n": n,
            "max_tokens": params.max_new_tokens,
            "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": 1.0 if params.greedy else params.top_p,
            "seed": seed,
            **self.neutral_sampling,
        }
        if params.ignore_eos:
            body["ignore_eos"] = True  # a vLLM extension; benchmarks only
        if self.vllm:
            body["return_token_ids"] = True  # exact per-sample token counts
        path, body = self._with_conversation(body, conversation)
        if params.top_logprobs and path == "/chat/completions":
            body.update(logprobs=True, top_logprobs=params.top_logprobs)
        return path, body

    def _scoring_request(self, conversation: Conversation) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.served.name, "max_tokens": 1, "temperature": 0.0}
        path, body = self._with_conversation(body, conversation)
        if path == "/completions":
            body["logprobs"] = TOP_LOGPROBS
        else:
            body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        return path, body

    def _with_conversation(
        self, body: dict[str, Any], conversation: Conversation
    ) -> tuple[str, dict[str, Any]]:
        """The endpoint and body carrying the conversation: rendered here, or sent as chat messages."""
        if self.tokenizer is not None:
            return "/completions", {**body, "prompt": self._prompt_ids(conversation)}
        return "/chat/completions", {
            **body,
            "messages": as_dicts(conversation),
            **_prefill_fields(conversation),
        }

    def _prompt_ids(self, conversation: Conversation) -> list[int]:
        """The rendered conversation as token ids, exactly as the local backend encodes it.

        Ids, not text: a completions endpoint tokenizes text with special tokens added (vLLM's
        ``add_special_tokens`` defaults to true there, llama.cpp adds BOS), so a template that
        already starts with BOS (Llama, Gemma, Mistral) would reach the model with two.
        """
        return encode(self.tokenizer, render_chat(self.tokenizer, conversation))

    def _run_all(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Every request; sent again with ``max_completion_tokens`` if the API refuses ``max_tokens``."""
        if self.max_completion_tokens:
            requests = [(path, with_max_completion_tokens(body)) for path, body in requests]
        try:
            return self._run_all_once(requests)
        except CaitoolError as error:
            if self.max_completion_tokens or not wants_max_completion_tokens(str(error)):
                raise
            self.max_completion_tokens = True
            return self._run_all(requests)

    def _run_all_once(
        self, requests: Sequence[tuple[str, dict[str, Any]]], *, at_server_root: bool = False
    ) -> list[Any]:
        """Every request, ``parallelism`` in flight; the first failure cancels the rest and is raised."""
        futures = [
            self._pool.submit(self.client.post, path, body, at_server_root=at_server_root)
            for path, body in requests
        ]
        try:
            return [future.result() for future in futures]
        except BaseException as error:
            for future in futures:
                future.cancel()
            prefilled = any(body.get("continue_final_message") for _, body in requests)
            if isinstance(error, CaitoolError) and prefilled and _refused_request(str(error)):
                raise CaitoolError(
                    f"{error}; this server does not continue a prefilled assistant turn: pass "
                    "--tokenizer MODEL_DIR to render prompts here and use /v1/completions, or, for a "
                    "hosted chat API, label with --mode verdict (the judge answers in its own turn)"
                ) from None
            raise

    # -- answers ------------------------------------------------------------------
    def _completions(self, answer: dict[str, Any], n: int) -> list[Completion]:
        choices = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise CaitoolError(
                f"{self._where()} returned {len(choices)} choices for n={n}; the server does not honour n"
            )
        usage = (answer.get("usage") or {}).get("completion_tokens")
        completions = []
        for index, choice in enumerate(choices):
            text = choice.get("text")
            if text is None:
                text = (choice.get("message") or {}).get("content") or ""
            token_ids = choice.get("token_ids")
            if token_ids is not None:
                tokens = len(token_ids)
            elif usage is not None:
                # Without per-choice ids the total is shared out, so the run's total stays exact.
                tokens = usage // n + (1 if index < usage % n else 0)
            else:
                tokens = 0
            completions.append(
                Completion(
                    text=text.strip(),
                    num_tokens=tokens,
                    finished=choice.get("finish_reason") == "stop",
                    token_logprobs=generated_token_logprobs(choice),
                )
            )
        return completions

    def _letter_logprobs(self, answer: dict[str, Any], letters: Sequence[str]) -> list[float]:
        top = _top_logprobs(answer)
        missing = [letter for letter in letters if letter not in top]
        if missing:
            returned = ", ".join(repr(t) for t in list(top)[:8])
            raise CaitoolError(
                f"{self._where()}: the option letter(s) {', '.join(repr(m) for m in missing)} are not among "
                f"the {len(top)} most likely next tokens the server returned ({returned}...); the model puts "
                "almost no probability on them, so no label can be read (check it with caitool judge-check)"
            )
        return [top[letter] for letter in letters]

    def _where(self) -> str:
        return f"{self.served.spec} at {', '.join(public_url(u) for u in self.served.base_urls)}"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def neutral_sampling(owned_by: Any) -> dict[str, Any]:
    """The sampling fields that switch off what the server would otherwise fill in."""
    return {**STANDARD_NEUTRAL_SAMPLING, **EXTENDED_NEUTRAL_SAMPLING.get(str(owned_by), {})}


def _sends(fields: dict[str, Any], name: str) -> bool:
    return name in fields or (name == "repetition_penalty" and "repeat_penalty" in fields)


def _continued(conversation: Conversation, continuation: str) -> Conversation:
    """The conversation with ``continuation`` written at the start of (or on into) the assistant turn."""
    if conversation and conversation[-1].role == "assistant":
        last = conversation[-1]
        return [*conversation[:-1], Message(role="assistant", content=last.content + continuation)]
    return [*conversation, Message(role="assistant", content=continuation)]


def _prefill_fields(conversation: Conversation) -> dict[str, bool]:
    """The chat fields that make a server continue a final assistant turn (none otherwise)."""
    if conversation and conversation[-1].role == "assistant":
        return {"continue_final_message": True, "add_generation_prompt": False}
    return {}


def _one_token_each(base: list[int], continued: Sequence[list[int]]) -> bool:
    """Whether each rendering is ``base`` with one token appended."""
    return all(len(ids) == len(base) + 1 and ids[: len(base)] == base for ids in continued)


def _ends_in_v1(base_url: str) -> bool:
    return base_url.rstrip("/").endswith("/v1")


def _missing_route(message: str) -> bool:
    return any(f"answered {status}:" in message for status in (404, 405, 501))


def _tokenized_ids(answer: Any, where: str) -> list[int]:
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise CaitoolError(f"{where} answered /tokenize without a list of token ids")
    return tokens


def _ending(conversation: Conversation) -> str:
    return conversation[-1].content[-24:] if conversation else ""


def _refused_request(message: str) -> bool:
    return any(f"answered {status}:" in message for status in (400, 422))


def _requested_logprobs(answer: dict[str, Any], token_ids: Sequence[int]) -> list[float] | None:
    """The next-token log-probability of each of ``token_ids`` (keys ``token_id:N``), or None
    if the answer lacks one: the server did not honour ``logprob_token_ids``."""
    top = _top_logprobs(answer)
    keys = [f"token_id:{t}" for t in token_ids]
    if any(key not in top for key in keys):
        return None
    return [top[key] for key in keys]


def _top_logprobs(answer: dict[str, Any]) -> dict[str, float]:
    """token -> log-probability of the first generated token, from a chat or completions answer.

    Several tokens can decode to the same text (a byte token and a merged one); their
    probabilities are added, since either writes that letter.
    """
    choice = (answer.get("choices") or [{}])[0]
    logprobs = choice.get("logprobs") or {}
    if "content" in logprobs:  # chat completions
        first = (logprobs.get("content") or [{}])[0]
        pairs = [(t["token"], t["logprob"]) for t in first.get("top_logprobs") or []]
    else:  # completions
        pairs = list(((logprobs.get("top_logprobs") or [{}])[0] or {}).items())
    merged: dict[str, float] = {}
    for token, logprob in pairs:
        if token in merged:
            high, low = max(merged[token], logprob), min(merged[token], logprob)
            merged[token] = high + math.log1p(math.exp(low - high))
        else:
            merged[token] = logprob
    return merged


def _served_model(client: ServerClient, base_url: str, name: str) -> dict[str, Any]:
    """The server's description of the model (``/v1/models``), or a one-line error naming the URL."""
    try:
        listing = client.get(base_url, "/models")
    except RequestFailed as failure:
        raise CaitoolError(f"{failure}; start the server first, or check --base-url") from None
    served = {m.get("id"): m for m in listing.get("data", []) if isinstance(m, dict)}
    if name not in served:
        raise CaitoolError(
            f"the server at {public_url(base_url)} does not serve {name!r} "
            f"(it serves: {', '.join(map(str, served)) or 'nothing'})"
        )
    return served[name]


def _local_weights_hash(root: Any) -> str | None:
    """The weights hash of the served model when its directory is visible here (a server on this
    machine or a shared disk), so its records carry the same name@hash as a local run's."""
    if not root or not (Path(str(root)) / "config.json").exists():
        return None
    from caitool.provenance import weights_hash

    digest = weights_hash(str(root))
    return None if digest == "unknown" else digest
