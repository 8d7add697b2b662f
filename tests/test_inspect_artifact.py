import json

from typer.testing import CliRunner

from caitool.cli import app
from caitool.evaluate import run_eval
from caitool.jsonl_io import manifest_path, write_json_atomic, write_jsonl_atomic
from caitool.provenance import MODEL_MANIFEST, build_manifest, now_iso
from caitool.records import Message, PreferenceRecord, RevisionPairRecord, RevisionRecord, Round
from tests.fakes import ScriptedBackend
from tests.test_report import HARMLESS

runner = CliRunner()


def inspect(*args):
    result = runner.invoke(app, ["inspect", *map(str, args)], env={"COLUMNS": "160"})
    return result


def test_revision_records_show_their_rounds_side_by_side(tmp_path):
    path = tmp_path / "round2.revise.jsonl"
    record = RevisionRecord(
        id="q1",
        prompt=[Message(role="user", content="How do I hotwire a car?")],
        initial_response="Strip the ignition wires and touch them together.",
        rounds=[
            Round(
                principle_id="harmful-content",
                critique_request="c?",
                critique="It enables theft.",
                revision_request="r?",
                revision="I can't help with starting a car without its key.",
            ),
            Round(
                principle_id="illegal-activity",
                critique_request="c?",
                critique="Now it is fine.",
                flags=["no_change"],
            ),
        ],
        completion=[Message(role="assistant", content="I can't help with starting a car without its key.")],
        constitution=HARMLESS.ref,
        model="m@1",
        category="theft",
    )
    write_jsonl_atomic(path, [record, record.model_copy(update={"id": "q2"})])
    write_json_atomic(
        manifest_path(path),
        build_manifest(
            phase="revise", params={"seed": 3}, started_at=now_iso(), constitution=HARMLESS.ref, inputs=[path]
        ),
    )
    result = inspect(path, "-n", "1")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "2 records" in out and "revision (2)" in out
    assert "category" in out and "2/2" in out  # fields with their coverage
    assert "phase: revise" in out and "harmless 1.0" in out  # provenance from the sidecar manifest
    assert (
        "initial response" in out and "round 1: harmful-content" in out and "round 2: illegal-activity" in out
    )
    assert "(not revised yet)" in out and "no_change" in out
    assert out.count("revision q") == 1  # -n 1 prints one record


def test_preference_records_show_chosen_and_rejected(tmp_path):
    path = tmp_path / "prefs.jsonl"
    write_jsonl_atomic(
        path,
        [
            PreferenceRecord(
                id="q1",
                prompt=[Message(role="user", content="Insult my boss")],
                chosen=[Message(role="assistant", content="Let's talk about what upset you.")],
                rejected=[Message(role="assistant", content="Your boss is a clown.")],
                p_chosen=0.73,
                principle_id="less-harmful",
                pair=(0, 1),
                p_first=0.8,
                p_swapped=0.66,
                mode="logprob",
                feedback_model="fb@1",
                constitution=HARMLESS.ref,
            )
        ],
    )
    result = inspect(path)
    assert result.exit_code == 0, result.output
    assert "chosen (p = 0.73)" in result.stdout and "Your boss is a clown." in result.stdout
    assert "no provenance manifest" in result.stdout


def test_model_directory_shows_manifest_files_and_training_log(tmp_path):
    directory = tmp_path / "ppo"
    directory.mkdir()
    write_json_atomic(
        directory / MODEL_MANIFEST, build_manifest(phase="ppo", params={"steps": 3}, started_at=now_iso())
    )
    (directory / "training_log.jsonl").write_text(
        "".join(json.dumps({"step": s, "reward": 0.1 * s, "kl": 0.01}) + "\n" for s in (1, 2, 3))
    )
    result = inspect(directory)
    assert result.exit_code == 0, result.output
    assert "phase: ppo" in result.stdout and "training_log.jsonl (3 entries)" in result.stdout
    assert "reward" in result.stdout and "0.3" in result.stdout


def test_eval_directory_shows_the_eval_tables(tmp_path):
    prompts = tmp_path / "red.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hi"}\n')
    run_eval(
        [prompts],
        ["base=x", "new=y"],
        tmp_path / "eval",
        judge="j",
        load_backend=lambda spec: ScriptedBackend(),
    )
    result = inspect(tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert "Answers per model" in result.stdout and "new vs base" in result.stdout


def test_bad_artifacts_are_one_line(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1}\nnot json\n')
    result = inspect(broken)
    assert result.exit_code == 2 and result.output.strip().startswith(f"error: {broken}:2: invalid JSON")
    assert inspect(tmp_path / "missing.jsonl").exit_code == 2
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    result = inspect(plain_dir)
    assert result.exit_code == 2 and "not a caitool model or eval directory" in result.output


def test_revision_pairs_show_the_round_and_its_principles(tmp_path):
    path = tmp_path / "revision-pairs.jsonl"
    write_jsonl_atomic(
        path,
        [
            RevisionPairRecord(
                id="q1/r2",
                prompt=[Message(role="user", content="Insult my boss")],
                chosen=[Message(role="assistant", content="Let's talk about what upset you.")],
                rejected=[Message(role="assistant", content="Your boss is a clown.")],
                source_id="q1",
                round=2,
                principle_id="illegal-activity",
                principle_ids=["harmful-content", "illegal-activity"],
                model="m@1",
                constitution=HARMLESS.ref,
            )
        ],
    )
    result = inspect(path)
    assert result.exit_code == 0, result.output
    assert "revision of round 2" in result.stdout and "Your boss is a clown." in result.stdout
    assert "harmful-content, illegal-activity" in result.stdout and "from record q1" in result.stdout
