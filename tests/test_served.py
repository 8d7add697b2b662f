"""The served backend against a scripted OpenAI-compatible server on loopback (fast; no model).

The same backend against a real vLLM server is tested in tests/test_served_vllm.py.
"""

import json
import math
import random
import socket
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from caitool.backends import BackendOptions, SamplingParams, load_backend, parse_served_spec
from caitool.backends import served as served_module
from caitool.cli import app
from caitool.errors import CaitoolError
from caitool.jsonl_io import manifest_path, part_path
from caitool.records import Message
from tests.openai_stub import StubOpenAIServer

runner = CliRunner()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(served_module, "BACKOFF_BASE_SECONDS", 0.01)


@pytest.fixture()
def stub():
    with StubOpenAIServer(reply=lambda body: f"answer {body.get('seed')}") as server:
        yield server


def write_prompts(path, count):
    path.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n" for i in range(count))
    )
    return path


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def served(url, *extra):
    return ["-m", "openai:stub", "--base-url", url, *extra]


def test_generate_sends_sampling_options_and_records_the_server(stub, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "g.jsonl"
    result = runner.invoke(
        app,
        ["generate", str(prompts), "-o", str(out), *served(stub.url), "-n", "2", "--temperature", "0.9"]
        + ["--top-p", "0.8", "--max-new-tokens", "20", "--seed", "5"],
    )
    assert result.exit_code == 0, result.output
    bodies = stub.posted("/v1/chat/completions")
    assert len(bodies) == 3
    assert {(b["n"], b["temperature"], b["top_p"], b["max_tokens"]) for b in bodies} == {(2, 0.9, 0.8, 20)}
    assert len({b["seed"] for b in bodies}) == 3  # one derived seed per request
    assert all("continue_final_message" not in b for b in bodies)
    records = lines(out)
    assert [r["id"] for r in records] == ["q0", "q1", "q2"]
    assert all(len(r["responses"]) == 2 and r["finished"] == [True, True] for r in records)
    assert records[0]["model"] == "openai:stub"  # no local weights to hash: the served name
    policy = json.loads(manifest_path(out).read_text())["models"]["policy"]
    assert policy["backend"] == "openai" and policy["base_urls"] == [stub.url]
    assert policy["served_model"] == "stub" and policy["server"] == "vllm"
    shown = runner.invoke(app, ["inspect", str(out), "-n", "0"], terminal_width=200).output
    assert f"model policy: openai:stub served at {stub.url}" in shown


NEUTRAL = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0}


@pytest.mark.parametrize("greedy", [True, False])
def test_generation_switches_off_the_sampling_settings_the_server_would_fill_in(stub, tmp_path, greedy):
    """vLLM fills every field a request leaves out from the model's generation_config.json
    (Qwen2.5: top_k 20, repetition_penalty 1.05, applied even to greedy decoding)."""
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "g.jsonl"
    temperature = "0" if greedy else "0.9"
    result = runner.invoke(
        app, ["generate", str(prompts), "-o", str(out), *served(stub.url, "--temperature", temperature)]
    )
    assert result.exit_code == 0, result.output
    for body in stub.posted("/v1/chat/completions"):
        assert {k: body.get(k) for k in NEUTRAL} == NEUTRAL and body["frequency_penalty"] == 0.0
    policy = json.loads(manifest_path(out).read_text())["models"]["policy"]
    assert policy["sampling_sent"]["repetition_penalty"] == 1.0 and policy["sampling_left_to_server"] == []


def test_a_server_not_known_to_take_the_extensions_gets_the_standard_fields_and_the_manifest_says(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    out = tmp_path / "g.jsonl"
    with StubOpenAIServer(owned_by="openai") as stub:
        result = runner.invoke(app, ["generate", str(prompts), "-o", str(out), *served(stub.url)])
    assert result.exit_code == 0, result.output
    (body,) = stub.posted("/v1/chat/completions")
    assert body["presence_penalty"] == 0.0 and body["frequency_penalty"] == 0.0
    assert not {"top_k", "min_p", "repetition_penalty"} & set(body)
    policy = json.loads(manifest_path(out).read_text())["models"]["policy"]
    assert policy["sampling_left_to_server"] == ["top_k", "min_p", "repetition_penalty"]


def test_llama_cpp_gets_its_own_name_for_the_repetition_penalty():
    fields = served_module.neutral_sampling("llamacpp")
    assert fields["repeat_penalty"] == 1.0 and "repetition_penalty" not in fields
    assert fields["top_k"] == 0 and fields["min_p"] == 0.0  # llama.cpp: top_k <= 0 is the whole vocabulary


def test_same_seed_same_requests(stub, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    for name in ("a", "b"):
        runner.invoke(
            app, ["generate", str(prompts), "-o", str(tmp_path / f"{name}.jsonl"), *served(stub.url)]
        )
    bodies = stub.posted("/v1/chat/completions")
    assert sorted(b["seed"] for b in bodies[:2]) == sorted(b["seed"] for b in bodies[2:])
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_finished_and_token_counts_come_from_the_answer(tmp_path):
    with StubOpenAIServer(reply=lambda body: "one two three four five six") as stub:
        backend = load_backend("openai:stub", BackendOptions(base_urls=(stub.url,)))
        cut, whole = (
            backend.generate(
                [[Message(role="user", content="hi")]] * 2, SamplingParams(max_new_tokens=6), seed=0
            )[0][0],
            backend.generate([[Message(role="user", content="hi")]], SamplingParams(), seed=0)[0][0],
        )
    assert not cut.finished and cut.num_tokens == 6
    assert whole.finished and whole.num_tokens == 7  # the end-of-turn token counts, as locally


def test_greedy_asks_once_and_copies(stub):
    backend = load_backend("openai:stub", BackendOptions(base_urls=(stub.url,)))
    samples = backend.generate([[Message(role="user", content="hi")]], SamplingParams(temperature=0, n=3), 0)
    assert len(samples[0]) == 3 and len({s.text for s in samples[0]}) == 1
    assert stub.posted("/v1/chat/completions")[0]["n"] == 1


def test_a_prefilled_assistant_turn_is_continued(stub):
    backend = load_backend("openai:stub", BackendOptions(base_urls=(stub.url,)))
    prefill = [
        Message(role="user", content="Pick one."),
        Message(role="assistant", content="The answer is ("),
    ]
    backend.generate([prefill], SamplingParams(max_new_tokens=3), seed=0)
    body = stub.posted("/v1/chat/completions")[0]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["messages"][-1] == {"role": "assistant", "content": "The answer is ("}


def test_a_letter_is_only_the_token_written_as_that_exact_text():
    """After "(" the model writes "A"; "▁A" is " A" (vLLM restores the space a SentencePiece
    tokenizer's decode strips) and is another answer, never added to the letter's probability."""
    top = [
        {"token": "A", "logprob": -0.5},
        {"token": " A", "logprob": -0.7},
        {"token": "▁A", "logprob": -0.8},
        {"token": "B", "logprob": -1.0},
    ]
    answer = {"choices": [{"logprobs": {"content": [{"token": "A", "top_logprobs": top}]}}]}
    read = served_module._top_logprobs(answer)
    assert (read["A"], read["B"]) == (-0.5, -1.0)


PREFILL = [Message(role="user", content="Pick."), Message(role="assistant", content="The answer is (")]


def test_without_prompt_logprobs_letters_are_read_from_the_top_logprobs():
    with StubOpenAIServer(owned_by="sglang") as stub:
        backend = load_backend("openai:stub", BackendOptions(base_urls=(stub.url,)))
        assert backend.score_continuations([PREFILL], ["A", "B"]) == [[-0.5, -1.0]]
    (body,) = stub.posted("/v1/chat/completions")
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20


def test_on_vllm_letters_are_scored_exactly_even_outside_the_top_20():
    """vLLM's /tokenize renders the prefill with and without each letter, which shows that each
    is one token of its own without running the model; one request then asks for exactly those
    ids' log-probabilities as the next token (logprob_token_ids), so the prefill stays in vLLM's
    prefix cache."""
    with StubOpenAIServer(letters={"A": -0.1, "C": -3.0}) as stub:  # "B" is in no top-k list
        backend = load_backend("openai:stub", BackendOptions(base_urls=(stub.url,)))
        assert backend.score_continuations([PREFILL], ["A", "B"]) == [[-0.1, -20.0]]
    tokenized = sorted(stub.posted("/tokenize"), key=lambda b: b["messages"][-1]["content"])
    assert [b["messages"][-1]["content"] for b in tokenized] == ["The answer is ("] + [
        "The answer is (A",
        "The answer is (B",
    ]
    assert all(b["continue_final_message"] and not b["add_generation_prompt"] for b in tokenized)
    [scoring] = stub.posted("/v1/chat/completions")
    assert scoring["messages"][-1]["content"] == "The answer is (" and scoring["continue_final_message"]
    assert not any(key in scoring for key in ("prompt_logprobs", "top_logprobs"))
    assert scoring["logprob_token_ids"] == [ord("A"), ord("B")] and scoring["logprobs"] is True
    assert scoring["return_tokens_as_token_ids"] and scoring["max_tokens"] == 1
    assert backend.describe()["letter_scoring"].startswith("logprob_token_ids")
    assert backend.describe()["letter_check"] == "/tokenize"


def test_a_question_without_a_prefill_is_tokenized_with_the_generation_prompt():
    with StubOpenAIServer(letters={"A": -0.1, "B": -2.0}) as stub:
        backend = load_backend("openai:stub", BackendOptions(base_urls=(stub.url,)))
        question = [Message(role="user", content="Pick.")]
        assert backend.score_continuations([question], ["A", "B"]) == [[-0.1, -2.0]]
    bodies = stub.posted("/tokenize")
    alone = [b for b in bodies if len(b["messages"]) == 1]
    assert len(alone) == 1 and alone[0]["add_generation_prompt"] and not alone[0]["continue_final_message"]
    assert sorted(b["messages"][-1]["content"] for b in bodies if len(b["messages"]) == 2) == ["A", "B"]


def test_without_tokenize_the_letters_are_checked_through_one_token_requests():
    """A server with no /tokenize (an older vLLM, a router): the prefill with each letter appended
    goes through the chat route, generating one token, and its rendered ids are read instead."""
    with StubOpenAIServer(letters={"A": -0.1, "C": -3.0}, tokenize=False) as stub:
        backend = load_backend("openai:stub", BackendOptions(base_urls=(stub.url,)))
        assert backend.score_continuations([PREFILL], ["A", "B"]) == [[-0.1, -20.0]]
        assert backend.score_continuations([PREFILL], ["A", "B"]) == [[-0.1, -20.0]]
    assert len(stub.posted("/tokenize")) <= 3  # the first question's (in flight together), no more
    bodies = sorted(stub.posted("/v1/chat/completions"), key=lambda b: b["messages"][-1]["content"])
    assert [b["messages"][-1]["content"] for b in bodies] == ["The answer is ("] * 2 + [
        "The answer is (A"
    ] * 2 + ["The answer is (B"] * 2
    assert all(b["continue_final_message"] and b["return_token_ids"] for b in bodies)
    assert backend.describe()["letter_check"].startswith("the prompt with each letter appended")


def test_a_gateway_refusing_tokenize_falls_back_to_the_chat_route_with_a_note(capsys):
    """Behind a gateway that answers /tokenize with something other than "not found" (403 here),
    the letters are still scored, through the chat route, and the reason is shown once."""
    with StubOpenAIServer(letters={"A": -0.1, "C": -3.0}) as stub:
        stub.failures = [403]  # the first POST, the first /tokenize request
        backend = load_backend("openai:stub", BackendOptions(base_urls=(stub.url,), max_retries=0))
        assert backend.score_continuations([PREFILL], ["A", "B"]) == [[-0.1, -20.0]]
        assert backend.score_continuations([PREFILL], ["A", "B"]) == [[-0.1, -20.0]]
    shown = capsys.readouterr().err
    assert shown.count("/tokenize failed") == 1 and "answered 403" in shown
    assert len(stub.posted("/v1/chat/completions")) == 6


def test_a_tokenize_route_rendering_unlike_the_chat_route_is_dropped_with_a_note(capsys):
    """/tokenize checks the letters against its own rendering; if the chat route then renders the
    prompt otherwise (a server-side template setting), its ids are not trusted and the letters are
    checked through the chat route itself, for this question and every later one."""
    with StubOpenAIServer(letters={"A": -0.1, "C": -3.0}, tokenize_differs=True) as stub:
        backend = load_backend("openai:stub", BackendOptions(base_urls=(stub.url,)))
        assert backend.score_continuations([PREFILL], ["A", "B"]) == [[-0.1, -20.0]]
        assert backend.score_continuations([PREFILL], ["A", "B"]) == [[-0.1, -20.0]]
    assert len(stub.posted("/tokenize")) == 3  # the first question only
    assert capsys.readouterr().err.count("its /tokenize renders a prompt unlike its chat route") == 1
    assert backend.describe()["letter_check"].startswith("the prompt with each letter appended")


def test_tokenize_reaches_the_server_root_through_a_retrying_proxy():
    """/tokenize requests are retried like the others: a 500 on the first is not a missing route."""
    from tests.fault_proxy import FaultProxy

    with (
        StubOpenAIServer(letters={"A": -0.1, "B": -2.0}) as stub,
        FaultProxy(stub.url, every=1, faults=(500,), max_faults_per_body=1) as proxy,
    ):
        backend = load_backend("openai:stub", BackendOptions(base_urls=(proxy.url,)))
        assert backend.score_continuations([PREFILL], ["A", "B"]) == [[-0.1, -2.0]]
    assert len(stub.posted("/tokenize")) == 3 and 500 in proxy.injected
    assert backend.describe()["letter_check"] == "/tokenize"


def test_tokenize_is_posted_at_the_server_root_and_only_beside_a_v1_base_url():
    assert served_module.server_root("http://h:8000/v1/") == "http://h:8000"
    assert served_module.server_root("https://h/serve/v1") == "https://h/serve"
    elsewhere = BackendOptions(base_urls=("http://h:8000/openai",))
    client = served_module.ServerClient(elsewhere.base_urls, elsewhere)
    backend = served_module.OpenAIBackend(
        parse_served_spec("openai:m", elsewhere), client, concurrency=1, server={"owned_by": "vllm"}
    )
    assert backend.describe()["letter_check"].startswith("the prompt with each letter appended")
    client.close()


def test_a_letter_missing_from_the_top_logprobs_fails_that_record_and_keeps_the_others(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"id": "x", "prompt": "q", "responses": ["fine", "also fine"]})
        + "\n"
        + json.dumps({"id": "y", "prompt": "q", "responses": ["weird", "stranger"]})
        + "\n"
    )

    def letters(body):
        asked = body["messages"][-2]["content"]
        return {"A": -0.1, "C": -3.0} if "stranger" in asked else {"A": -0.5, "B": -1.0}

    out = tmp_path / "o.jsonl"
    with StubOpenAIServer(owned_by="sglang", letters=letters) as stub:
        result = runner.invoke(app, ["label-preferences", str(pairs), "-o", str(out), *served(stub.url)])
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in lines(out)] == ["x"]
    assert "warning: record 'y' left unlabelled:" in result.output
    assert "'B' are not among the 2 most likely next tokens" in result.output
    assert "unlabelled pairs: 1" in result.output
    assert json.loads(manifest_path(out).read_text())["counts"]["unlabelled"] == 1


def test_top_logprob_failures_name_each_conversation_and_score_none_for_it():
    with StubOpenAIServer(owned_by="sglang", letters={"A": -0.1}) as stub:
        backend = load_backend("openai:stub", BackendOptions(base_urls=(stub.url,)))
        with pytest.raises(served_module.ContinuationsNotScored, match="'B' are not among") as raised:
            backend.score_continuations([PREFILL, PREFILL], ["A", "B"])
    assert raised.value.scores == [None, None] and set(raised.value.reasons) == {0, 1}


def test_label_preferences_through_a_served_judge(stub, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "x", "prompt": "q", "responses": ["a", "b"]}) + "\n")
    out = tmp_path / "prefs.jsonl"
    result = runner.invoke(app, ["label-preferences", str(pairs), "-o", str(out), *served(stub.url)])
    assert result.exit_code == 0, result.output
    (record,) = lines(out)
    assert record["p_first"] == pytest.approx(1 / (1 + math.exp(-0.5)))  # softmax over -0.5 and -1.0
    assert record["feedback_model"] == "openai:stub"
    feedback = json.loads(manifest_path(out).read_text())["models"]["feedback"]
    assert feedback["backend"] == "openai"


def test_transient_failures_are_retried_and_counted(stub, tmp_path):
    stub.failures = [429, 500, 503, "stall"]
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "g.jsonl"
    result = runner.invoke(
        app,
        [
            "generate",
            str(prompts),
            "-o",
            str(out),
            *served(stub.url, "--request-timeout", "1", "--concurrency", "1"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(lines(out)) == 3
    counts = json.loads(manifest_path(out).read_text())["counts"]
    assert counts["retries"] == 4 and counts["requests"] == 3
    assert f"retried requests: {counts['retried_requests']}" in result.output


def test_a_server_that_is_down_gives_one_line_naming_it(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    result = runner.invoke(
        app,
        ["generate", str(prompts), "-o", str(tmp_path / "g.jsonl"), *served(f"http://127.0.0.1:{port}/v1")],
    )
    assert result.exit_code == 2
    assert result.output.startswith(f"error: cannot reach the server at http://127.0.0.1:{port}/v1/models")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "g.jsonl").exists() and not part_path(tmp_path / "g.jsonl").exists()


def test_a_server_dying_mid_run_keeps_finished_records_and_the_rerun_resumes(stub, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 10)
    out = tmp_path / "g.jsonl"
    command = [
        "generate",
        str(prompts),
        "-o",
        str(out),
        *served(stub.url, "--concurrency", "1", "--max-retries", "1"),
    ]
    stub.fail_from = 5  # the first chunk (4 records) is answered, then every request fails
    result = runner.invoke(app, command)
    assert result.exit_code == 2 and "answered 500" in result.output and "after 2 tries" in result.output
    assert not out.exists()
    assert [r["id"] for r in lines(part_path(out))] == ["q0", "q1", "q2", "q3"]
    stub.fail_from = None
    stub.requests.clear()
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in lines(out)] == [f"q{i}" for i in range(10)]
    asked = {b["messages"][-1]["content"] for b in stub.posted("/v1/chat/completions")}
    assert asked == {f"question {i}" for i in range(4, 10)}  # only the missing records


def test_the_api_key_is_sent_but_never_written(stub, tmp_path, monkeypatch):
    secret = "sk-do-not-leak-4242"
    monkeypatch.setenv("CAITOOL_TEST_KEY", secret)
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "g.jsonl"
    key_option = ["--api-key-env", "CAITOOL_TEST_KEY"]
    assert (
        runner.invoke(
            app, ["generate", str(prompts), "-o", str(out), *served(stub.url, *key_option)]
        ).exit_code
        == 0
    )
    assert stub.headers[-1]["Authorization"] == f"Bearer {secret}"
    stub.failures = [401]  # the stub echoes the Authorization header in its error message
    failed = runner.invoke(
        app, ["generate", str(prompts), "-o", str(tmp_path / "f.jsonl"), *served(stub.url, *key_option)]
    )
    assert failed.exit_code == 2 and "Bearer ***" in failed.output
    written = out.read_text() + manifest_path(out).read_text() + failed.output
    assert secret not in written


def test_a_hosted_apis_key_is_not_sent_unless_asked_for(stub, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-hosted-api-key")
    monkeypatch.delenv("CAITOOL_API_KEY", raising=False)
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    result = runner.invoke(
        app, ["generate", str(prompts), "-o", str(tmp_path / "g.jsonl"), *served(stub.url)]
    )
    assert result.exit_code == 0, result.output
    assert all("authorization" not in {k.lower() for k in h} for h in stub.headers)

    monkeypatch.setenv("CAITOOL_API_KEY", "sk-for-this-server")
    result = runner.invoke(
        app, ["generate", str(prompts), "-o", str(tmp_path / "h.jsonl"), *served(stub.url)]
    )
    assert result.exit_code == 0, result.output
    assert stub.headers[-1]["Authorization"] == "Bearer sk-for-this-server"

    result = runner.invoke(
        app,
        ["generate", str(prompts), "-o", str(tmp_path / "i.jsonl"), *served(stub.url)]
        + ["--api-key-env", "OPENAI_API_KEY"],
    )
    assert result.exit_code == 0, result.output
    assert stub.headers[-1]["Authorization"] == "Bearer sk-hosted-api-key"  # named: sent


def test_a_named_key_variable_that_is_not_set_is_an_error(stub, tmp_path, monkeypatch):
    monkeypatch.delenv("CAITOOL_UNSET_KEY", raising=False)
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    result = runner.invoke(
        app,
        ["generate", str(prompts), "-o", str(tmp_path / "g.jsonl"), *served(stub.url)]
        + ["--api-key-env", "CAITOOL_UNSET_KEY"],
    )
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == "error: --api-key-env CAITOOL_UNSET_KEY: that environment variable is not set or empty"
    )


def test_a_key_over_plain_http_to_another_machine_is_warned_about_once(monkeypatch):
    warnings = []
    monkeypatch.setattr("caitool.progress.print_summary", warnings.append)
    monkeypatch.setattr(served_module, "_warned_hosts", set())
    monkeypatch.setenv("CAITOOL_API_KEY", "sk-secret")
    remote = ("http://10.0.0.7:8000/v1", "http://10.0.0.7:8001/v1")
    for urls in [
        remote,
        remote,
        ("http://127.0.0.1:8000/v1", "http://localhost:1/v1", "https://gpu.example/v1"),
    ]:
        served_module.ServerClient(urls, BackendOptions()).close()
    assert len(warnings) == 1 and "plain http to 10.0.0.7" in warnings[0] and "sk-secret" not in warnings[0]
    monkeypatch.delenv("CAITOOL_API_KEY")
    served_module.ServerClient(("http://10.0.0.8:8000/v1",), BackendOptions()).close()  # no key: no warning
    assert len(warnings) == 1


def test_replicas_share_the_requests_round_robin(tmp_path):
    with StubOpenAIServer() as first, StubOpenAIServer() as second:
        prompts = write_prompts(tmp_path / "p.jsonl", 6)
        result = runner.invoke(
            app,
            [
                "generate",
                str(prompts),
                "-o",
                str(tmp_path / "g.jsonl"),
                *served(first.url, "--base-url", second.url),
            ],
        )
        assert result.exit_code == 0, result.output
        assert len(first.posted("/v1/chat/completions")) == len(second.posted("/v1/chat/completions")) == 3


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tmp_path_factory):
    """A tiny Llama-style tokenizer whose chat template starts with BOS, as Llama, Gemma, Mistral's do."""
    from tests.tiny_model import FAMILIES, _family_tokenizer, with_bos_added

    directory = tmp_path_factory.mktemp("llama-tokenizer")
    with_bos_added(_family_tokenizer(FAMILIES["llama"])).save_pretrained(directory)
    return directory


def test_a_local_tokenizer_sends_token_ids_with_the_templates_one_bos(stub, bos_tokenizer_dir):
    from caitool.models import load_tokenizer
    from caitool.tokens import render_chat

    tokenizer = load_tokenizer(bos_tokenizer_dir)
    conversation = [Message(role="user", content="How do I bake bread?")]
    text = render_chat(tokenizer, conversation)
    bos = tokenizer.bos_token_id
    # The premise: this text, tokenized the way a completions endpoint does by default, has two.
    assert tokenizer(text)["input_ids"][:2] == [bos, bos]

    backend = load_backend(
        "openai:stub", BackendOptions(base_urls=(stub.url,), tokenizer=str(bos_tokenizer_dir))
    )
    backend.generate([conversation], SamplingParams(max_new_tokens=4), seed=0)
    (body,) = stub.posted("/v1/completions")
    assert body["prompt"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert body["prompt"].count(bos) == 1 and body["prompt"][0] == bos
    assert "messages" not in body
    assert "token ids" in backend.describe()["prefill"]


def test_with_a_local_tokenizer_vllm_scores_the_letters_exactly(bos_tokenizer_dir):
    from caitool.models import load_tokenizer
    from caitool.tokens import encode, next_token_id, render_chat

    tokenizer = load_tokenizer(bos_tokenizer_dir)
    text = render_chat(tokenizer, PREFILL)
    ids = encode(tokenizer, text)
    letter_ids = [next_token_id(tokenizer, text, ids, letter) for letter in "AB"]
    vocabulary = dict(zip(letter_ids, "AB", strict=True))
    options = BackendOptions(tokenizer=str(bos_tokenizer_dir))
    for honoured in (True, False):
        with StubOpenAIServer(
            letters={"A": -0.25, "C": -3.0}, vocabulary=vocabulary, letter_ids=honoured
        ) as stub:
            backend = load_backend("openai:stub", replace(options, base_urls=(stub.url,)))
            assert backend.score_continuations([PREFILL], ["A", "B"]) == [[-0.25, -20.0]]
        bodies = stub.posted("/v1/completions")
        assert bodies[0]["prompt"] == ids and bodies[0]["logprob_token_ids"] == letter_ids
        assert bodies[0]["logprobs"] == 1 and bodies[0]["max_tokens"] == 1
        if not honoured:  # then the letters appended to the prompt, their prompt_logprobs read
            assert bodies[1]["prompt"] == [[*ids, letter_ids[0]], [*ids, letter_ids[1]]]
            assert bodies[1]["prompt_logprobs"] == 0 and bodies[1]["max_tokens"] == 1
        assert len(bodies) == (1 if honoured else 2)


def test_with_a_local_tokenizer_a_letter_merging_with_the_prefill_is_refused(stub, bos_tokenizer_dir):
    backend = load_backend(
        "openai:stub", BackendOptions(base_urls=(stub.url,), tokenizer=str(bos_tokenizer_dir))
    )
    ending = [Message(role="user", content="Pick."), Message(role="assistant", content="The answer")]
    with pytest.raises(CaitoolError, match="is not one token of its own"):
        backend.score_continuations([ending], ["s is", "B"])
    assert not stub.posted("/v1/completions")


def test_a_server_refusing_the_prefill_fields_is_told_to_use_a_tokenizer(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "x", "prompt": "q", "responses": ["a", "b"]}) + "\n")
    with StubOpenAIServer(owned_by="openai", refuse_fields=("continue_final_message",)) as stub:
        result = runner.invoke(
            app, ["label-preferences", str(pairs), "-o", str(tmp_path / "o.jsonl"), *served(stub.url)]
        )
    assert result.exit_code == 2
    assert "does not continue a prefilled assistant turn: pass --tokenizer" in result.output


def test_a_model_the_server_does_not_serve_is_named(stub, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    result = runner.invoke(
        app,
        [
            "generate",
            str(prompts),
            "-o",
            str(tmp_path / "g.jsonl"),
            "-m",
            "openai:other",
            "--base-url",
            stub.url,
        ],
    )
    assert result.exit_code == 2 and "does not serve 'other' (it serves: stub)" in result.output


def test_served_specs_are_parsed_and_checked():
    options = BackendOptions(base_urls=("http://a:1/v1/",))
    assert parse_served_spec("openai:m", options).base_urls == ("http://a:1/v1",)
    spec = parse_served_spec("openai:m@http://b:2/v1,http://c:3/v1", options)
    assert spec.name == "m" and spec.base_urls == ("http://b:2/v1", "http://c:3/v1")
    assert parse_served_spec("runs/sft", options) is None
    with pytest.raises(CaitoolError, match="--base-url"):
        parse_served_spec("openai:m", BackendOptions())
    with pytest.raises(CaitoolError, match="server chooses its precision"):
        load_backend("openai:m", BackendOptions(base_urls=("http://a:1/v1",), dtype="bfloat16"))


def test_urls_in_manifests_lose_their_credentials():
    assert served_module.public_url("http://user:pw@host:8000/v1") == "http://host:8000/v1"


def test_backoff_grows_with_jitter_and_a_cap():
    rng = random.Random(0)
    first = [served_module.backoff_seconds(0, rng) for _ in range(200)]
    assert 0.005 <= min(first) and max(first) < 0.015  # base 0.01 in these tests, times [0.5, 1.5)
    assert served_module.backoff_seconds(30, rng) <= 1.5 * served_module.BACKOFF_CAP_SECONDS


def test_critique_revise_and_eval_run_through_a_served_model(stub, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    critiqued, revised = tmp_path / "c.jsonl", tmp_path / "r.jsonl"
    assert (
        runner.invoke(app, ["critique", str(prompts), "-o", str(critiqued), *served(stub.url)]).exit_code == 0
    )
    assert (
        runner.invoke(app, ["revise", str(critiqued), "-o", str(revised), *served(stub.url)]).exit_code == 0
    )
    assert all(r["rounds"][0]["revision"] for r in lines(revised))
    result = runner.invoke(
        app,
        ["eval", str(prompts), "-o", str(tmp_path / "eval"), "-m", "a=openai:stub", "-m", "b=openai:stub"]
        + ["--judge", "openai:stub", "--base-url", stub.url],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["pairwise"][0]["n"] == 2
    judge = json.loads((tmp_path / "eval" / "caitool_manifest.json").read_text())["models"]["judge"]
    assert judge["backend"] == "openai"


# ---------------------------------------------------------------------------
# Hosted APIs: client-side rate limits, Retry-After, max_completion_tokens, token usage


def test_requests_stay_under_the_requests_per_minute_limit(stub, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 9)
    result = runner.invoke(
        app,
        ["generate", str(prompts), "-o", str(tmp_path / "g.jsonl"), *served(stub.url)]
        + ["--max-requests-per-minute", "300", "--concurrency", "8"],
    )
    assert result.exit_code == 0, result.output
    times = sorted(r["time"] for r in stub.requests if r["path"] == "/v1/chat/completions")
    measured_per_minute = 60 * (len(times) - 1) / (times[-1] - times[0])
    assert len(times) == 9 and measured_per_minute <= 300 * 1.05  # 8 gaps of 0.2 s at least


def test_retry_after_is_waited_for(stub, tmp_path):
    stub.failures = [429]
    stub.retry_after = "1"
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    result = runner.invoke(
        app, ["generate", str(prompts), "-o", str(tmp_path / "g.jsonl"), *served(stub.url)]
    )
    assert result.exit_code == 0, result.output
    first, second = [r["time"] for r in stub.requests if r["path"] == "/v1/chat/completions"]
    assert second - first >= 0.95  # the backoff alone would be about 0.01 s here


def test_max_completion_tokens_is_sent_where_max_tokens_is_refused_and_usage_is_counted(tmp_path):
    from tests.hosted_stub import HostedStub

    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "g.jsonl"
    with HostedStub("openai", replies={"writer": "a short reply"}) as hosted:
        result = runner.invoke(
            app, ["generate", str(prompts), "-o", str(out), "-m", "openai:writer", "--base-url", hosted.url]
        )
        bodies = hosted.posted("/v1/chat/completions")
    assert result.exit_code == 0, result.output
    accepted = [b for b in bodies if "max_completion_tokens" in b]
    assert len(accepted) == 3 and all("max_tokens" not in b for b in accepted)
    assert [r["responses"] for r in lines(out)] == [["a short reply"]] * 3
    counts = json.loads(manifest_path(out).read_text())["counts"]
    assert counts["completion_tokens"] == 9 and counts["prompt_tokens"] > 0
    assert "completion tokens: 9" in result.output
