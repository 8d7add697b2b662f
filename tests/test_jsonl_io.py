import json

import pytest

from caitool.errors import CaitoolError
from caitool.jsonl_io import ResumableWriter, check_input, manifest_path, part_path, read_records
from caitool.records import parse_prompt_input


def write(path, text: bytes | str):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"prompt": "a"}\n{"prompt": \n', "bad.jsonl:2: invalid JSON"),
        (b'{"prompt": "a"}\n\n{"text": "b"}\n', 'bad.jsonl:3: missing field "prompt"'),
        (b"[1, 2]\n", "bad.jsonl:1: expected a JSON object, got list"),
        (b'{"prompt": "caf\xe9"}\n', "bad.jsonl:1: not valid UTF-8"),
        (b"", "bad.jsonl: no records"),
        (b'{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n', 'bad.jsonl:2: duplicate id "x"'),
    ],
)
def test_bad_lines_are_reported_with_file_and_line(tmp_path, content, expected):
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(CaitoolError) as caught:
        check_input(path, parse_prompt_input)
    assert str(caught.value).endswith(expected) or expected in str(caught.value)
    assert str(caught.value).startswith(str(path))


def test_duplicate_prompts_without_ids_get_stable_suffixes(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"prompt": "same"}\n{"prompt": "same"}\n{"prompt": "same"}\n')
    ids = [r.id for r in read_records(path, parse_prompt_input)]
    assert ids[1] == ids[0] + "-2" and ids[2] == ids[0] + "-3"


def test_reading_streams_without_loading_the_whole_file(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"prompt": "a"}\n' * 3 + "not json\n")
    stream = read_records(path, parse_prompt_input)
    assert next(stream).prompt[0].content == "a"  # the bad line is not reached yet


def _records(ids):
    return [parse_prompt_input({"id": i, "prompt": f"p{i}"}) for i in ids]


def test_writer_publishes_atomically_with_manifest(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResumableWriter(out, {"k": 1}) as writer:
        writer.write_batch(_records(["a", "b"]))
        assert not out.exists() and part_path(out).exists()
        writer.manifest = {"phase": "test"}
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]
    assert json.loads(manifest_path(out).read_text()) == {"phase": "test"}
    assert not part_path(out).exists()


def test_writer_resumes_after_a_crash_and_drops_a_torn_line(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with ResumableWriter(out, {"k": 1}) as writer:
            writer.write_batch(_records(["a", "b"]))
            raise RuntimeError("killed")
    with open(part_path(out), "a") as handle:
        handle.write('{"id": "c", "kind": "pro')  # a write cut short by the kill
    with ResumableWriter(out, {"k": 1}) as writer:
        assert writer.done_ids == {"a", "b"}
        writer.write_batch(_records(["c"]))
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b", "c"]


def test_writer_refuses_to_mix_a_partial_output_of_another_command(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with ResumableWriter(out, {"seed": 1}) as writer:
            writer.write_batch(_records(["a"]))
            raise RuntimeError("killed")
    with pytest.raises(CaitoolError, match="differs in: seed"):
        with ResumableWriter(out, {"seed": 2}):
            pass
    with ResumableWriter(out, {"seed": 2}, resume=False) as writer:
        assert writer.done_ids == set()
