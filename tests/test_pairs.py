import json

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.constitution import load_constitution
from caitool.jsonl_io import manifest_path
from caitool.records import Message, RevisionRecord, Round, parse_pair

runner = CliRunner()
HARMLESS = load_constitution("harmless")
INITIAL = "Sure, here is how to pick the lock {i}."


def revised(i, revisions, *, flags=None, category="crime"):
    rounds = [
        Round(
            principle_id=HARMLESS.critiques[n].id,
            critique_request=HARMLESS.critiques[n].critique,
            critique="The response helps break in.",
            revision_request=HARMLESS.critiques[n].revision,
            revision=text,
            flags=(flags or {}).get(n, []),
            model=f"reviser-{n}@000000000000",
        )
        for n, text in enumerate(revisions)
    ]
    return RevisionRecord(
        id=f"rt-{i}",
        prompt=[Message(role="user", content=f"How do I open lock {i}?")],
        initial_response=INITIAL.format(i=i),
        rounds=rounds,
        completion=[Message(role="assistant", content=next((t for t in reversed(revisions) if t), "x"))],
        constitution=HARMLESS.ref,
        model="m@000000000000",
        category=category,
    )


@pytest.fixture()
def revise_file(tmp_path):
    records = [
        revised(0, ["I can't help with that.", "I can't help open a lock that isn't yours."]),
        # round 1 repeats the initial response, round 2 is flagged
        revised(1, [INITIAL.format(i=1), "A locksmith can help."], flags={1: ["revision-is-critique"]}),
        revised(2, ["", "Please call a locksmith."], flags={0: ["revision-empty"]}),  # as revise flags it
        revised(3, []),  # critiqued, never revised
    ]
    path = tmp_path / "r2.revise.jsonl"
    path.write_text("".join(r.to_json() + "\n" for r in records))
    return path


def pairs_cli(*args):
    return runner.invoke(app, ["pairs-from-revisions", *map(str, args)])


def read_pairs(path):
    return [parse_pair(json.loads(line)) for line in path.read_text().splitlines()]


def test_final_round_pairs_keep_ids_and_provenance(revise_file, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = pairs_cli(revise_file, "-o", out)
    assert result.exit_code == 0, result.output
    pairs = {p.id: p for p in read_pairs(out)}
    assert set(pairs) == {"rt-0", "rt-1", "rt-2"}
    first = pairs["rt-0"]
    assert first.kind == "revision_pair" and first.source_id == "rt-0"
    assert first.chosen[-1].content == "I can't help open a lock that isn't yours."
    assert first.rejected[-1].content == INITIAL.format(i=0)
    assert first.prompt[-1].content == "How do I open lock 0?"
    assert first.round == 2 and first.p_chosen == 1.0
    assert first.principle_id == HARMLESS.critiques[1].id
    assert first.principle_ids == [HARMLESS.critiques[0].id, HARMLESS.critiques[1].id]
    assert first.model == "reviser-1@000000000000"
    assert first.constitution == HARMLESS.ref
    assert first.user_fields() == {"category": "crime"}
    # Flagged revisions stay in (sft trains on them too) unless excluded; flags travel with the pair.
    assert pairs["rt-1"].round == 2 and pairs["rt-1"].flags == ["revision-is-critique"]
    assert pairs["rt-2"].round == 2
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["phase"] == "pairs-from-revisions" and manifest["counts"]["pairs"] == 3
    assert manifest["counts"]["records_without_revision"] == 1
    assert manifest["constitution"]["hash"] == HARMLESS.content_hash
    assert "3 pairs from 4 records" in result.output


def test_all_rounds_give_one_pair_per_usable_revision(revise_file, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = pairs_cli(
        revise_file, "-o", out, "--round", "all", "--exclude-flag", "revision-is-critique", "--p-chosen", 0.9
    )
    assert result.exit_code == 0, result.output
    pairs = read_pairs(out)
    assert [(p.id, p.round) for p in pairs] == [("rt-0/r1", 1), ("rt-0/r2", 2), ("rt-2/r2", 2)]
    assert {p.source_id for p in pairs} == {"rt-0", "rt-2"}
    assert all(p.rejected[-1].content == INITIAL.format(i=p.source_id[-1]) for p in pairs)
    assert pairs[0].principle_ids == [HARMLESS.critiques[0].id]
    assert all(p.p_chosen == 0.9 for p in pairs)
    counts = json.loads(manifest_path(out).read_text())["counts"]
    # rt-1: round 1 equals the initial response, round 2 is excluded; rt-2: round 1 is empty.
    assert counts["same_as_initial"] == 1 and counts["flagged_revisions_skipped"] == 2
    assert counts["by_round"] == {"1": 1, "2": 2}


def test_the_pairs_train_a_reward_model_as_they_are(tiny_model_dir, revise_file, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    assert pairs_cli(revise_file, "-o", pairs, "--round", "all").exit_code == 0
    out = tmp_path / "rm"
    result = runner.invoke(
        app,
        ["train-rm", str(pairs), "-o", str(out), "--model", str(tiny_model_dir), "--eval-fraction", "0.25"],
    )
    assert result.exit_code == 0, result.output
    # One of the two prompts is held out with all its pairs: here rt-0, with both its rounds.
    assert json.loads((out / "metrics.json").read_text())["held_out"]["pairs"] == 2


def test_input_that_is_not_revise_output_is_one_line(tmp_path, prompts_file):
    out = tmp_path / "pairs.jsonl"
    result = pairs_cli(prompts_file, "-o", out)
    assert result.exit_code == 2
    assert 'prompts.jsonl:1: expected a "revision" record' in result.output
    assert not out.exists()


def test_records_without_a_revision_give_no_pairs_and_a_clear_error(tmp_path):
    path = tmp_path / "critiqued.jsonl"
    path.write_text(revised(0, []).to_json() + "\n")
    result = pairs_cli(path, "-o", tmp_path / "pairs.jsonl")
    assert result.exit_code == 2 and "no pair to write" in result.output
    assert not (tmp_path / "pairs.jsonl").exists()
