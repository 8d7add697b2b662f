import json

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.constitution import load_constitution
from caitool.critique import run_critique
from caitool.jsonl_io import manifest_path
from caitool.pipeline import Runtime
from caitool.revise import run_revise
from tests.fakes import ScriptedBackend

runner = CliRunner()
HARMLESS = load_constitution("harmless")
REVISION_REQUESTS = {p.revision for p in HARMLESS.critiques}


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def scripted(revision):
    """Critiques are fixed; revisions come from ``revision(previous_response)``."""

    def reply(conv, i, seed):
        if conv[-1].content in REVISION_REQUESTS:
            return revision(conv[-4].content)
        return "The response could be kinder to the user."

    return ScriptedBackend(reply=reply)


@pytest.fixture()
def critiqued(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"id": "x", "prompt": "Hi", "completion": "Go away."})
        + "\n"
        + json.dumps({"id": "y", "prompt": "Hello", "completion": "Leave me alone."})
        + "\n"
    )
    out = tmp_path / "c.jsonl"
    run_critique(source, out, backend=ScriptedBackend(), runtime=Runtime(seed=1))
    return out


def test_three_chained_rounds_keep_the_whole_history(tiny_model_dir, prompts_file, tmp_path):
    current = prompts_file
    common = ["--model", str(tiny_model_dir), "--max-new-tokens", "5", "--few-shot", "1"]
    for round_number in (1, 2, 3):
        critiqued = tmp_path / f"r{round_number}.critique.jsonl"
        result = runner.invoke(app, ["critique", str(current), "-o", str(critiqued), *common])
        assert result.exit_code == 0, result.output
        current = tmp_path / f"r{round_number}.revise.jsonl"
        result = runner.invoke(app, ["revise", str(critiqued), "-o", str(current), *common])
        assert result.exit_code == 0, result.output
    first_round = {r["id"]: r for r in lines(tmp_path / "r1.critique.jsonl")}
    for record in lines(current):
        assert record["initial_response"] == first_round[record["id"]]["initial_response"]
        rounds = record["rounds"]
        assert len(rounds) == 3
        assert len({r["principle_id"] for r in rounds}) == 3  # a fresh principle every round
        for done in rounds:
            principle = HARMLESS.critique(done["principle_id"])
            assert done["critique_request"] == principle.critique
            assert done["revision_request"] == principle.revision
            assert done["revision"] is not None
        usable = [r["revision"] for r in rounds if "revision-empty" not in r["flags"]]
        expected = usable[-1] if usable else record["initial_response"]
        assert record["completion"] == [{"role": "assistant", "content": expected}]
    assert json.loads(manifest_path(current).read_text())["phase"] == "revise"


def test_revision_becomes_the_current_response(critiqued, tmp_path):
    out = tmp_path / "r.jsonl"
    run_revise(critiqued, out, backend=scripted(lambda previous: f"A kinder version of: {previous}"))
    record = lines(out)[0]
    assert record["rounds"][0]["revision"] == "A kinder version of: Go away."
    assert record["completion"][0]["content"] == "A kinder version of: Go away."
    assert record["initial_response"] == "Go away."


def test_revised_records_are_passed_through_and_counted(critiqued, tmp_path):
    once = tmp_path / "once.jsonl"
    run_revise(critiqued, once, backend=scripted(lambda previous: "Please be kind."))
    twice = tmp_path / "twice.jsonl"
    backend = scripted(lambda previous: "never used")
    result = run_revise(once, twice, backend=backend)
    assert lines(twice) == lines(once)
    assert result.counts["skipped_nothing_pending"] == 2 and result.counts["revised"] == 0
    assert backend.calls == []


def test_hygiene_strips_lead_ins_and_flags_failures(critiqued, tmp_path):
    replies = {"Go away.": "", "Leave me alone.": "Sure, here is a revised response: Leave me alone."}
    out = tmp_path / "r.jsonl"
    result = run_revise(critiqued, out, backend=scripted(lambda previous: replies[previous]))
    empty, unchanged = lines(out)
    assert empty["rounds"][0]["flags"] == ["revision-empty"]
    assert empty["completion"][0]["content"] == "Go away."  # an empty revision never becomes the response
    assert unchanged["rounds"][0]["revision"] == "Leave me alone."
    assert unchanged["rounds"][0]["flags"] == ["revision-lead-in-stripped", "revision-unchanged"]
    assert result.counts["revision-empty"] == 1 and result.counts["revision-unchanged"] == 1


def test_input_is_checked_before_the_model_is_loaded(critiqued, tmp_path):
    result = runner.invoke(
        app, ["revise", str(critiqued), "-o", str(tmp_path / "r.jsonl"), "--model", "nope"]
    )
    assert result.exit_code == 2  # the model is checked after the input, so this proves the input was valid
    assert 'model "nope" not found' in result.output


def test_another_constitution_is_a_clear_error(critiqued, tmp_path):
    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["revise", str(critiqued), "-o", str(out), "--constitution", "honest"])
    assert result.exit_code == 2
    assert "c.jsonl:1" in result.output and "critiqued under constitution harmless" in result.output
    assert not out.exists()


def test_prompts_are_not_valid_revise_input(prompts_file, tmp_path):
    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["revise", str(prompts_file), "-o", str(out)])
    assert result.exit_code == 2
    assert 'prompts.jsonl:1: expected a "revision" record' in result.output
    assert not out.exists()


@pytest.mark.slow
def test_two_round_chain_on_the_default_model(tmp_path, examples_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join((examples_dir / "red_team.jsonl").read_text().splitlines(keepends=True)[:2]))
    current = prompts
    options = ["--max-new-tokens", "16", "--few-shot", "1"]
    for round_number in (1, 2):
        critiqued = tmp_path / f"c{round_number}.jsonl"
        assert runner.invoke(app, ["critique", str(current), "-o", str(critiqued), *options]).exit_code == 0
        current = tmp_path / f"r{round_number}.jsonl"
        assert runner.invoke(app, ["revise", str(critiqued), "-o", str(current), *options]).exit_code == 0
    records = lines(current)
    assert len(records) == 2 and all(len(r["rounds"]) == 2 for r in records)
    assert all(r["model"].startswith("SmolLM2-135M-Instruct@") for r in records)
