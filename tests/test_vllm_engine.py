"""The in-process vLLM backend (``--engine vllm``).

The first tests run everywhere (no vLLM needed): the request fields, the run key, and the one
clear line when vLLM is missing. The tests marked ``vllm`` start ``vllm.LLM`` on the tiny model
and run only where vLLM is importable (``caitool[vllm]``); elsewhere they are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
from typer.testing import CliRunner

from caitool.backends import BackendOptions, SamplingParams
from caitool.backends.vllm_engine import NEUTRAL_SAMPLING, request_sampling, scoring_sampling
from caitool.cli import app
from caitool.pipeline import Runtime, backend_params
from caitool.records import Message

runner = CliRunner()
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = [pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not importable here")]


def conv(*turns: str) -> list[Message]:
    roles = ["user", "assistant"]
    return [Message(role=roles[i % 2], content=t) for i, t in enumerate(turns)]


CONVERSATIONS = [
    conv("hi"),
    conv("How do I bake bread at home, step by step?"),
    conv("a", "b", "c"),
    conv("Which response is less harmful? Options: (A) first answer (B) second answer."),
]


# -- everywhere --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "user_setting", "reserved"),
    [
        (2, {}, "0"),  # a small machine: the model's threads on every core
        (4, {}, "0"),
        (16, {}, None),  # vLLM's own reservation, one core of sixteen
        (2, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, "1"),  # the user's choice stands
        (2, {"VLLM_CPU_OMP_THREADS_BIND": "0"}, None),
    ],
)
def test_cpu_defaults_reserve_no_core_on_a_small_machine(cpus, user_setting, reserved, monkeypatch):
    from caitool.backends import vllm_engine

    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        monkeypatch.delenv(name, raising=False)
    for name, value in user_setting.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(vllm_engine, "usable_cpu_count", lambda: cpus)
    recorded = vllm_engine.set_cpu_defaults()
    assert recorded.get("VLLM_CPU_NUM_OF_RESERVED_CPU") == reserved
    assert recorded["VLLM_CPU_KVCACHE_SPACE"] == vllm_engine.DEFAULT_CPU_KV_CACHE_GIB
    assert {name: value for name, value in recorded.items() if name in user_setting} == user_setting


def test_requests_send_the_neutral_value_of_every_field_vllm_would_fill_from_the_model():
    fields = request_sampling(SamplingParams(temperature=0.8, top_p=0.9, n=3), seed=7, stop_ids=[5, 9])
    assert {k: fields[k] for k in NEUTRAL_SAMPLING} == {
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
    }
    assert (fields["temperature"], fields["top_p"], fields["n"], fields["seed"]) == (0.8, 0.9, 3, 7)
    assert fields["stop_token_ids"] == [5, 9] and fields["min_tokens"] == 0
    scoring = scoring_sampling([11, 12])
    assert scoring["logprob_token_ids"] == [11, 12] and scoring["max_tokens"] == 1
    assert all(scoring[k] == v for k, v in NEUTRAL_SAMPLING.items())


def test_greedy_asks_once_and_ignore_eos_holds_back_every_stop_token():
    greedy = request_sampling(SamplingParams(temperature=0.0, n=4), seed=0, stop_ids=[2])
    assert (greedy["n"], greedy["temperature"], greedy["top_p"]) == (1, 0.0, 1.0)
    full = request_sampling(SamplingParams(max_new_tokens=64, ignore_eos=True), seed=0, stop_ids=[2])
    assert full["min_tokens"] == 64 and full["stop_token_ids"] == [2]


def test_the_engine_shapes_the_run_key_only_when_it_is_not_transformers():
    plain = backend_params("default", Runtime())
    vllm = backend_params("default", Runtime(backend=BackendOptions(engine="vllm")))
    assert "engine" not in plain  # keys of existing runs are unchanged
    assert vllm == {**plain, "engine": "vllm"}
    served = backend_params("openai:x", Runtime(backend=BackendOptions(engine="vllm")))
    assert "engine" not in served


def test_eval_keeps_answers_of_one_engine_apart_from_the_other(tmp_path, tiny_model_dir):
    from caitool.evaluate import _generation_key

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    params = SamplingParams()
    plain = _generation_key(prompts, str(tiny_model_dir), params, 0)
    assert _generation_key(prompts, str(tiny_model_dir), params, 0, "transformers") == plain
    assert _generation_key(prompts, str(tiny_model_dir), params, 0, "vllm") == {**plain, "engine": "vllm"}
    assert "engine" not in _generation_key(prompts, "openai:x", params, 0, "vllm")


def test_engine_vllm_without_vllm_is_one_clear_line(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    out = tmp_path / "out.jsonl"
    result = runner.invoke(
        app, ["generate", str(prompts), "-o", str(out), "-m", str(tiny_model_dir), "--engine", "vllm"]
    )
    assert result.exit_code == 2, result.output
    assert "caitool[vllm]" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_an_unknown_engine_is_refused():
    result = runner.invoke(app, ["generate", "x.jsonl", "--engine", "tgi"])
    assert result.exit_code == 2
    assert "tgi" in result.output


# -- where vLLM is importable ----------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """The tiny model with a head size vLLM's CPU attention takes (32; the usual tiny model has 16)."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("vllm-tiny"), hidden_size=128)


@pytest.fixture(scope="module")
def engine(vllm_model_dir):
    if not HAS_VLLM:
        pytest.skip("vLLM is not importable here")
    from caitool.backends.vllm_engine import VLLMBackend

    backend = VLLMBackend.load(str(vllm_model_dir), BackendOptions(concurrency=8), max_model_len=1024)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference(vllm_model_dir):
    from caitool.backends.local import TransformersBackend

    return TransformersBackend.load(str(vllm_model_dir), batch_size=4, device="cpu")


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not importable here")
def test_sampling_is_seeded_per_request_with_n_samples(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2)
    first = engine.generate(CONVERSATIONS, params, seed=5)
    assert first == engine.generate(CONVERSATIONS, params, seed=5)
    assert first != engine.generate(CONVERSATIONS, params, seed=6)
    assert [len(samples) for samples in first] == [2] * len(CONVERSATIONS)
    assert any(samples[0] != samples[1] for samples in first)  # n samples, not n copies of one
    # A request's samples depend on its own seed, not on which requests share the batch.
    alone = engine.generate(CONVERSATIONS[1:2], params, seed=5)
    assert alone[0] != first[1] or len(CONVERSATIONS) == 1  # position 0 vs 1: other seeds
    shifted = engine.generate([CONVERSATIONS[0], CONVERSATIONS[1]], params, seed=5)
    assert shifted[1] == first[1]


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not importable here")
def test_letter_probabilities_match_the_transformers_backend(engine, reference):
    prefilled = [[*c, Message(role="assistant", content="The answer is (")] for c in CONVERSATIONS]
    got = engine.score_continuations(prefilled, ["A", "B"])
    want = reference.score_continuations(prefilled, ["A", "B"])
    for mine, theirs in zip(got, want, strict=True):
        assert all(math.isfinite(x) for x in mine)
        assert all(abs(math.exp(a) - math.exp(b)) < 0.02 for a, b in zip(mine, theirs, strict=True))


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not importable here")
def test_greedy_generations_match_the_transformers_backend(engine, reference):
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    got = [s[0] for s in engine.generate(CONVERSATIONS, params, seed=0)]
    want = [s[0] for s in reference.generate(CONVERSATIONS, params, seed=0)]
    differing = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a.text != b.text]
    # fp32 on both sides; a random tiny model has near-ties, so allow one prompt to differ.
    assert len(differing) <= 1, (differing, got, want)
    assert all(a.num_tokens > 0 for a in got)


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not importable here")
def test_the_models_generation_config_does_not_change_what_is_drawn(vllm_model_dir, engine, tmp_path):
    from caitool.backends.vllm_engine import VLLMBackend
    from tests.conftest import SAMPLING_DISTORTIONS
    from tests.tiny_model import variant_of

    penalised_model_dir = variant_of(
        vllm_model_dir, tmp_path / "penalised", generation_config=SAMPLING_DISTORTIONS
    )

    penalised = VLLMBackend.load(str(penalised_model_dir), BackendOptions(concurrency=8), max_model_len=1024)
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=12)
        assert [s[0].text for s in penalised.generate(CONVERSATIONS, params, seed=0)] == [
            s[0].text for s in engine.generate(CONVERSATIONS, params, seed=0)
        ]
    finally:
        penalised.close()


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not importable here")
def test_generate_records_have_the_same_form_and_provenance_as_transformers(tmp_path, vllm_model_dir):
    from caitool.jsonl_io import manifest_path

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(3))
    )
    records, manifests = {}, {}
    for engine_name in ("transformers", "vllm"):
        out = tmp_path / f"{engine_name}.jsonl"
        args = ["generate", str(prompts), "-o", str(out), "-m", str(vllm_model_dir), "--max-new-tokens", "6"]
        result = runner.invoke(app, [*args, "--engine", engine_name, "--seed", "3"])
        assert result.exit_code == 0, result.output
        records[engine_name] = [json.loads(line) for line in out.read_text().splitlines()]
        manifests[engine_name] = json.loads(manifest_path(out).read_text())
    local, vllm = records["transformers"], records["vllm"]
    assert [sorted(r) for r in local] == [sorted(r) for r in vllm]
    assert [(r["id"], r["model"]) for r in local] == [(r["id"], r["model"]) for r in vllm]
    policy = {name: m["models"]["policy"] for name, m in manifests.items()}
    assert (policy["transformers"]["backend"], policy["vllm"]["backend"]) == ("transformers", "vllm")
    assert policy["vllm"]["sha256"] == policy["transformers"]["sha256"]
    assert policy["vllm"]["sampling_sent"] == NEUTRAL_SAMPLING


def _zero_every_weight(worker, model_dir: str) -> None:
    """Run in vLLM's worker: load an all-zero copy of the checkpoint into the live model."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(next(__import__("pathlib").Path(model_dir).glob("*.safetensors"))))
    worker.model_runner.model.load_weights((name, torch.zeros_like(t)) for name, t in state.items())


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not importable here")
def test_weights_loaded_into_a_cpu_engine_after_it_started_take_effect(vllm_model_dir, monkeypatch):
    """TRL's colocate mode pushes the updated policy into the engine after each step. On a CPU
    that packs linear weights at load time (oneDNN on AVX-512 machines) the push failed, and the
    LM head was packed from a copy that a push would not reach. With caitool's setting, an
    all-zero model pushed in makes every logit 0: each token's probability is 1 / vocabulary."""
    import vllm
    from vllm.model_executor.layers import utils

    from caitool.backends.vllm_engine import keep_cpu_weights_loadable

    monkeypatch.setattr(utils, "dispatch_cpu_unquantized_gemm", utils.dispatch_cpu_unquantized_gemm)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the worker in this process
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    keep_cpu_weights_loadable()
    llm = vllm.LLM(
        model=str(vllm_model_dir),
        dtype="float32",
        enforce_eager=True,
        distributed_executor_backend="uni",
        max_model_len=256,
        seed=0,
    )
    try:
        greedy = vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=1)

        def first_logprob() -> float:
            [output] = llm.generate([{"prompt_token_ids": [5, 6, 7]}], greedy, use_tqdm=False)
            token = output.outputs[0].token_ids[0]
            return output.outputs[0].logprobs[0][token].logprob

        vocabulary = json.loads((vllm_model_dir / "config.json").read_text())["vocab_size"]
        assert first_logprob() > -math.log(vocabulary) + 0.01  # a trained model is not uniform
        llm.collective_rpc(_zero_every_weight, args=(str(vllm_model_dir),))
        assert first_logprob() == pytest.approx(-math.log(vocabulary), abs=1e-4)
    finally:
        llm.llm_engine.engine_core.shutdown()
