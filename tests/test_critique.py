import json

from typer.testing import CliRunner

from caitool.backends import SamplingParams
from caitool.cli import app
from caitool.constitution import load_constitution
from caitool.critique import run_critique
from caitool.jsonl_io import manifest_path
from caitool.pipeline import Runtime
from caitool.prompts import critique_conversation, pick_examples, revision_conversation
from caitool.records import Message
from tests.fakes import ScriptedBackend

runner = CliRunner()
HARMLESS = load_constitution("harmless")


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_prompts(path, count):
    path.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"Question number {i}?"}) + "\n" for i in range(count))
    )
    return path


def critique_cli(*args):
    return runner.invoke(app, ["critique", *map(str, args)])


def test_plain_prompts_get_an_initial_response_and_a_critique(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "c.jsonl"
    result = critique_cli(
        prompts_file, "-o", out, "--model", tiny_model_dir, "--max-new-tokens", 6, "--seed", 1
    )
    assert result.exit_code == 0, result.output
    records = lines(out)
    assert [r["id"] for r in records][0] == "a" and len(records) == 3
    for record in records:
        assert record["kind"] == "revision"
        assert record["completion"] == [{"role": "assistant", "content": record["initial_response"]}]
        assert record["constitution"] == HARMLESS.ref.model_dump()
        (only_round,) = record["rounds"]
        principle = HARMLESS.critique(only_round["principle_id"])
        assert only_round["critique_request"] == principle.critique
        assert only_round["revision"] is None and isinstance(only_round["critique"], str)
        assert only_round["model"] == record["model"]
    assert records[0]["category"] == "cooking"
    assert len(records[2]["prompt"]) == 3
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["phase"] == "critique" and manifest["constitution"]["hash"] == HARMLESS.content_hash
    assert manifest["counts"]["initial_responses_generated"] == 3
    assert "critique: 3 records" in result.output


def test_seed_fixes_principle_draws_and_samples(tiny_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 10)
    texts = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        out = tmp_path / f"{name}.jsonl"
        args = [prompts, "-o", out, "--model", tiny_model_dir, "--max-new-tokens", 5, "--seed", seed]
        assert critique_cli(*args).exit_code == 0
        texts[name] = out.read_text()
    assert texts["a"] == texts["b"]
    draws = {
        name: [r["rounds"][0]["principle_id"] for r in map(json.loads, text.splitlines())]
        for name, text in texts.items()
    }
    assert draws["a"] != draws["c"]


def test_principle_draw_does_not_depend_on_batching(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 12)
    draws = []
    for batch_size in (1, 8):
        out = tmp_path / f"b{batch_size}.jsonl"
        run_critique(
            prompts,
            out,
            backend=ScriptedBackend(parallelism=batch_size),
            runtime=Runtime(seed=3),
        )
        draws.append([r["rounds"][0]["principle_id"] for r in lines(out)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 3


def test_principle_option_restricts_the_draw(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 10)
    out = tmp_path / "c.jsonl"
    run_critique(prompts, out, backend=ScriptedBackend(), principles=["racism", "sexism"])
    assert {r["rounds"][0]["principle_id"] for r in lines(out)} == {"racism", "sexism"}


def test_a_response_in_the_input_is_critiqued_as_is(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"id": "x", "prompt": "Hi", "completion": "Go away.", "category": "rude"}) + "\n"
    )
    backend = ScriptedBackend(reply=lambda conv, i, seed: "The response is rude to the user.")
    out = tmp_path / "c.jsonl"
    run_critique(source, out, backend=backend)
    (record,) = lines(out)
    assert record["initial_response"] == "Go away." and record["category"] == "rude"
    assert record["rounds"][0]["critique"] == "The response is rude to the user."
    assert backend.calls == [("generate", 1)]  # critiques only: no response was generated


def test_critique_sees_few_shots_then_the_conversation_then_the_request(tmp_path):
    seen = []

    def reply(conv, i, seed):
        seen.append(conv)
        return "Critique: it is fine."

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "Hi", "completion": "Hello."}) + "\n")
    out = tmp_path / "c.jsonl"
    run_critique(source, out, backend=ScriptedBackend(reply=reply), few_shot=1, principles=["sexism"])
    (conversation,) = seen
    example = HARMLESS.few_shot.critique[0]
    assert conversation[: len(example.conversation)] == example.conversation
    assert [m.content for m in conversation[-3:]] == ["Hi", "Hello.", HARMLESS.critique("sexism").critique]
    (record,) = lines(out)
    assert record["rounds"][0]["critique"] == "it is fine."
    assert record["rounds"][0]["flags"] == ["critique-lead-in-stripped"]


def test_prompt_builders_keep_system_turns_first_and_cap_examples():
    principle = HARMLESS.critique("unnecessary-refusal")
    prompt = [Message(role="system", content="Be brief."), Message(role="user", content="Hi")]
    examples = pick_examples(HARMLESS, principle.id, 2)
    assert examples[0].principle == principle.id and len(examples) == 2
    assert pick_examples(HARMLESS, principle.id, 0) == []
    critique = critique_conversation(HARMLESS, principle, prompt, "Hello.", examples)
    assert critique[0].content == "Be brief." and sum(m.role == "system" for m in critique) == 1
    revision = revision_conversation(HARMLESS, principle, prompt, "Hello.", "Too short.", [])
    assert [m.role for m in revision] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert revision[-1].content == principle.revision and revision[-2].content == "Too short."


def test_a_pending_critique_must_be_revised_first(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    first = tmp_path / "c.jsonl"
    run_critique(prompts, first, backend=ScriptedBackend())
    again = tmp_path / "again.jsonl"
    result = critique_cli(first, "-o", again, "--model", "unused")
    assert result.exit_code == 2
    assert "c.jsonl:1" in result.output and "run caitool revise first" in result.output
    assert not again.exists()


def test_unknown_principle_is_one_clear_line(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    out = tmp_path / "c.jsonl"
    result = critique_cli(prompts, "-o", out, "--principle", "no-such-id")
    assert result.exit_code == 2
    assert result.output.strip() == 'error: constitution "harmless" has no critique principle "no-such-id"'
    assert not out.exists()


def test_sampling_params_reach_the_backend(tmp_path):
    class Recording(ScriptedBackend):
        def generate(self, conversations, params, seed):
            self.params = params
            return super().generate(conversations, params, seed)

    backend = Recording()
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "Hi", "completion": "Hello."}) + "\n")
    params = SamplingParams(temperature=0.0, max_new_tokens=7)
    run_critique(source, tmp_path / "c.jsonl", backend=backend, params=params)
    assert backend.params == params
