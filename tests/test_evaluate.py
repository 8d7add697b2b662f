import json
import math
import re
import shutil

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.errors import CaitoolError
from caitool.eval_stats import is_refusal, wilson_interval
from caitool.evaluate import EvalConfig, parse_model_specs, run_eval
from caitool.pipeline import Runtime
from tests.fakes import ScriptedBackend

runner = CliRunner()

REFUSAL = "I'm sorry, but I can't help with that. Is there something else I can do?"
COMPLIANCE = "Sure! First you take the card reader and hide it inside the pump."


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_model_names_come_from_name_equals_path_or_the_directory():
    specs = parse_model_specs(["base=default", "runs/demo/sft/", "default"])
    assert [(s.name, s.spec) for s in specs] == [
        ("base", "default"),
        ("sft", "runs/demo/sft/"),
        ("default", "default"),
    ]
    with pytest.raises(CaitoolError, match='"sft" is given twice'):
        parse_model_specs(["sft=a", "sft=b"])


# ---------------------------------------------------------------------------
# The whole run on scripted models


def options_text(conversation):
    """The (A) and (B) answers of the labeller's question, read back from its last user turn."""
    question = [m for m in conversation if m.role == "user"][-1].content
    match = re.search(r"\(A\) (.*)\n\(B\) (.*)\n\nAnswer", question, re.S)
    return match.group(1), match.group(2)


def prefers_refusals(conversation, continuations):
    option_a, option_b = options_text(conversation)
    return (
        [-0.1, -2.5]
        if is_refusal(option_a) and not is_refusal(option_b)
        else ([-2.5, -0.1] if is_refusal(option_b) and not is_refusal(option_a) else [-0.69, -0.69])
    )


def always_a(conversation, continuations):
    return [-0.1, -2.5]


@pytest.fixture()
def eval_prompts(tmp_path):
    red = tmp_path / "red_team.jsonl"
    red.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "prompt": f"harmful ask {i}", "category": "x"}) + "\n"
            for i in range(6)
        )
    )
    helpful = tmp_path / "helpful.jsonl"
    helpful.write_text(
        "".join(json.dumps({"id": f"h{i}", "prompt": f"kind ask {i}"}) + "\n" for i in range(4))
    )
    return red, helpful


def scripted_models(judge_scores, loads):
    """base always complies; safe refuses red-team prompts and answers helpful ones."""

    def load(spec):
        loads.append(spec)
        if spec == "safe-dir":
            return ScriptedBackend(
                reply=lambda c, i, s: REFUSAL if "harmful" in c[-1].content else "Happy to help!"
            )
        if spec == "judge-dir":
            return ScriptedBackend(scores=judge_scores)
        return ScriptedBackend(reply=lambda c, i, s: COMPLIANCE)

    return load


def test_eval_measures_refusals_rewards_and_win_rates(eval_prompts, tmp_path):
    red, helpful = eval_prompts
    out = tmp_path / "eval"
    loads = []
    result = run_eval(
        [red, helpful],
        ["base=base-dir", "safe=safe-dir"],
        out,
        rm="rm-dir",
        judge="judge-dir",
        load_backend=scripted_models(prefers_refusals, loads),
        make_reward_scorer=lambda rm: lambda pairs: [1.0 if is_refusal(text) else -1.0 for _, text in pairs],
    )
    per = {(s.prompt_set, s.model_name): s for s in result.models}
    assert per[("red_team", "base")].refusal_rate == 0.0 and per[("red_team", "safe")].refusal_rate == 1.0
    assert per[("helpful", "safe")].refusal_rate == 0.0  # harmless without being evasive
    assert per[("red_team", "safe")].mean_reward == 1.0 and per[("red_team", "base")].mean_reward == -1.0
    assert per[("red_team", "base")].mean_words == len(COMPLIANCE.split())
    pairs = {p.prompt_set: p for p in result.pairs}
    assert (pairs["red_team"].model_a, pairs["red_team"].model_b) == ("safe", "base")  # the later model first
    assert pairs["red_team"].wins == 6 and pairs["red_team"].losses == 0 and pairs["red_team"].win_rate == 1.0
    assert pairs["red_team"].win_rate_ci == wilson_interval(6, 6)
    assert pairs["red_team"].order_consistency == 1.0
    assert pairs["helpful"].ties == 4  # neither answer refuses: the judge has no preference

    answers = lines(out / "generations.jsonl")
    assert len(answers) == (6 + 4) * 2 and all(a["kind"] == "eval_answer" for a in answers)
    assert answers[0]["category"] == "x" and answers[0]["refused"] is False and answers[0]["reward"] == -1.0
    judgements = lines(out / "judgements.jsonl")
    assert len(judgements) == 6 + 4 and all(j["p_swapped"] is not None for j in judgements)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt_sets"] == ["red_team", "helpful"] and len(summary["per_model"]) == 4
    assert summary["pairwise"][0]["win_rate"] == 1.0
    manifest = json.loads((out / "caitool_manifest.json").read_text())
    assert manifest["phase"] == "eval" and manifest["counts"] == {"answers": 20, "judgements": 10}
    assert sorted(loads) == ["base-dir", "judge-dir", "safe-dir"]


def test_position_bias_cancels_out_when_both_orders_are_asked(eval_prompts, tmp_path):
    red, _ = eval_prompts
    result = run_eval(
        [red],
        ["base=base-dir", "safe=safe-dir"],
        tmp_path / "eval",
        judge="judge-dir",
        load_backend=scripted_models(always_a, []),
    )
    pair = result.pairs[0]
    assert pair.ties == 6 and pair.win_rate == 0.5 and pair.order_consistency == 0.0
    biased = run_eval(
        [red],
        ["base=base-dir", "safe=safe-dir"],
        tmp_path / "eval2",
        judge="judge-dir",
        config=EvalConfig(swap=False),
        load_backend=scripted_models(always_a, []),
    )
    assert biased.pairs[0].wins == 6 and biased.pairs[0].order_consistency is None


def test_the_judge_can_score_each_answer_alone(eval_prompts, tmp_path):
    def yes_to_refusals(conv, conts):
        assert list(conts) == [" Yes", " No"]
        refused = f"Assistant: {REFUSAL}" in conv[-2].content
        return [math.log(0.9), math.log(0.1)] if refused else [math.log(0.1), math.log(0.9)]

    red, _ = eval_prompts
    out = tmp_path / "eval"
    result = run_eval(
        [red],
        ["base=base-dir", "safe=safe-dir"],
        out,
        judge="judge-dir",
        config=EvalConfig(judge_mode="score"),
        load_backend=scripted_models(yes_to_refusals, []),
    )
    assert result.pairs[0].wins == 6 and result.pairs[0].order_consistency is None
    assert all(j["p_swapped"] is None for j in lines(out / "judgements.jsonl"))


def test_an_unknown_judge_mode_is_refused():
    with pytest.raises(
        CaitoolError,
        match="--judge-mode must be one of logprob, cot, score, verdict, verdict-cot, verdict-score, "
        'got "vote"',
    ):
        EvalConfig(judge_mode="vote")  # type: ignore[arg-type]


def test_rerun_reuses_finished_generations(eval_prompts, tmp_path):
    red, _ = eval_prompts
    loads = []
    for _ in range(2):
        run_eval(
            [red],
            ["base=base-dir", "safe=safe-dir"],
            tmp_path / "eval",
            judge="judge-dir",
            load_backend=scripted_models(prefers_refusals, loads),
        )
    assert loads.count("base-dir") == 1 and loads.count("safe-dir") == 1 and loads.count("judge-dir") == 2
    run_eval(
        [red],
        ["base=base-dir", "safe=safe-dir"],
        tmp_path / "eval",
        judge="judge-dir",
        config=EvalConfig(max_new_tokens=7),
        load_backend=scripted_models(prefers_refusals, loads),
    )
    assert loads.count("base-dir") == 2  # other sampling settings: generated again


def test_one_model_gets_no_pairwise_comparison(eval_prompts, tmp_path):
    red, _ = eval_prompts
    loads = []
    result = run_eval(
        [red], ["base-dir"], tmp_path / "eval", load_backend=scripted_models(prefers_refusals, loads)
    )
    assert result.pairs == [] and loads == ["base-dir"]
    assert (tmp_path / "eval" / "judgements.jsonl").read_text() == ""


# ---------------------------------------------------------------------------
# Through the CLI, on the tiny model


def test_eval_cli_on_tiny_models_prints_the_tables(tiny_model_dir, eval_prompts, tmp_path):
    red, helpful = eval_prompts
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "eval",
            str(red),
            str(helpful),
            "-m",
            f"one={tiny_model_dir}",
            "-m",
            f"two={tiny_model_dir}",
            "--judge",
            str(tiny_model_dir),
            "--max-new-tokens",
            "4",
            "--temperature",
            "1.0",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Answers per model" in result.stdout and "two vs one" in result.stdout
    judgements = lines(out / "judgements.jsonl")
    assert len(judgements) == 10 and all(0.0 <= j["p_a"] <= 1.0 for j in judgements)
    assert json.loads((out / "summary.json").read_text())["pairwise"][0]["n"] == 6


def test_eval_cli_scores_answers_with_a_reward_model_directory(tiny_model_dir, eval_prompts, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm)
    red, _ = eval_prompts
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "eval",
            str(red),
            "-m",
            f"tiny={tiny_model_dir}",
            "--rm",
            str(rm),
            "--max-new-tokens",
            "4",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    answers = lines(out / "generations.jsonl")
    assert len(answers) == 6 and all(isinstance(a["reward"], float) for a in answers)
    manifest = json.loads((out / "caitool_manifest.json").read_text())
    assert manifest["models"]["rm"]["sha256"] and manifest["models"]["tiny"]["sha256"]


def test_bad_prompt_file_is_one_line_and_writes_nothing(tmp_path, eval_prompts):
    red, _ = eval_prompts
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "?"}\n')
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", str(red), str(bad), "-m", "default", "-o", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f'error: {bad}:2: missing field "prompt" (or "messages")']
    assert not out.exists()


def test_duplicate_model_names_are_refused(tmp_path, eval_prompts):
    red, _ = eval_prompts
    result = runner.invoke(app, ["eval", str(red), "-m", "a=x", "-m", "a=y", "-o", str(tmp_path / "e")])
    assert result.exit_code == 2 and "given twice" in result.output


def test_a_retrained_model_under_the_same_path_is_generated_again(tiny_model_dir, eval_prompts, tmp_path):
    red, _ = eval_prompts
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    loads = []

    def load(spec):
        loads.append(spec)
        return ScriptedBackend()

    run_eval([red], [f"m={model}"], tmp_path / "eval", load_backend=load)
    run_eval([red], [f"m={model}"], tmp_path / "eval", load_backend=load)
    assert len(loads) == 1
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")  # stands in for a retrained model
    run_eval([red], [f"m={model}"], tmp_path / "eval", load_backend=load)
    assert len(loads) == 2
    run_eval([red], [f"m={model}"], tmp_path / "eval", runtime=Runtime(resume=False), load_backend=load)
    assert len(loads) == 3


@pytest.mark.slow
def test_eval_on_the_default_model(examples_dir, tmp_path):
    prompts = tmp_path / "red.jsonl"
    prompts.write_text("".join((examples_dir / "eval_red_team.jsonl").read_text().splitlines(True)[:2]))
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "eval",
            str(prompts),
            "-m",
            "base=default",
            "-m",
            "sampled=default",
            "--max-new-tokens",
            "16",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [m["n"] for m in summary["per_model"]] == [2, 2] and summary["pairwise"][0]["n"] == 2
    judgements = lines(out / "judgements.jsonl")
    # the same greedy answers from the same model: every comparison is a tie
    assert all(j["winner"] == "tie" for j in judgements)


# ---------------------------------------------------------------------------
# Labelled prompt sets: harmful compliance and over-refusal


@pytest.fixture()
def labelled_prompts(tmp_path):
    """Six harmful requests (two categories) and four safe ones that sound unsafe."""
    path = tmp_path / "labelled.jsonl"
    rows = [
        {
            "id": f"u{i}",
            "prompt": f"harmful ask {i}",
            "expect": "refuse",
            "category": "weapons" if i < 4 else "fraud",
        }
        for i in range(6)
    ] + [
        {"id": f"s{i}", "prompt": f"kill a process {i}", "expect": "comply", "category": "homonyms"}
        for i in range(4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answers_by_spec(spec):
    """base answers everything, wall refuses everything, careful refuses harm and half-helps one safe ask."""
    replies = {
        "base-dir": lambda c, i, s: COMPLIANCE,
        "wall-dir": lambda c, i, s: REFUSAL,
        "careful-dir": lambda c, i, s: (
            REFUSAL
            if "harmful" in c[-1].content
            else (PARTIAL if c[-1].content.endswith("0") else "Run `kill PID` in a terminal.")
        ),
    }
    return ScriptedBackend(reply=replies[spec])


PARTIAL = (
    "I can't help end a person's life. However, here's how to stop a program: find its process id "
    "with ps and send it a signal with kill."
)


def test_a_labelled_set_reports_harmful_compliance_and_over_refusal_per_model(labelled_prompts, tmp_path):
    from rich.console import Console

    from caitool.display import show_eval

    out = tmp_path / "eval"
    result = run_eval(
        [labelled_prompts],
        ["base=base-dir", "wall=wall-dir", "careful=careful-dir"],
        out,
        judge=None,
        load_backend=answers_by_spec,
    )
    per = {s.model_name: s for s in result.models}
    assert (per["base"].harmful_compliance, per["base"].over_refusal) == (1.0, 0.0)
    assert (per["wall"].harmful_compliance, per["wall"].over_refusal) == (0.0, 1.0)  # refusing all looks bad
    careful = per["careful"]
    assert (careful.harmful_compliance, careful.over_refusal, careful.safe_partial) == (0.0, 0.0, 0.25)
    assert careful.refusal_rate == 0.7 and careful.partial_rate == 0.1
    assert (careful.n_expect_refuse, careful.n_expect_comply) == (6, 4)
    assert per["wall"].over_refusal_ci == wilson_interval(4, 4)
    assert per["base"].harmful_compliance_ci == wilson_interval(6, 6)
    categories = {c["category"]: c for c in per["base"].categories}
    assert categories["weapons"]["n"] == 4 and categories["fraud"]["harmful_compliance"] == 1.0
    assert (
        categories["homonyms"]["over_refusal"] == 0.0 and categories["homonyms"]["harmful_compliance"] is None
    )

    answers = {(a["model_name"], a["prompt_id"]): a for a in lines(out / "generations.jsonl")}
    assert answers[("careful", "s0")]["answer_class"] == "partial" and answers[("careful", "s0")]["refused"]
    assert answers[("base", "u1")]["expect"] == "refuse" and answers[("base", "u1")]["category"] == "weapons"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["refusal_classifier"]["counted"] == "patterns"
    wall = next(m for m in summary["per_model"] if m["model_name"] == "wall")
    assert wall["over_refusal"] == 1.0 and wall["over_refusal_ci"] == list(wilson_interval(4, 4))

    console = Console(record=True, width=200)
    show_eval(result, console)
    text = console.export_text()
    assert "harmful compliance" in text and "over-refusal" in text and "wall / homonyms" in text
    assert "refusals classified by: patterns" in text


def test_the_refusal_judge_classifies_every_answer_and_the_summary_says_so(labelled_prompts, tmp_path):
    from tests.test_refusals import letter_scores

    judge = ScriptedBackend(
        scores=letter_scores({"Sure!": "refuse"})
    )  # a judge that disagrees with the patterns
    loads = []

    def load(spec):
        loads.append(spec)
        return judge if spec == "refusal-judge-dir" else answers_by_spec(spec)

    out = tmp_path / "eval"
    result = run_eval(
        [labelled_prompts],
        ["base=base-dir"],
        out,
        judge=None,
        refusal_judge="refusal-judge-dir",
        load_backend=load,
    )
    (base,) = result.models
    assert base.classified_by == "judge" and base.harmful_compliance == 0.0 and base.refusal_rate == 1.0
    answers = lines(out / "generations.jsonl")
    assert all(a["answer_class"] == "refuse" and a["pattern_class"] == "comply" for a in answers)
    assert all(a["classified_by"] == "judge" and a["judge_class_probs"]["refuse"] > 0.8 for a in answers)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["refusal_classifier"] == {
        "counted": "judge",
        "judge": "refusal-judge-dir",
        "model": judge.describe(),
    }
    assert loads == ["base-dir", "refusal-judge-dir"]


def test_eval_reads_an_xstest_style_csv_with_a_value_map(tiny_model_dir, tmp_path):
    from tests.test_prompt_sets import XSTEST_ROWS, write_xstest_style_csv

    csv_path = write_xstest_style_csv(tmp_path / "xstest_prompts.csv", XSTEST_ROWS)
    out = tmp_path / "eval"
    arguments = ["eval", str(csv_path), "-m", f"tiny={tiny_model_dir}", "--judge", "none", "-o", str(out)]
    arguments += ["--max-new-tokens", "4", "--expect-field", "label", "--category-field", "type"]
    result = runner.invoke(app, [*arguments, "--expect-map", "safe=comply unsafe=refuse"])
    assert result.exit_code == 0, result.output
    assert "Labelled prompts" in result.stdout  # the table of both axes is printed
    answers = lines(out / "generations.jsonl")
    assert [(a["prompt_id"], a["expect"], a["category"]) for a in answers] == [
        ("1", "comply", "homonyms"),
        ("2", "refuse", "contrast_homonyms"),
        ("3", "comply", "homonyms"),
    ]
    (summary,) = json.loads((out / "summary.json").read_text())["per_model"]
    assert summary["prompt_set"] == "xstest_prompts" and (
        summary["n_expect_refuse"],
        summary["n_expect_comply"],
    ) == (1, 2)

    unmapped = runner.invoke(app, arguments + ["-o", str(tmp_path / "other")])
    assert unmapped.exit_code == 2 and "row 1" in unmapped.output and "--expect-map" in unmapped.output
    assert not (tmp_path / "other").exists()


def test_one_model_as_both_judges_is_loaded_once(labelled_prompts, tmp_path):
    from tests.test_refusals import letter_scores

    loads = []

    def load(spec):
        loads.append(spec)
        if spec == "judge-dir":
            return ScriptedBackend(scores=letter_scores({}))
        return answers_by_spec(spec)

    result = run_eval(
        [labelled_prompts],
        ["base=base-dir", "wall=wall-dir"],
        tmp_path / "eval",
        judge="judge-dir",
        refusal_judge="judge-dir",
        load_backend=load,
    )
    assert loads == ["base-dir", "wall-dir", "judge-dir"]
    assert all(m.classified_by == "judge" for m in result.models) and result.pairs[0].n == 10


def test_eval_rewards_of_texts_over_the_reward_models_training_length_are_cut_and_counted(
    tiny_model_dir, eval_prompts, tmp_path
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm)
    (rm / "caitool_manifest.json").write_text(json.dumps({"phase": "train-rm", "params": {"max_length": 8}}))
    red, _ = eval_prompts
    out = tmp_path / "eval"
    options = ["-m", f"tiny={tiny_model_dir}", "--rm", rm, "--max-new-tokens", 4, "-o", out]
    result = runner.invoke(app, ["eval", str(red), *map(str, options)])
    assert result.exit_code == 0, result.output
    assert "6 scored texts were longer than the reward model's 8 tokens and were cut from the left" in (
        result.output
    )


# ---------------------------------------------------------------------------
# A hosted chat API as the judge (tests/hosted_stub.py), every model served by it


@pytest.mark.parametrize(("kind", "extra"), [("openai", []), ("plain", ["--judge-samples", "5"])])
def test_eval_with_a_hosted_judge_in_verdict_mode(eval_prompts, tmp_path, kind, extra):
    from tests.hosted_stub import GOOD_MARKER, HostedStub

    red, _ = eval_prompts
    out = tmp_path / "eval"
    replies = {"polite": f"I would {GOOD_MARKER} rather not.", "rude": "Do it yourself."}
    with HostedStub(kind, confidence=0.95, replies=replies) as stub:
        result = runner.invoke(
            app,
            ["eval", str(red), "-m", "rude=openai:rude", "-m", "polite=openai:polite", "-o", str(out)]
            + ["--judge", "openai:judge", "--judge-mode", "verdict", "--base-url", stub.url, *extra],
        )
        judge_bodies = [b for b in stub.posted("/v1/chat/completions") if b["model"] == "judge"]
    assert result.exit_code == 0, result.output
    assert all("continue_final_message" not in b for b in judge_bodies)
    judgements = lines(out / "judgements.jsonl")
    assert len(judgements) == 6 and all(j["winner"] == "a" for j in judgements)  # polite (given later) wins
    assert all(j["samples"] == (5 if extra else None) for j in judgements)
    usage = json.loads((out / "summary.json").read_text())["judge_usage"]
    assert usage["answers"] == (60 if extra else 12) and usage["unparseable_answers"] == 0
    if kind == "openai":
        accepted = [b for b in judge_bodies if "max_completion_tokens" in b]
        assert usage["prompt_tokens"] > 0 and len(accepted) == 12  # after the 400 on max_tokens
