"""Every phase on tiny random models of four families, through the CLI.

Each family differs from the tiny Llama the other tests use where it matters to caitool:
Llama and Phi-3 encode "A" alone as "▁A" (a SentencePiece-style dummy prefix) while after "("
the model writes "A"; Qwen2 ships sampling settings in its generation config; Gemma's chat
template refuses a system turn and closes a turn with <end_of_turn>, which its generation config
does not name; Llama and Phi-3 pad with a token that ends every rendered conversation. One
pipeline per family runs generate -> critique -> revise -> sft -> label-preferences -> train-rm
-> ppo -> eval, each phase once (module-scoped, built lazily), and the tests read its outputs.
"""

from __future__ import annotations

import json
import shutil
from functools import cached_property
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from caitool.backends.local import TransformersBackend
from caitool.cli import app
from caitool.models import load_tokenizer
from caitool.records import Message
from caitool.reward import load_reward_model
from caitool.tokens import encode, encode_conversation, render_chat
from tests.tiny_model import FAMILIES, build_family_model

runner = CliRunner()
SYSTEM = "Answer in one short sentence."
ANSWER = "I can help with that."  # what sft teaches every family to say, then end its turn
PROMPTS = [
    {"id": "bread", "prompt": "How do I bake bread?"},
    {"id": "joke", "prompt": "Tell me a joke about safety."},
    {"id": "system", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]},
    {"id": "privacy", "prompt": "Is privacy important?"},
]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def invoke(*args: object):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


class Pipeline:
    """One family's model and every phase run on it once, each when a test first needs it."""

    def __init__(self, name: str, root: Path):
        self.family = FAMILIES[name]
        self.root = root
        self.model = build_family_model(root / "model", self.family)
        self.prompts = root / "prompts.jsonl"
        self.prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
        self.outputs: dict[str, str] = {}

    def _run(self, phase: str, *args: object) -> Path:
        result = invoke(phase, *args)
        self.outputs[phase] = result.output
        return Path(str(args[args.index("-o") + 1]))

    @cached_property
    def pairs(self) -> Path:
        return self._run(
            "generate", self.prompts, "-o", self.root / "pairs.jsonl", "--model", self.model, "-n", 2,
            "--temperature", 1.0, "--top-p", 1.0, "--max-new-tokens", 6,
        )  # fmt: skip

    @cached_property
    def critiques(self) -> Path:
        return self._run(
            "critique", self.pairs, "-o", self.root / "critiques.jsonl", "--model", self.model,
            "--few-shot", 0, "--max-new-tokens", 4,
        )  # fmt: skip

    @cached_property
    def revisions(self) -> Path:
        return self._run(
            "revise", self.critiques, "-o", self.root / "revisions.jsonl", "--model", self.model,
            "--few-shot", 0, "--max-new-tokens", 4,
        )  # fmt: skip

    @cached_property
    def sft(self) -> Path:
        """Trained on every revision replaced by ANSWER, so that the model learns to end its turn."""
        taught = self.root / "taught.jsonl"
        records = [json.loads(line) for line in self.revisions.read_text().splitlines() * 3]
        for index, record in enumerate(records):
            record["id"] = f"{record['id']}-{index}"
            record["rounds"][-1]["revision"] = ANSWER
            record["completion"] = [{"role": "assistant", "content": ANSWER}]
        taught.write_text("".join(json.dumps(r) + "\n" for r in records))
        return self._run(
            "sft", taught, "-o", self.root / "sft", "--model", self.model, "--epochs", 12, "--lr", 5e-3,
            "--batch-size", 4,
        )  # fmt: skip

    @cached_property
    def preferences(self) -> Path:
        return self._run(
            "label-preferences", self.pairs, "-o", self.root / "prefs.jsonl", "--model", self.model
        )

    @cached_property
    def rm(self) -> Path:
        return self._run(
            "train-rm", self.preferences, "-o", self.root / "rm", "--model", self.model, "--epochs", 1,
            "--eval-fraction", 0.25, "--batch-size", 2,
        )  # fmt: skip

    @cached_property
    def ppo(self) -> Path:
        return self._run(
            "ppo", self.prompts, "--policy", self.sft, "--rm", self.rm, "-o", self.root / "ppo",
            "--steps", 1, "--batch-size", 4, "--mini-batches", 1, "--ppo-epochs", 1,
            "--response-length", 8, "--lr", 1e-5, "--sample-every", 1,
        )  # fmt: skip

    @cached_property
    def dpo(self) -> Path:
        return self._run(
            "dpo", self.preferences, "--policy", self.sft, "-o", self.root / "dpo", "--epochs", 1,
            "--batch-size", 2, "--lr", 1e-5,
        )  # fmt: skip

    @cached_property
    def rloo(self) -> Path:
        return self._run(
            "rloo", self.prompts, "--policy", self.sft, "--rm", self.rm, "-o", self.root / "rloo",
            "--steps", 2, "--batch-size", 2, "--k", 2, "--response-length", 8, "--lr", 1e-5,
            "--sample-every", 1,
        )  # fmt: skip

    @cached_property
    def eval(self) -> Path:
        return self._run(
            "eval", self.prompts, "-o", self.root / "eval", "-m", f"base={self.model}",
            "-m", f"sft={self.sft}", "--rm", self.rm, "--judge", self.model, "--max-new-tokens", 16,
        )  # fmt: skip


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pipeline(request, tmp_path_factory) -> Pipeline:
    return Pipeline(request.param, tmp_path_factory.mktemp(request.param))


def test_option_letters_are_read_as_the_tokens_the_model_writes_after_the_prefill(pipeline):
    backend = TransformersBackend.load(str(pipeline.model), device="cpu")
    tokenizer = backend.tokenizer
    in_context = [tokenizer.convert_tokens_to_ids(letter) for letter in "AB"]
    if pipeline.family.tokenizer == "sentencepiece":
        # The premise: alone, the letters get the dummy prefix, and are other tokens.
        assert tokenizer.convert_ids_to_tokens(encode(tokenizer, "A")) == ["▁A"]
    prefilled = [
        Message(role="user", content="Which is better?"),
        Message(role="assistant", content="The answer is ("),
    ]
    text = render_chat(tokenizer, prefilled)
    assert encode(tokenizer, text + "A")[-1] == in_context[0]
    with torch.no_grad():
        logits = backend.model(torch.tensor([encode(tokenizer, text)])).logits[0, -1].float()
    expected = torch.log_softmax(logits, -1)[in_context].tolist()
    assert backend.score_continuations([prefilled], ["A", "B"])[0] == pytest.approx(expected, abs=1e-5)

    labelled = lines(pipeline.preferences)
    assert len(labelled) == len(PROMPTS) and all(0.0 < r["p_first"] < 1.0 for r in labelled)


def test_the_end_of_turn_token_of_the_template_stops_generation(pipeline):
    tokenizer = load_tokenizer(pipeline.model)
    rendered = encode_conversation(tokenizer, [Message(role="user", content="Hi")], "Hello")
    closing = [t for t in tokenizer.convert_ids_to_tokens(rendered) if t in tokenizer.all_special_tokens]
    assert pipeline.family.end_of_turn in closing
    backend = TransformersBackend.load(str(pipeline.model), device="cpu")
    assert tokenizer.convert_tokens_to_ids(pipeline.family.end_of_turn) in backend.stop_ids

    # After sft the model says ANSWER and closes its turn: greedy generation stops there.
    out = pipeline.root / "after-sft.jsonl"
    invoke(
        "generate",
        pipeline.prompts,
        "-o",
        out,
        "--model",
        pipeline.sft,
        "--temperature",
        0,
        "--max-new-tokens",
        16,
    )
    answers = lines(out)
    assert [a["completion"][0]["content"] for a in answers] == [ANSWER] * len(PROMPTS)
    assert all(a["finished"] == [True] for a in answers)


def test_generate_pairs_ignore_the_sampling_settings_the_model_ships(pipeline, tmp_path):
    shipped = pipeline.family.generation_config
    if not shipped:
        pytest.skip(f"{pipeline.family.name}'s generation config sets no sampling option")
    plain = tmp_path / "plain"
    shutil.copytree(pipeline.model, plain)
    config = json.loads((plain / "generation_config.json").read_text())
    (plain / "generation_config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k not in shipped})
    )
    out = tmp_path / "plain-pairs.jsonl"
    invoke(
        "generate", pipeline.prompts, "-o", out, "--model", plain, "-n", 2, "--temperature", 1.0,
        "--top-p", 1.0, "--max-new-tokens", 6,
    )  # fmt: skip
    assert [r["responses"] for r in lines(out)] == [r["responses"] for r in lines(pipeline.pairs)]


def test_a_system_turn_is_written_where_the_template_can_take_it(pipeline):
    tokenizer = load_tokenizer(pipeline.model)
    conversation = [Message(role="system", content=SYSTEM), Message(role="user", content="Hi")]
    text = render_chat(tokenizer, conversation)
    assert SYSTEM in text  # never dropped
    generated = {r["id"]: r for r in lines(pipeline.pairs)}
    assert generated["system"]["prompt"][0] == {"role": "system", "content": SYSTEM}  # the record keeps it
    note = "has no system role; system turns are written at the start of the first user turn"
    if pipeline.family.takes_system:
        assert note not in pipeline.outputs["generate"]
    else:
        assert note in pipeline.outputs["generate"]
        assert f"<start_of_turn>user\n{SYSTEM}\n\nHi<end_of_turn>" in text


def test_critique_and_revise_run_on_every_family(pipeline):
    revised = lines(pipeline.revisions)
    assert len(revised) == len(PROMPTS)
    assert all(r["rounds"] and r["rounds"][-1]["revision"] is not None for r in revised)


def test_the_reward_is_read_at_the_last_real_token(pipeline):
    reward_model = load_reward_model(pipeline.rm)
    tokenizer = reward_model.tokenizer
    rendered = encode_conversation(tokenizer, [Message(role="user", content="Hi")], "Hello")
    assert rendered[-1] != tokenizer.pad_token_id  # padding never hides the end of a conversation
    prompt = [Message(role="user", content="Tell me a joke.")]
    alone = reward_model.score([prompt], ["Short."])[0]
    beside_longer = reward_model.score([prompt, prompt], ["Short.", "A much longer answer " * 4])[0]
    assert alone == pytest.approx(beside_longer, abs=1e-4)


def test_ppo_takes_a_step_on_every_family(pipeline):
    log = lines(pipeline.ppo / "training_log.jsonl")
    assert [e["step"] for e in log] == [1] and log[0]["kl"] == 0.0
    assert all(value == value for value in log[0].values() if isinstance(value, float))  # no NaN
    samples = lines(pipeline.ppo / "samples.jsonl")
    assert len(samples) == len(PROMPTS)


def test_eval_answers_judges_and_scores_on_every_family(pipeline):
    answers = lines(pipeline.eval / "generations.jsonl")
    assert len(answers) == 2 * len(PROMPTS) and all(a["reward"] is not None for a in answers)
    tuned = [a for a in answers if a["model_name"] == "sft"]
    assert all(a["completion"][0]["content"] == ANSWER and a["finished"] for a in tuned)
    assert len(lines(pipeline.eval / "judgements.jsonl")) == len(PROMPTS)


def test_dpo_trains_on_pairs_with_a_system_turn_on_every_family(pipeline):
    with_system = [r for r in lines(pipeline.preferences) if r["prompt"][0]["role"] == "system"]
    assert with_system  # the premise: the pairs carry the system turn
    log = [e for e in lines(pipeline.dpo / "training_log.jsonl") if "loss" in e]
    assert log and all(e["loss"] == e["loss"] for e in log)  # no NaN
    assert json.loads((pipeline.dpo / "caitool_manifest.json").read_text())["counts"]["trained_pairs"] == len(
        lines(pipeline.preferences)
    )
    note = "has no system role; system turns are written at the start of the first user turn"
    assert (note in pipeline.outputs["dpo"]) != pipeline.family.takes_system


def test_rloo_rolls_out_prompts_with_a_system_turn_on_every_family(pipeline):
    log = lines(pipeline.rloo / "training_log.jsonl")
    assert [e["step"] for e in log] == [1, 2]
    assert all(value == value for e in log for value in e.values() if isinstance(value, float))  # no NaN
    samples = lines(pipeline.rloo / "samples.jsonl")
    by_id = {p["id"]: p for p in PROMPTS}
    # samples.jsonl and the reward model keep the record's turns; only the policy's rendering folds them.
    system = [s for s in samples if s["id"] == "system"]
    assert system and all(s["prompt"] == by_id["system"]["messages"] for s in system)
    reward_model = load_reward_model(pipeline.rm)
    prompts = [[Message(**m) for m in s["prompt"]] for s in samples]
    scores = reward_model.score(prompts, [s["response"] for s in samples])
    assert [s["reward"] for s in samples] == pytest.approx(scores, abs=1e-4)


def test_the_served_tokenizer_path_sends_what_the_local_backend_reads(pipeline, tmp_path):
    """With --tokenizer the template is rendered here and token ids go to /v1/completions: the
    server reads the template's own BOS (no second one), the system turn where the template can
    take it, and for exact letter scoring each letter's in-context token after the prefill."""
    from tests.openai_stub import StubOpenAIServer

    tokenizer = load_tokenizer(pipeline.model)
    letters = [tokenizer.convert_tokens_to_ids(letter) for letter in "AB"]  # as written after "("
    out = pipeline.root / "served-pairs.jsonl"
    with StubOpenAIServer(vocabulary=dict(zip(letters, "AB", strict=True))) as stub:
        served = ["-m", "openai:stub", "--base-url", stub.url, "--tokenizer", pipeline.model]
        invoke("generate", pipeline.prompts, "-o", out, *served, "--max-new-tokens", 4)
        generated = sorted(b["prompt"] for b in stub.posted("/v1/completions"))
        labelled = tmp_path / "served-prefs.jsonl"
        invoke("label-preferences", pipeline.pairs, "-o", labelled, *served)
        scored = [b for b in stub.posted("/v1/completions") if "logprob_token_ids" in b]

    conversations = [[Message(**m) for m in r["prompt"]] for r in lines(out)]
    expected = [encode(tokenizer, render_chat(tokenizer, c)) for c in conversations]
    assert generated == sorted(expected)
    bos = tokenizer.bos_token_id
    for ids, conversation in zip(expected, conversations, strict=True):
        if bos is not None:
            assert ids.count(bos) == render_chat(tokenizer, conversation).count(tokenizer.bos_token)
    assert any(SYSTEM in tokenizer.decode(ids) for ids in generated)  # the system turn reached the server
    assert len(scored) == 2 * len(PROMPTS)  # both option orders of every pair
    assert all(body["logprob_token_ids"] == letters for body in scored)
    assert all(tokenizer.decode(body["prompt"]).endswith("(") for body in scored)  # the prefill's end
    assert len(lines(labelled)) == len(PROMPTS)
