import json
import math

import pytest
from typer.testing import CliRunner

from caitool.backends.local import TransformersBackend
from caitool.cli import app
from caitool.constitution import load_constitution
from caitool.errors import CaitoolError
from caitool.jsonl_io import manifest_path
from caitool.label import (
    ANSWER_PREFILL,
    SCORE_PREFILL,
    VERDICT_WORDS,
    Comparison,
    Labeller,
    fitness_warning,
    letter_probability,
    run_label_preferences,
)
from caitool.pipeline import Runtime
from caitool.records import Message, PreferenceRecord
from caitool.tokens import render_chat
from tests.fakes import ScriptedBackend
from tests.usage_errors import unboxed

runner = CliRunner()
PROMPT = [Message(role="user", content="How do I bake bread?")]
GOOD = "Mix flour, water, yeast and salt, then knead and bake."
BAD = "I cannot help with that."


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_pairs(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def generation(record_id, responses, **extra):
    return {
        "id": record_id,
        "kind": "generation",
        "prompt": [{"role": "user", "content": "How do I bake bread?"}],
        "completion": [{"role": "assistant", "content": responses[0]}],
        "responses": responses,
        "finished": [True] * len(responses),
        "model": "m@0",
        "seed": 0,
        **extra,
    }


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir):
    return TransformersBackend.load(str(tiny_model_dir), batch_size=4)


@pytest.fixture(scope="module")
def harmless():
    return load_constitution("harmless")


def test_letter_probability_is_a_softmax_over_the_two_letters():
    assert letter_probability(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert letter_probability(-1000.0, -1001.0) == pytest.approx(1 / (1 + math.exp(-1)))


def test_label_equals_softmax_of_the_letter_logits_by_hand(tiny_backend, harmless):
    import torch

    labeller = Labeller(tiny_backend, harmless, swap=False)
    principle = harmless.comparisons[0]
    verdict = labeller.judge([Comparison(PROMPT, GOOD, BAD, principle)])[0]

    question = labeller.question(Comparison(PROMPT, GOOD, BAD, principle), swapped=False)
    text = render_chat(tiny_backend.tokenizer, [*question, Message(role="assistant", content=ANSWER_PREFILL)])
    ids = tiny_backend.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = tiny_backend.model(input_ids=ids).logits[0, -1]
    letter_a, letter_b = (tiny_backend.tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in "AB")
    by_hand = math.exp(logits[letter_a]) / (math.exp(logits[letter_a]) + math.exp(logits[letter_b]))
    assert verdict.p_first == pytest.approx(by_hand, abs=1e-5)
    assert verdict.p == verdict.p_first and verdict.p_swapped is None


def test_question_puts_few_shot_examples_first_and_ends_at_the_letter(harmless):
    labeller = Labeller(ScriptedBackend(), harmless)
    question = labeller.question(Comparison(PROMPT, GOOD, BAD, harmless.comparisons[0]), swapped=True)
    shots = 2 * len(harmless.few_shot.comparison)
    assert len(question) == shots + 1
    assert question[1].content.startswith(ANSWER_PREFILL)
    last = question[-1].content
    assert harmless.comparisons[0].text in last and "Human: How do I bake bread?" in last
    assert last.index(f"(A) {BAD}") < last.index(f"(B) {GOOD}")  # swapped order


def test_swap_averaging_is_symmetric(tiny_backend, harmless):
    labeller = Labeller(tiny_backend, harmless, swap=True)
    principle = harmless.comparisons[3]
    forward, backward = labeller.judge(
        [Comparison(PROMPT, GOOD, BAD, principle), Comparison(PROMPT, BAD, GOOD, principle)]
    )
    assert forward.p == pytest.approx(1.0 - backward.p, abs=1e-5)
    assert forward.p == pytest.approx((forward.p_first + forward.p_swapped) / 2)
    assert forward.p_swapped == pytest.approx(1.0 - backward.p_first, abs=1e-5)


def test_swap_cancels_a_pure_position_bias(harmless):
    always_a = ScriptedBackend(scores=lambda conv, conts: [math.log(0.9), math.log(0.1)])
    verdict = Labeller(always_a, harmless).judge([Comparison(PROMPT, GOOD, BAD, harmless.comparisons[0])])[0]
    assert verdict.p_first == pytest.approx(0.9) and verdict.p_swapped == pytest.approx(0.1)
    assert verdict.p == pytest.approx(0.5) and verdict.orders_disagree


def test_cot_reasons_first_then_reads_the_letters_and_clamps(harmless):
    seen = []

    def confident(conv, conts):
        seen.append(conv[-1].content)
        return [math.log(0.99), math.log(0.01)] if "(A) " + GOOD in conv[-2].content else [-5.0, -0.01]

    backend = ScriptedBackend(reply=lambda conv, i, seed: "A explains the steps.", scores=confident)
    verdict = Labeller(backend, harmless, mode="cot").judge(
        [Comparison(PROMPT, GOOD, BAD, harmless.comparisons[0])]
    )[0]
    assert verdict.p_first > 0.98 and verdict.p == 0.6
    assert verdict.reasoning == ["A explains the steps."] * 2
    assert seen[0].startswith("Let's think step by step: A explains the steps.")
    assert seen[0].endswith("Therefore, the better response is (")
    unclamped = Labeller(backend, harmless, mode="cot", clamp=None)
    assert unclamped.judge([Comparison(PROMPT, BAD, GOOD, harmless.comparisons[0])])[0].p < 0.02


def test_cli_writes_preference_records_with_evidence(tiny_model_dir, tmp_path):
    pairs = write_pairs(
        tmp_path / "pairs.jsonl",
        [
            generation("q1", [GOOD, BAD], category="cooking"),
            generation("q2", [BAD, GOOD]),
            generation("q3", ["one", "two", "three", "four"]),
        ],
    )
    out = tmp_path / "prefs.jsonl"
    result = runner.invoke(
        app,
        [
            "label-preferences",
            str(pairs),
            "-o",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--seed",
            "1",
            "--batch-size",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "the two option orders disagreed" in result.output
    records = [PreferenceRecord.model_validate(r) for r in lines(out)]
    assert [r.id for r in records] == ["q1", "q2", "q3"]
    first = records[0]
    assert first.category == "cooking" and first.mode == "logprob"
    assert {first.chosen[0].content, first.rejected[0].content} == {GOOD, BAD}
    expected = (first.p_first + first.p_swapped) / 2
    assert first.p_chosen == pytest.approx(max(expected, 1 - expected))
    assert (first.chosen[0].content == GOOD) == (expected >= 0.5)
    assert records[2].pair[0] < records[2].pair[1] <= 3
    assert {records[2].chosen[0].content, records[2].rejected[0].content} <= {"one", "two", "three", "four"}
    assert first.constitution.hash == load_constitution("harmless").content_hash
    assert all(r.principle_id in {p.id for p in load_constitution("harmless").comparisons} for r in records)
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["phase"] == "label-preferences" and manifest["counts"]["records"] == 3
    assert "disagree" in manifest["counts"]


def test_principle_and_pair_draws_are_seeded(tmp_path):
    pairs = write_pairs(
        tmp_path / "pairs.jsonl", [generation(f"q{i}", [f"r{j}" for j in range(4)]) for i in range(6)]
    )

    def run(name, seed):
        out = tmp_path / f"{name}.jsonl"
        run_label_preferences(pairs, out, runtime=Runtime(seed=seed), backend=ScriptedBackend())
        return [(r["principle_id"], r["pair"]) for r in lines(out)]

    assert run("a", 0) == run("b", 0) != run("c", 5)


def test_principles_can_be_restricted(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", [generation(f"q{i}", [GOOD, BAD]) for i in range(5)])
    out = tmp_path / "prefs.jsonl"
    run_label_preferences(pairs, out, principles=["less-harmful"], backend=ScriptedBackend())
    assert {r["principle_id"] for r in lines(out)} == {"less-harmful"}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            generation("q1", [GOOD]),
            'pairs.jsonl:2: field "responses" has 1 response(s); comparing needs at least 2',
        ),
        ({"id": "q1", "prompt": "hi"}, 'pairs.jsonl:2: missing field "responses"'),
        ({"id": "q1", "prompt": "hi", "responses": "a b"}, 'pairs.jsonl:2: field "responses" must be a list'),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, record, message):
    pairs = write_pairs(tmp_path / "pairs.jsonl", [generation("q0", [GOOD, BAD]), record])
    out = tmp_path / "prefs.jsonl"
    result = runner.invoke(app, ["label-preferences", str(pairs), "-o", str(out), "--model", "no-such-model"])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "prefs.jsonl.part").exists()


def test_unknown_mode_is_refused(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", [generation("q0", [GOOD, BAD])])
    result = runner.invoke(app, ["label-preferences", str(pairs), "--mode", "vote"])
    assert result.exit_code == 2
    assert "'vote' is not one of 'logprob', 'cot', 'score'" in unboxed(result.output)
    with pytest.raises(
        CaitoolError,
        match='--mode must be one of logprob, cot, score, verdict, verdict-cot, verdict-score, got "vote"',
    ):
        Labeller(ScriptedBackend(), load_constitution("harmless"), mode="vote")  # type: ignore[arg-type]


def test_questions_sharing_few_shot_turns_score_as_if_alone(tiny_backend, harmless):
    """The backend computes the shared few-shot prefix once; each question scores as a full pass would."""
    import torch

    labeller = Labeller(tiny_backend, harmless)
    comparisons = [
        Comparison(PROMPT, GOOD, BAD, harmless.comparisons[0]),
        Comparison(
            [Message(role="user", content="Hi")],
            "Hello there, how can I help?",
            "Go away.",
            harmless.comparisons[5],
        ),
        Comparison(PROMPT, BAD, GOOD * 3, harmless.comparisons[2]),
    ]
    questions = [
        [*labeller.question(c, swapped=False), Message(role="assistant", content=ANSWER_PREFILL)]
        for c in comparisons
    ]
    batched = tiny_backend.score_continuations(questions, ["A", "B"])
    letters = [tiny_backend.tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in "AB"]
    for question, scores in zip(questions, batched, strict=True):
        ids = tiny_backend.tokenizer(
            render_chat(tiny_backend.tokenizer, question), add_special_tokens=False, return_tensors="pt"
        )["input_ids"]
        with torch.no_grad():
            alone = torch.log_softmax(tiny_backend.model(input_ids=ids).logits[0, -1].float(), -1)[letters]
        assert scores == pytest.approx(alone.tolist(), abs=1e-4)


@pytest.mark.slow
def test_label_preferences_on_the_real_default_model(tmp_path):
    pairs = write_pairs(
        tmp_path / "pairs.jsonl",
        [
            generation("d1", [GOOD, "Go away."]),
            generation("d2", ["Paris is the capital of France.", "I refuse to talk about France."]),
        ],
    )
    out = tmp_path / "prefs.jsonl"
    result = runner.invoke(app, ["label-preferences", str(pairs), "-o", str(out), "--seed", "0"])
    assert result.exit_code == 0, result.output
    records = [PreferenceRecord.model_validate(r) for r in lines(out)]
    assert [r.id for r in records] == ["d1", "d2"]
    assert all(r.feedback_model.startswith("SmolLM2-135M-Instruct@") for r in records)
    assert all(0.0 < r.p_first < 1.0 and 0.0 < r.p_swapped < 1.0 for r in records)


def test_output_trains_trl_reward_trainer_as_it_is(tiny_model_dir, tmp_path):
    """The preference file plugs straight into datasets and TRL's RewardTrainer, no conversion."""
    import datasets
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from caitool.models import load_tokenizer
    from caitool.trainers import checkpointing_argument

    pairs = write_pairs(tmp_path / "pairs.jsonl", [generation(f"q{i}", [GOOD, BAD]) for i in range(4)])
    out = tmp_path / "prefs.jsonl"
    labelled = runner.invoke(
        app, ["label-preferences", str(pairs), "-o", str(out), "--model", str(tiny_model_dir)]
    )
    assert labelled.exit_code == 0, labelled.output

    dataset = datasets.load_dataset("json", data_files=str(out), split="train")
    assert dataset.num_rows == 4 and {"prompt", "chosen", "rejected", "p_chosen"} <= set(dataset.column_names)
    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(
        output_dir=str(tmp_path / "trl-rm"),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        bf16=False,
        **{checkpointing_argument(): False},
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.train().global_step == 1


# ---------------------------------------------------------------------------
# score mode, letter mass and the fitness warning


def yes_if_good(conv, conts):
    """A scripted score-mode judge: "Yes" (mass 0.95) when the response shown is GOOD."""
    assert conv[-1].content == SCORE_PREFILL and list(conts) == list(VERDICT_WORDS)
    good = f"Assistant: {GOOD}" in conv[-2].content
    return [math.log(0.9), math.log(0.05)] if good else [math.log(0.05), math.log(0.9)]


def test_score_mode_scores_each_response_alone_and_labels_their_difference(harmless):
    backend = ScriptedBackend(scores=yes_if_good)
    labeller = Labeller(backend, harmless, mode="score")
    principle = harmless.comparisons[0]
    forward, backward = labeller.judge(
        [Comparison(PROMPT, GOOD, BAD, principle), Comparison(PROMPT, BAD, GOOD, principle)]
    )
    odds = 0.9 / 0.05
    assert forward.p == pytest.approx(odds**2 / (1 + odds**2))
    assert backward.p == pytest.approx(1 - forward.p)
    assert forward.p_first == forward.p and forward.p_swapped is None and not forward.orders_disagree
    assert forward.letter_mass == pytest.approx(0.95)
    assert backend.calls == [("score", 4)]  # one question per response, one batch


def test_score_questions_show_one_response_and_yes_no_few_shot_turns(harmless):
    labeller = Labeller(ScriptedBackend(), harmless, mode="score")
    principle = harmless.comparisons[0]
    question = labeller.score_question(Comparison(PROMPT, GOOD, BAD, principle), GOOD)
    assert len(question) == 4 * len(harmless.few_shot.comparison) + 1  # each example: both options
    answers = [m.content for m in question if m.role == "assistant"]
    assert answers == [
        f"{SCORE_PREFILL}{VERDICT_WORDS[0 if letter == ex.answer else 1]}"
        for ex in harmless.few_shot.comparison
        for letter in "AB"
    ]
    last = question[-1].content
    assert f"Human: How do I bake bread?\n\nAssistant: {GOOD}" in last
    assert BAD not in last and principle.text in last and "(A)" not in last


def test_score_mode_on_a_real_model_is_the_yes_no_log_odds_gap(tiny_backend, harmless):
    labeller = Labeller(tiny_backend, harmless, mode="score")
    comparison = Comparison(PROMPT, GOOD, BAD, harmless.comparisons[2])
    verdict, reverse = labeller.judge([comparison, Comparison(PROMPT, BAD, GOOD, harmless.comparisons[2])])
    asked = [
        [*labeller.score_question(comparison, response), Message(role="assistant", content=SCORE_PREFILL)]
        for response in (GOOD, BAD)
    ]
    (yes_good, no_good), (yes_bad, no_bad) = tiny_backend.score_continuations(asked, list(VERDICT_WORDS))
    gap = (yes_good - no_good) - (yes_bad - no_bad)
    assert verdict.p == pytest.approx(1 / (1 + math.exp(-gap)), abs=1e-4)
    assert reverse.p == pytest.approx(1 - verdict.p, abs=1e-4)  # no position to be biased by


def test_letter_mass_is_the_probability_on_both_letters_averaged_over_orders(harmless):
    backend = ScriptedBackend(scores=lambda conv, conts: [math.log(0.3), math.log(0.1)])
    verdict = Labeller(backend, harmless).judge([Comparison(PROMPT, GOOD, BAD, harmless.comparisons[0])])[0]
    assert verdict.letter_mass == pytest.approx(0.4)


def test_score_mode_records_say_so(tmp_path, capsys):
    pairs = write_pairs(
        tmp_path / "pairs.jsonl", [generation("q1", [BAD, GOOD]), generation("q2", [GOOD, BAD])]
    )
    out = tmp_path / "prefs.jsonl"
    run_label_preferences(pairs, out, mode="score", backend=ScriptedBackend(scores=yes_if_good))
    records = [PreferenceRecord.model_validate(r) for r in lines(out)]
    assert [r.mode for r in records] == ["score", "score"]
    assert all(r.chosen[0].content == GOOD and r.p_swapped is None for r in records)
    # p_first is the label for response 0: BAD in q1, GOOD in q2.
    assert records[0].p_first == pytest.approx(1 - records[0].p_chosen)
    assert records[1].p_first == pytest.approx(records[1].p_chosen)
    err = capsys.readouterr().err
    assert "disagreed" not in err and "warning:" not in err


def test_label_preferences_warns_when_the_orders_mostly_disagree(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl", [generation(f"q{i}", [GOOD, BAD]) for i in range(3)])
    always_b = ScriptedBackend(scores=lambda conv, conts: [math.log(0.2), math.log(0.75)])
    run_label_preferences(pairs, tmp_path / "prefs.jsonl", backend=always_b)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "the two option orders disagreed on 3 of 3 pairs" in warnings[0] and "judge-check" in warnings[0]
    assert "mass" not in warnings[0]  # 0.95 on the letters is plenty


def test_label_preferences_warns_when_little_mass_is_on_the_letters(tmp_path, capsys):
    def faint_but_consistent(conv, conts):
        good_first = f"(A) {GOOD}" in conv[-2].content
        return [math.log(0.02), math.log(0.01)] if good_first else [math.log(0.01), math.log(0.02)]

    pairs = write_pairs(tmp_path / "pairs.jsonl", [generation("q1", [GOOD, BAD])])
    run_label_preferences(
        pairs, tmp_path / "prefs.jsonl", backend=ScriptedBackend(scores=faint_but_consistent)
    )
    err = capsys.readouterr().err
    assert "warning: the mean answer mass P(A)+P(B) was 0.03 (below 0.5)" in err
    assert "orders disagreed on" not in err


def test_no_warning_for_a_consistent_confident_labeller(tmp_path, capsys):
    def reads_content(conv, conts):
        return [math.log(0.9), math.log(0.05)] if f"(A) {GOOD}" in conv[-2].content else [-3.0, -0.1]

    pairs = write_pairs(tmp_path / "pairs.jsonl", [generation(f"q{i}", [GOOD, BAD]) for i in range(2)])
    run_label_preferences(pairs, tmp_path / "prefs.jsonl", backend=ScriptedBackend(scores=reads_content))
    assert "warning:" not in capsys.readouterr().err


def test_fitness_warning_thresholds():
    assert fitness_warning(2, 4, [0.9]) is None  # exactly half disagreeing is not "more than half"
    assert "3 of 4" in fitness_warning(3, 4, [0.9])
    assert fitness_warning(None, 4, [0.5]) is None
    assert "P(Yes)+P(No) was 0.10" in fitness_warning(None, 4, [0.1], mass_name="P(Yes)+P(No)")
    assert fitness_warning(0, 0, []) is None


def test_cli_score_mode_on_a_real_model(tiny_model_dir, tmp_path):
    pairs = write_pairs(
        tmp_path / "pairs.jsonl", [generation("q1", [GOOD, BAD]), generation("q2", [BAD, GOOD])]
    )
    out = tmp_path / "prefs.jsonl"
    result = runner.invoke(
        app,
        ["label-preferences", str(pairs), "-o", str(out), "-m", str(tiny_model_dir), "--mode", "score"]
        + ["--principle", "less-harmful"],
    )
    assert result.exit_code == 0, result.output
    first, second = (PreferenceRecord.model_validate(r) for r in lines(out))
    assert first.mode == second.mode == "score" and first.p_swapped is None
    # The same two responses in the other order: the same preference (no position to follow).
    assert first.chosen == second.chosen and first.p_chosen == pytest.approx(second.p_chosen, abs=1e-4)
    assert "disagreed" not in result.output
    assert json.loads(manifest_path(out).read_text())["params"]["mode"] == "score"


# ---------------------------------------------------------------------------
# Verdict modes against scripted hosted chat APIs (tests/hosted_stub.py)


def hosted_pairs(path, count, garbled=()):
    """Pairs whose better response says "kindly" (the stub judge's preference), in both positions."""
    from tests.hosted_stub import GARBLE_MARKER, GOOD_MARKER

    records = []
    for i in range(count):
        good = f"I would {GOOD_MARKER} suggest asking a baker, number {i}."
        bad = f"Figure it out yourself {i}." + (f" {GARBLE_MARKER}" if i in garbled else "")
        records.append(
            {
                "id": f"r{i}",
                "prompt": f"How do I bake loaf {i}?",
                "responses": [good, bad][:: 1 - 2 * (i % 2)],
            }
        )
    return write_pairs(path, records)


def label_against(stub, pairs, out, *extra):
    return runner.invoke(
        app,
        [
            "label-preferences",
            str(pairs),
            "-o",
            str(out),
            "-m",
            "openai:judge",
            "--base-url",
            stub.url,
            *extra,
        ],
    )


@pytest.mark.parametrize("mode", ["verdict", "verdict-cot", "verdict-score"])
def test_verdict_modes_label_through_an_openai_like_api(tmp_path, mode):
    from tests.hosted_stub import GOOD_MARKER, HostedStub

    pairs = hosted_pairs(tmp_path / "pairs.jsonl", 4)
    out = tmp_path / "prefs.jsonl"
    with HostedStub("openai") as stub:
        result = label_against(stub, pairs, out, "--mode", mode)
        sent = stub.posted("/v1/chat/completions")
    assert result.exit_code == 0, result.output
    assert not stub.posted("/v1/completions")
    answered = [b for b in sent if "max_completion_tokens" in b]
    assert answered and all(b["logprobs"] and b["top_logprobs"] == 20 for b in answered)
    assert all("continue_final_message" not in b and "add_generation_prompt" not in b for b in sent)
    records = lines(out)
    assert len(records) == 4 and {r["mode"] for r in records} == {mode}
    assert all(GOOD_MARKER in r["chosen"][0]["content"] for r in records)
    expected = {"verdict": 0.9, "verdict-cot": 0.6, "verdict-score": 1 / (1 + (1 / 9) ** 2)}[mode]
    assert all(r["p_chosen"] == pytest.approx(expected) for r in records)  # read from the letter's log-probs
    assert all(r["samples"] is None and r["from_cache"] is None for r in records)
    counts = json.loads(manifest_path(out).read_text())["counts"]
    assert (
        counts["prompt_tokens"] > 0 and counts["completion_tokens"] > 0 and counts["unparseable_answers"] == 0
    )
    assert "prompt tokens:" in result.output and "unparseable answers: 0/" in result.output


def test_verdict_votes_where_the_api_returns_no_logprobs(tmp_path):
    from tests.hosted_stub import GOOD_MARKER, HostedStub

    pairs = hosted_pairs(tmp_path / "pairs.jsonl", 4)
    out = tmp_path / "prefs.jsonl"
    with HostedStub("plain", confidence=0.8) as stub:
        result = label_against(stub, pairs, out, "--mode", "verdict", "--samples", "7")
        sent = stub.posted("/v1/chat/completions")
    assert result.exit_code == 0, result.output
    assert len(sent) == 8 and all(b["n"] == 7 and b["temperature"] == 1.0 for b in sent)
    records = lines(out)
    assert all(r["samples"] == 7 for r in records)
    for record in records:  # each order's label is a share of 7 votes
        for p in (record["p_first"], 1 - record["p_swapped"]):
            assert round(p * 7) == pytest.approx(p * 7)
    assert sum(GOOD_MARKER in r["chosen"][0]["content"] for r in records) >= 3


def test_verdict_mode_without_logprobs_or_samples_stops_with_one_line(tmp_path):
    from tests.hosted_stub import HostedStub

    pairs = hosted_pairs(tmp_path / "pairs.jsonl", 2)
    with HostedStub("plain") as stub:
        result = label_against(stub, pairs, tmp_path / "prefs.jsonl", "--mode", "verdict")
    assert result.exit_code == 2
    assert "returned no log-probabilities" in result.output and "--samples K" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "prefs.jsonl").exists()


def test_unparseable_answers_are_counted_and_their_pairs_left_unlabelled(tmp_path):
    from tests.hosted_stub import HostedStub

    pairs = hosted_pairs(tmp_path / "pairs.jsonl", 12, garbled=(3,))
    out = tmp_path / "prefs.jsonl"
    with HostedStub("openai") as stub:
        result = label_against(stub, pairs, out, "--mode", "verdict")
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in lines(out)] == [f"r{i}" for i in range(12) if i != 3]  # never guessed
    counts = json.loads(manifest_path(out).read_text())["counts"]
    assert counts["unparseable_answers"] == 2 and counts["answers"] == 24 and counts["unlabelled"] == 1
    assert "unparseable answers: 2/24" in result.output and "unlabelled pairs: 1" in result.output


def test_a_judge_that_mostly_names_no_option_stops_the_run(tmp_path):
    from tests.hosted_stub import HostedStub

    pairs = hosted_pairs(tmp_path / "pairs.jsonl", 10, garbled=range(10))
    with HostedStub("openai") as stub:
        result = label_against(stub, pairs, tmp_path / "prefs.jsonl", "--mode", "verdict")
    assert result.exit_code == 2
    assert "20 of 20 answers of the judge openai:judge named no option" in result.output
    assert "Both responses have their merits" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "prefs.jsonl").exists()


@pytest.mark.parametrize(("kind", "extra"), [("openai", []), ("plain", ["--samples", "3"])])
def test_the_cache_makes_a_rerun_send_no_request(tmp_path, kind, extra):
    from tests.hosted_stub import HostedStub

    pairs = hosted_pairs(tmp_path / "pairs.jsonl", 4)
    cache = tmp_path / "cache"
    options = ["--mode", "verdict", "--cache", str(cache), *extra]
    with HostedStub(kind) as stub:
        first = label_against(stub, pairs, tmp_path / "a.jsonl", *options)
        assert first.exit_code == 0, first.output
        assert stub.posted("/v1/chat/completions")
    with HostedStub(kind) as stub:
        second = label_against(stub, pairs, tmp_path / "b.jsonl", *options)
        assert second.exit_code == 0, second.output
        assert stub.posted("/v1/chat/completions") == []  # every answer from the cache
    assert all(r["from_cache"] is False for r in lines(tmp_path / "a.jsonl"))
    again = lines(tmp_path / "b.jsonl")
    assert all(r["from_cache"] is True for r in again) and "labels from cache: 4" in second.output
    strip = lambda r: {k: v for k, v in r.items() if k != "from_cache"}  # noqa: E731
    assert [strip(r) for r in again] == [strip(r) for r in lines(tmp_path / "a.jsonl")]


def test_dry_run_prints_requests_and_tokens_and_sends_nothing(tmp_path):
    pairs = hosted_pairs(tmp_path / "pairs.jsonl", 5)
    out = tmp_path / "prefs.jsonl"
    result = runner.invoke(
        app,
        [
            "label-preferences",
            str(pairs),
            "-o",
            str(out),
            "-m",
            "openai:judge",
            "--base-url",
            "http://127.0.0.1:9/v1",
        ]
        + ["--mode", "verdict", "--samples", "4", "--dry-run"],
    )
    assert result.exit_code == 0, result.output
    assert "10 requests" in result.output and f"at most {10 * 4 * 24} completion tokens" in result.output
    assert not out.exists()
    assert (
        "dry run"
        in runner.invoke(
            app, ["label-preferences", str(pairs), "-o", str(out), "--mode", "score", "--dry-run"]
        ).output
    )


def test_samples_outside_the_verdict_modes_are_refused(tmp_path):
    pairs = hosted_pairs(tmp_path / "pairs.jsonl", 1)
    result = runner.invoke(app, ["label-preferences", str(pairs), "--samples", "3", "--dry-run"])
    assert result.exit_code == 2 and "--samples applies to the verdict modes only" in result.output


def test_prefill_modes_on_an_openai_like_api_point_to_verdict_mode(tmp_path):
    from tests.hosted_stub import HostedStub

    pairs = hosted_pairs(tmp_path / "pairs.jsonl", 2)
    with HostedStub("openai") as stub:
        result = label_against(stub, pairs, tmp_path / "prefs.jsonl")
    assert result.exit_code == 2 and "answered 400" in result.output and "--mode verdict" in result.output
