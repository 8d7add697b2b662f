"""The served backend against a real vLLM server (CPU build) serving the default model.

``make test`` builds the server's virtual environment when missing (``make vllm-venv``) and
runs these tests; elsewhere they are skipped when that environment does not exist. One
server is started for the module (about a minute); the kill test restarts it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.jsonl_io import manifest_path, part_path
from tests.fault_proxy import FaultProxy
from tests.vllm_server import SERVED_NAME, VLLMServer, vllm_python

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(vllm_python() is None, reason="no vLLM venv (make vllm-venv builds it)"),
]
runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from caitool.models import ensure_default_model

    running = VLLMServer(vllm_python(), ensure_default_model(), tmp_path_factory.mktemp("vllm-logs")).start()
    yield running
    running.kill()


def served(url: str, *extra: str) -> list[str]:
    return ["-m", f"openai:{SERVED_NAME}", "--base-url", url, *extra]


def take(source: Path, count: int, target: Path) -> Path:
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:count]))
    return target


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def invoke(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_generating_and_scoring_phase_runs_through_the_server(server, tmp_path, examples_dir):
    prompts = take(examples_dir / "red_team.jsonl", 3, tmp_path / "p.jsonl")
    short = ["--max-new-tokens", "24"]
    invoke(
        [
            "generate",
            str(prompts),
            "-o",
            str(tmp_path / "pairs.jsonl"),
            *served(server.url, "-n", "2", *short),
        ]
    )
    invoke(["critique", str(prompts), "-o", str(tmp_path / "c.jsonl"), *served(server.url, *short)])
    invoke(
        ["revise", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "r.jsonl"), *served(server.url, *short)]
    )
    invoke(
        [
            "label-preferences",
            str(tmp_path / "pairs.jsonl"),
            "-o",
            str(tmp_path / "prefs.jsonl"),
            *served(server.url),
        ]
    )
    invoke(
        ["eval", str(prompts), "-o", str(tmp_path / "eval"), "-m", f"a=openai:{SERVED_NAME}"]
        + [
            "-m",
            f"b=openai:{SERVED_NAME}",
            "--judge",
            f"openai:{SERVED_NAME}",
            "--base-url",
            server.url,
            *short,
        ]
    )
    pairs = lines(tmp_path / "pairs.jsonl")
    assert all(len(p["responses"]) == 2 for p in pairs)
    # The server's model directory is visible here, so records carry the same name@hash as a local run.
    assert pairs[0]["model"].startswith("SmolLM2-135M-Instruct@")
    assert all(r["rounds"][0]["revision"] is not None for r in lines(tmp_path / "r.jsonl"))
    prefs = lines(tmp_path / "prefs.jsonl")
    assert all(0.5 <= p["p_chosen"] <= 1.0 and p["p_swapped"] is not None for p in prefs)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert {m["model_name"] for m in summary["per_model"]} == {"a", "b"} and summary["pairwise"][0]["n"] == 3


def test_letter_probabilities_agree_with_the_local_backend(server, tmp_path, examples_dir):
    prompts = take(examples_dir / "red_team.jsonl", 4, tmp_path / "p.jsonl")
    pairs = tmp_path / "pairs.jsonl"
    invoke(["generate", str(prompts), "-o", str(pairs), "-n", "2", "--max-new-tokens", "24"])
    invoke(["label-preferences", str(pairs), "-o", str(tmp_path / "local.jsonl")])
    invoke(["label-preferences", str(pairs), "-o", str(tmp_path / "served.jsonl"), *served(server.url)])
    local, remote = lines(tmp_path / "local.jsonl"), lines(tmp_path / "served.jsonl")
    gaps = [
        abs(a[key] - b[key]) for a, b in zip(local, remote, strict=True) for key in ("p_first", "p_swapped")
    ]
    assert max(gaps) < 0.02, gaps


def test_greedy_generation_matches_the_local_backend_for_most_prompts(server, tmp_path, examples_dir):
    prompts = take(examples_dir / "helpful.jsonl", 8, tmp_path / "p.jsonl")
    greedy = ["--temperature", "0", "--max-new-tokens", "32"]
    invoke(["generate", str(prompts), "-o", str(tmp_path / "local.jsonl"), *greedy])
    invoke(["generate", str(prompts), "-o", str(tmp_path / "served.jsonl"), *served(server.url, *greedy)])
    same = sum(
        a["responses"] == b["responses"]
        for a, b in zip(lines(tmp_path / "local.jsonl"), lines(tmp_path / "served.jsonl"), strict=True)
    )
    # fp32 kernels differ between the two (vLLM's paged attention vs transformers' sdpa), so a
    # near-tie between two tokens can break the other way and the texts part from there.
    assert same >= 6, f"{same}/8 identical"


def test_retries_carry_a_run_through_a_misbehaving_proxy(server, tmp_path, examples_dir):
    # Twelve first tries alone reach every third POST four times: each fault kind is injected.
    prompts = take(examples_dir / "red_team.jsonl", 12, tmp_path / "p.jsonl")
    out = tmp_path / "c.jsonl"
    # The timeout must sit well above a real answer's latency on a loaded 2-core CI machine
    # (2 s, then 20 s with two training runs beside the suite, timed out honest requests and
    # used up a request's retries) and below the stall.
    with FaultProxy(server.url, every=3, faults=(429, 500, "stall"), stall_seconds=50) as proxy:
        output = invoke(
            ["critique", str(prompts), "-o", str(out), "--max-new-tokens", "16"]
            + served(proxy.url, "--request-timeout", "40", "--concurrency", "4")
        )
    assert len(proxy.injected) >= 3 and {429, 500, "stall"} <= set(proxy.injected)
    assert sorted(r["id"] for r in lines(out)) == sorted(r["id"] for r in lines(prompts))
    counts = json.loads(manifest_path(out).read_text())["counts"]
    assert counts["retries"] >= len(proxy.injected)
    assert f"retried requests: {counts['retried_requests']}" in output


def test_a_killed_server_stops_the_run_cleanly_and_the_rerun_completes(server, tmp_path, examples_dir):
    prompts = take(examples_dir / "red_team.jsonl", 24, tmp_path / "p.jsonl")
    out = tmp_path / "c.jsonl"
    command = [
        sys.executable,
        "-m",
        "caitool",
        "critique",
        str(prompts),
        "-o",
        str(out),
        "--max-new-tokens",
        "48",
    ]
    command += served(server.url, "--concurrency", "2", "--max-retries", "2")
    running = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and running.poll() is None:
            if part_path(out).exists() and len(part_path(out).read_text().splitlines()) >= 8:
                break
            time.sleep(0.5)
        assert running.poll() is None, "the run finished before the server could be killed"
        server.kill()
        _, stderr = running.communicate(timeout=300)
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode == 2
    assert stderr.strip().splitlines()[-1].startswith(f"error: cannot reach the server at {server.url}")
    kept = [r["id"] for r in lines(part_path(out))]
    assert len(kept) >= 8 and len(kept) == len(set(kept)) and not out.exists()

    server.start()
    subprocess.run(command, check=True, capture_output=True, text=True)
    ids = [r["id"] for r in lines(out)]
    assert sorted(ids) == sorted(r["id"] for r in lines(prompts)) and len(ids) == len(set(ids))


# ---------------------------------------------------------------------------
# Tiny family models (tests/tiny_model.py) served by vLLM: what the served path must send so that
# the server computes what the local backend computes, on the records the family matrix uses
# (one with a system turn).


def serve_family(name: str, root: Path, **build: bool) -> VLLMServer:
    from tests.tiny_model import FAMILIES, SERVABLE_MAX_LENGTH, build_family_model

    model = build_family_model(root / name, FAMILIES[name], servable=True, **build)
    return VLLMServer(vllm_python(), model, root, max_model_len=SERVABLE_MAX_LENGTH).start()


def family_prompts(target: Path) -> Path:
    from tests.test_families import PROMPTS

    target.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return target


def texts(path: Path) -> list[list[str]]:
    """The responses, less a trailing U+FFFD: a random byte-level model can stop in the middle of
    a UTF-8 character, which transformers decodes as U+FFFD and vLLM's detokenizer holds back."""
    return [[text.rstrip("\ufffd") for text in r["responses"]] for r in lines(path)]


def test_greedy_served_equals_greedy_local_on_a_model_shipping_sampling_settings(tmp_path):
    """The Qwen2 tiny model's generation config sets repetition_penalty 1.05 and top_k 20, which
    vLLM applies unless the request says otherwise (the penalty even under greedy decoding)."""
    server = serve_family("qwen2", tmp_path)
    try:
        prompts = family_prompts(tmp_path / "p.jsonl")
        greedy = ["--temperature", "0", "--max-new-tokens", "24"]
        local_model = ["-m", str(server.model_dir)]
        invoke(["generate", str(prompts), "-o", str(tmp_path / "local.jsonl"), *local_model, *greedy])
        invoke(["generate", str(prompts), "-o", str(tmp_path / "chat.jsonl"), *served(server.url, *greedy)])
        invoke(
            ["generate", str(prompts), "-o", str(tmp_path / "ids.jsonl"), *served(server.url, *greedy)]
            + ["--tokenizer", str(server.model_dir)]
        )
    finally:
        server.kill()
    local = texts(tmp_path / "local.jsonl")
    assert texts(tmp_path / "chat.jsonl") == local
    assert texts(tmp_path / "ids.jsonl") == local
    sent = json.loads(manifest_path(tmp_path / "chat.jsonl").read_text())["models"]["policy"]["sampling_sent"]
    assert sent["repetition_penalty"] == 1.0 and sent["top_k"] == -1


def test_a_bos_template_model_is_served_and_scored_as_locally(tmp_path):
    """Llama's template starts with BOS and its tokenizer adds one to text: the --tokenizer path
    must send ids, or the model sees two. Letters are scored exactly on both served paths, by
    logprob_token_ids (the letters checked through /tokenize, and without it) and by the
    prompt_logprobs kept for a vLLM that ignores those, so their log-probabilities are the local
    ones."""
    from caitool.backends import BackendOptions, load_backend
    from caitool.backends.local import TransformersBackend
    from caitool.records import Message
    from tests.test_families import PROMPTS

    server = serve_family("llama", tmp_path, bos_added=True)
    model = str(server.model_dir)
    prefilled = [
        [Message(**m) for m in p.get("messages", [{"role": "user", "content": p.get("prompt")}])]
        + [Message(role="assistant", content="The answer is (")]
        for p in PROMPTS
    ]
    try:
        prompts = family_prompts(tmp_path / "p.jsonl")
        local = TransformersBackend.load(model, device="cpu").score_continuations(prefilled, ["A", "B"])
        served_scores = {}
        for name, options in (("ids", {"tokenizer": model}), ("chat", {})):
            backend = load_backend(
                f"openai:{SERVED_NAME}", BackendOptions(base_urls=(server.url,), **options)
            )
            served_scores[name] = backend.score_continuations(prefilled, ["A", "B"])
            if name == "chat":
                # the letters were found and checked by /tokenize, with no generating request
                requests = backend.client.requests
                assert backend.describe()["letter_check"] == "/tokenize"
                assert requests == len(prefilled) * 4, requests  # 3 to /tokenize, 1 scoring
                backend.tokenize_route = False  # as on a server without /tokenize
                served_scores["chat, no /tokenize"] = backend.score_continuations(prefilled, ["A", "B"])
            backend.letter_ids_honoured = False  # as on a vLLM that ignores logprob_token_ids
            served_scores[f"{name}, prompt_logprobs"] = backend.score_continuations(prefilled, ["A", "B"])
        pairs = tmp_path / "pairs.jsonl"
        invoke(["generate", str(prompts), "-o", str(pairs), "-m", model, "-n", "2", "--max-new-tokens", "8"])
        labelled = tmp_path / "ids.jsonl"
        invoke(
            ["label-preferences", str(pairs), "-o", str(labelled), *served(server.url, "--tokenizer", model)]
        )
        greedy = ["--temperature", "0", "--max-new-tokens", "16"]
        invoke(["generate", str(prompts), "-o", str(tmp_path / "g-local.jsonl"), "-m", model, *greedy])
        invoke(
            ["generate", str(prompts), "-o", str(tmp_path / "g-ids.jsonl")]
            + served(server.url, *greedy, "--tokenizer", model)
        )
    finally:
        server.kill()
    for name, scores in served_scores.items():
        gaps = [
            abs(a - b)
            for row, other in zip(local, scores, strict=True)
            for a, b in zip(row, other, strict=True)
        ]
        assert max(gaps) < 1e-3, (name, local, scores)
    assert len(lines(labelled)) == len(PROMPTS)
    assert texts(tmp_path / "g-ids.jsonl") == texts(tmp_path / "g-local.jsonl")
