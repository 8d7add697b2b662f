import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from caitool.backends import SamplingParams
from caitool.cli import app
from caitool.generate import run_generate
from caitool.jsonl_io import manifest_path, part_path
from tests.fakes import ScriptedBackend
from tests.usage_errors import unboxed

runner = CliRunner()


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def generate_args(prompts_file, out, model, *extra):
    return ["generate", str(prompts_file), "-o", str(out), "--model", str(model), *map(str, extra)]


def test_generate_writes_typed_records_with_user_fields_and_manifest(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "out.jsonl"
    result = runner.invoke(
        app,
        [
            "generate",
            str(prompts_file),
            "-o",
            str(out),
            "--model",
            str(tiny_model_dir),
            "-n",
            "2",
            "--max-new-tokens",
            "6",
            "--batch-size",
            "2",
            "--seed",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    records = lines(out)
    assert [r["id"] for r in records][0] == "a" and records[2]["id"] == "c"
    assert all(r["kind"] == "generation" and len(r["responses"]) == 2 for r in records)
    assert records[0]["category"] == "cooking"
    assert records[0]["completion"] == [{"role": "assistant", "content": records[0]["responses"][0]}]
    assert len(records[2]["prompt"]) == 3  # the multi-turn prompt keeps every turn
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["phase"] == "generate" and manifest["params"]["seed"] == 3
    assert manifest["models"]["policy"]["sha256"] and manifest["inputs"][0]["sha256"]
    assert records[0]["model"].endswith(manifest["models"]["policy"]["sha256"][:12])


def test_same_seed_same_output(tiny_model_dir, prompts_file, tmp_path):
    outputs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / f"{name}.jsonl"
        args = generate_args(prompts_file, out, tiny_model_dir, "--max-new-tokens", 8, "--temperature", 1.0)
        assert runner.invoke(app, [*args, "--seed", str(seed)]).exit_code == 0
        outputs.append([r["responses"] for r in lines(out)])
    assert outputs[0] == outputs[1] != outputs[2]


def test_stdout_carries_only_jsonl(tiny_model_dir, prompts_file):
    result = runner.invoke(
        app,
        ["generate", str(prompts_file), "-o", "-", "--model", str(tiny_model_dir), "--max-new-tokens", "4"],
    )
    assert result.exit_code == 0
    assert [json.loads(line)["kind"] for line in result.stdout.splitlines()] == ["generation"] * 3


def test_output_loads_with_datasets(tiny_model_dir, prompts_file, tmp_path):
    import datasets

    out = tmp_path / "out.jsonl"
    runner.invoke(
        app,
        [
            "generate",
            str(prompts_file),
            "-o",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--max-new-tokens",
            "4",
        ],
    )
    dataset = datasets.load_dataset("json", data_files=str(out), split="train")
    assert dataset.num_rows == 3 and dataset[0]["completion"][0]["role"] == "assistant"


BAD_INPUTS = {
    "malformed": (b'{"prompt": "ok"}\n{"prompt": "broken\n', "in.jsonl:2: invalid JSON"),
    "missing": (b'{"prompt": "ok"}\n{"question": "?"}\n', 'in.jsonl:2: missing field "prompt"'),
    "wrong-type": (b'{"prompt": 42}\n', 'in.jsonl:1: field "prompt" must be a string or a list of messages'),
    "empty": (b"", "in.jsonl: no records"),
    "non-utf8": (b'{"prompt": "ok"}\n{"prompt": "\xff\xfe"}\n', "in.jsonl:2: not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_output(case, tmp_path):
    content, expected = BAD_INPUTS[case]
    source = tmp_path / "in.jsonl"
    source.write_bytes(content)
    out = tmp_path / "out.jsonl"
    # The model is never loaded for bad input: a nonexistent model would fail later, not first.
    result = runner.invoke(app, ["generate", str(source), "-o", str(out), "--model", "/nonexistent"])
    assert result.exit_code == 2
    assert expected in result.output and result.output.count("\n") == 1
    assert not out.exists() and not part_path(out).exists()


def test_resume_continues_after_a_crash_without_duplicates(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": f"question {i}"}) + "\n" for i in range(10))
    )
    out = tmp_path / "out.jsonl"
    calls = {"n": 0}

    def crash_on_third_chunk(conversation, i, seed):
        if conversation[-1].content == "question 8":
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt
        return f"answer to {conversation[-1].content}"

    backend = ScriptedBackend(reply=crash_on_third_chunk, parallelism=1)
    with pytest.raises(KeyboardInterrupt):
        run_generate(source, out, params=SamplingParams(), backend=backend)
    assert not out.exists() and len(part_path(out).read_text().splitlines()) == 8
    backend.calls.clear()
    run_generate(source, out, params=SamplingParams(), backend=backend)
    assert sum(n for _, n in backend.calls) == 2  # only the missing records were generated
    assert [r["id"] for r in lines(out)] == [f"r{i}" for i in range(10)]


def test_killed_process_resumes_to_every_id_exactly_once(tiny_model_dir, tmp_path):
    """A real SIGKILL in the middle of a run, then the same command again."""
    source = tmp_path / "in.jsonl"
    count = 400
    source.write_text(
        "".join(json.dumps({"id": f"k{i}", "prompt": f"prompt number {i}"}) + "\n" for i in range(count))
    )
    out = tmp_path / "out.jsonl"
    command = [
        sys.executable,
        "-m",
        "caitool",
        "generate",
        str(source),
        "-o",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--batch-size",
        "1",
        "--max-new-tokens",
        "24",
        "--temperature",
        "1.0",
    ]
    env = {**os.environ, "CAITOOL_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = part_path(out)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if part.exists() and part.stat().st_size > 0 and len(part.read_bytes().splitlines()) >= 8:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    written_before = len(part.read_bytes().splitlines())
    assert 0 < written_before < count and not out.exists()
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    ids = [r["id"] for r in lines(out)]
    assert sorted(ids) == sorted(f"k{i}" for i in range(count)) and len(ids) == len(set(ids))
    assert "resumed from a previous run" in finished.stderr


@pytest.mark.slow
def test_generate_on_the_real_default_model(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"id": "d1", "prompt": "What is the capital of France?"}\n{"id": "d2", "prompt": "Name a fruit."}\n'
    )
    out = tmp_path / "out.jsonl"
    result = runner.invoke(
        app, ["generate", str(source), "-o", str(out), "--max-new-tokens", "12", "--temperature", "0"]
    )
    assert result.exit_code == 0, result.output
    records = lines(out)
    assert [r["id"] for r in records] == ["d1", "d2"]
    assert records[0]["model"].startswith("SmolLM2-135M-Instruct@")
    assert all(r["responses"][0].strip() for r in records)
    assert "Paris" in records[0]["responses"][0]


def test_dtype_is_chosen_on_the_command_line_and_recorded(tiny_model_dir, prompts_file, tmp_path):
    import torch

    from caitool.backends.local import TransformersBackend

    assert TransformersBackend.load(str(tiny_model_dir), dtype="bfloat16").model.dtype == torch.bfloat16
    assert TransformersBackend.load(str(tiny_model_dir)).model.dtype == torch.float32  # auto on a CPU
    out = tmp_path / "bf16.jsonl"
    result = runner.invoke(app, generate_args(prompts_file, out, tiny_model_dir, "--dtype", "bfloat16"))
    assert result.exit_code == 0, result.output
    assert json.loads(manifest_path(out).read_text())["params"]["dtype"] == "bfloat16"

    refused = runner.invoke(
        app, generate_args(prompts_file, tmp_path / "x.jsonl", tiny_model_dir, "--dtype", "int3")
    )
    assert refused.exit_code == 2
    assert "'int3' is not one of 'auto', 'float32', 'bfloat16', 'float16'" in unboxed(refused.output)
    assert not (tmp_path / "x.jsonl").exists()
