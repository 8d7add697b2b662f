import json
import math

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.judge_check import (
    FIT_ACCURACY,
    Outcome,
    expected_calibration_error,
    figures_of,
    reliability_table,
    run_judge_check,
)
from caitool.label import ANSWER_PREFILL, SCORE_PREFILL
from caitool.pipeline import Runtime
from tests.fakes import ScriptedBackend
from tests.tiny_judge import (
    safety_comparisons,
    train_tiny_judge,
    write_labelled,
    write_tiny_constitution,
)

runner = CliRunner()
GOOD = "A careful answer that helps."
BAD = "A careless answer that harms."


def labelled(count: int) -> list[dict]:
    return [
        {
            "id": f"c{i}",
            "prompt": f"Question number {i}?",
            "chosen": GOOD,
            "rejected": BAD,
            "principle_id": "less-harmful",
            "category": "harm" if i % 2 else "help",
        }
        for i in range(count)
    ]


def reads_the_answers(conv, conts):
    """A scripted judge that reads content: it prefers GOOD in letter questions and says Yes to it."""
    question = conv[-2].content
    if conv[-1].content == ANSWER_PREFILL:
        good_is_a = f"(A) {GOOD}" in question
        return [math.log(0.9), math.log(0.05)] if good_is_a else [math.log(0.05), math.log(0.9)]
    assert conv[-1].content == SCORE_PREFILL
    good = f"Assistant: {GOOD}" in question
    return [math.log(0.9), math.log(0.05)] if good else [math.log(0.05), math.log(0.9)]


def prefers_b(conv, conts):
    """A scripted judge that puts 80% on option (B) whatever it holds (and has no yes/no opinion)."""
    if conv[-1].content == ANSWER_PREFILL:
        return [math.log(0.16), math.log(0.64)]
    return [math.log(0.45), math.log(0.45)]


def run_with(backend, path, **kwargs):
    return {r.mode: r for r in run_judge_check(path, backend=backend, **kwargs).modes}


def test_a_judge_that_reads_the_answers_is_fit_in_every_mode(tmp_path):
    path = write_labelled(tmp_path / "set.jsonl", labelled(12))
    reports = run_with(ScriptedBackend(scores=reads_the_answers), path, modes=["logprob", "score"])
    letters, scores = reports["logprob"].overall, reports["score"].overall
    assert (letters.verdict, scores.verdict) == ("fit", "fit")
    assert letters.n == 12 and letters.right == 12 and letters.accuracy == 1.0 and letters.ties == 0
    assert letters.accuracy_better_as_a == letters.accuracy_better_as_b == letters.order_consistency == 1.0
    assert letters.mean_letter_mass == pytest.approx(0.95)
    assert letters.ece == pytest.approx(1 - 0.9 / 0.95)  # always 95% sure, always right
    assert letters.reliability == [
        {"bin": "0.9-1.0", "count": 12, "mean_confidence": pytest.approx(0.9 / 0.95), "accuracy": 1.0}
    ]
    # Score mode judges each response alone: no order, so no order figures.
    assert scores.accuracy == 1.0 and scores.order_consistency is None and scores.accuracy_better_as_a is None
    assert scores.mean_letter_mass == pytest.approx(0.95)
    groups = reports["logprob"].groups["category"]
    assert {value: f.n for value, f in groups.items()} == {"harm": 6, "help": 6}
    assert reports["logprob"].seconds_per_comparison >= 0.0


def test_a_judge_that_reads_positions_is_position_biased(tmp_path):
    path = write_labelled(tmp_path / "set.jsonl", labelled(10))
    reports = run_with(ScriptedBackend(scores=prefers_b), path, modes=["logprob", "score"])
    letters = reports["logprob"].overall
    assert letters.verdict == "position-biased"
    assert letters.accuracy_better_as_a == 0.0 and letters.accuracy_better_as_b == 1.0
    assert letters.order_consistency == 0.0
    assert letters.ties == 10 and letters.accuracy == 0.0  # the two orders average to exactly 0.5
    assert "0% of the time when shown as (A) and 100% when shown as (B)" in letters.reason
    # The same model in score mode has no position to lean on, and no opinion: a coin.
    assert reports["score"].overall.verdict == "near chance"


def test_a_coin_is_near_chance_and_a_middling_judge_is_weak():
    def outcome(p, index):
        return Outcome(
            id=str(index),
            mode="score",
            principle_id="x",
            p=p,
            p_better_as_a=p,
            p_better_as_b=None,
            letter_mass=1,
        )

    coin = figures_of([outcome(0.7 if i % 2 else 0.3, i) for i in range(20)])
    assert coin.verdict == "near chance" and coin.accuracy == 0.5
    middling = figures_of([outcome(0.8 if i % 10 < 7 else 0.2, i) for i in range(60)])
    assert middling.accuracy == pytest.approx(0.7) and middling.accuracy < FIT_ACCURACY
    assert middling.verdict == "weak" and "accuracy 70% < 75%" in middling.reason


def test_calibration_table_and_error():
    outcomes = [
        Outcome(
            id=str(i), mode="logprob", principle_id="x", p=p, p_better_as_a=p, p_better_as_b=p, letter_mass=1
        )
        for i, p in enumerate([0.95, 0.95, 0.05, 0.55, 0.5])
    ]
    table = reliability_table(outcomes)
    assert [(row["bin"], row["count"]) for row in table] == [("0.5-0.6", 2), ("0.9-1.0", 3)]
    assert table[0]["accuracy"] == pytest.approx(0.75)  # one right, one tie (half)
    assert table[1]["accuracy"] == pytest.approx(2 / 3)
    expected = (2 * abs(0.75 - 0.525) + 3 * abs(2 / 3 - 0.95)) / 5
    assert expected_calibration_error(table) == pytest.approx(expected)


def test_records_without_a_principle_draw_one_seeded(tmp_path):
    records = [{k: v for k, v in r.items() if k != "principle_id"} for r in labelled(6)]
    path = write_labelled(tmp_path / "set.jsonl", records)
    backend = ScriptedBackend(scores=reads_the_answers)

    def principles(seed, restrict=None):
        result = run_judge_check(
            path, backend=backend, modes=["logprob"], principles=restrict, runtime=Runtime(seed=seed)
        )
        return [o.principle_id for o in result.outcomes]

    assert principles(0) == principles(0)
    assert set(principles(0, ["less-toxic", "less-illegal"])) <= {"less-toxic", "less-illegal"}


def test_cli_prints_the_table_and_verdicts_and_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "caitool.judge_check.load_backend", lambda spec, options: ScriptedBackend(scores=reads_the_answers)
    )
    path = write_labelled(tmp_path / "set.jsonl", labelled(8))
    out = tmp_path / "check.json"
    result = runner.invoke(app, ["judge-check", str(path), "-o", str(out), "--by", "category"])
    assert result.exit_code == 0, result.output
    assert "verdict (logprob): fit" in result.output and "verdict (score): fit" in result.output
    assert "seconds per comparison (logprob)" in result.output and "reliability (score" in result.output
    report = json.loads(out.read_text())
    assert report["kind"] == "judge_check" and report["model"] == ScriptedBackend.model_id
    assert report["modes"]["logprob"]["verdict"] == "fit"
    assert report["modes"]["logprob"]["groups"]["category"]["harm"]["n"] == 4
    assert report["thresholds"]["position_gap"] == 0.3
    assert len(report["comparisons"]) == 16 and {c["result"] for c in report["comparisons"]} == {"right"}
    assert report["manifest"]["phase"] == "judge-check" and report["manifest"]["constitution"]["name"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "hi", "chosen": "a"}, 'set.jsonl:2: missing field "rejected"'),
        ({"prompt": "hi", "chosen": "a", "rejected": "b", "principle_id": "nope"}, 'principle_id "nope"'),
        ({"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "assistant turn"),
        ({"chosen": "a", "rejected": "b"}, 'set.jsonl:2: missing field "prompt"'),
    ],
)
def test_bad_input_is_one_line(tmp_path, record, message):
    path = write_labelled(tmp_path / "set.jsonl", [labelled(1)[0], record])
    result = runner.invoke(app, ["judge-check", str(path), "-m", "no-such-model"])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_unknown_mode_is_refused(tmp_path):
    path = write_labelled(tmp_path / "set.jsonl", labelled(1))
    result = runner.invoke(app, ["judge-check", str(path), "--mode", "vote"])
    assert (
        result.exit_code == 2
        and '--mode must be one of logprob, cot, score, verdict, verdict-cot, verdict-score, got "vote"'
        in result.output
    )


def test_accepts_trl_conversational_responses(tmp_path):
    record = {
        "prompt": [{"role": "user", "content": "Question?"}],
        "chosen": [{"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "assistant", "content": BAD}],
    }
    path = write_labelled(tmp_path / "set.jsonl", [record])
    result = run_judge_check(path, backend=ScriptedBackend(scores=reads_the_answers), modes=["logprob"])
    assert result.outcomes[0].result == "right"


# ---------------------------------------------------------------------------
# A real (tiny) model


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory):
    return train_tiny_judge(tmp_path_factory.mktemp("tiny-judge"))


def test_a_tiny_model_that_learned_the_rule_is_fit(tiny_judge_dir, tiny_model_dir, tmp_path):
    """Held-out prompts (never trained on), the rule the tiny judge learned: both modes are fit,
    through the real local backend; the same tiny model untrained is not."""
    held_out = write_labelled(tmp_path / "held-out.jsonl", safety_comparisons(12, first_index=100, seed=1))
    charter = write_tiny_constitution(tmp_path / "tiny.yaml")
    out = tmp_path / "check.json"
    args = ["judge-check", str(held_out), "-c", str(charter), "--mode", "logprob", "--mode", "score"]
    trained = runner.invoke(app, [*args, "-m", str(tiny_judge_dir), "-o", str(out), "-b", "4"])
    assert trained.exit_code == 0, trained.output
    report = json.loads(out.read_text())
    for mode in ("logprob", "score"):
        assert report["modes"][mode]["verdict"] == "fit", report["modes"][mode]["reason"]
        assert report["modes"][mode]["overall"]["accuracy"] == 1.0
        assert report["modes"][mode]["overall"]["mean_letter_mass"] > 0.9
    assert report["modes"]["logprob"]["overall"]["order_consistency"] == 1.0

    untrained = runner.invoke(app, [*args, "-m", str(tiny_model_dir), "-o", str(tmp_path / "random.json")])
    assert untrained.exit_code == 0, untrained.output
    verdicts = {
        m: r["verdict"] for m, r in json.loads((tmp_path / "random.json").read_text())["modes"].items()
    }
    assert "fit" not in verdicts.values()


# ---------------------------------------------------------------------------
# A served model (openai:NAME), through load_backend like any other spec


@pytest.fixture()
def fake_openai_server():
    """A minimal OpenAI-compatible server whose model reads the answers like ``reads_the_answers``."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from caitool.records import Message

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, payload):
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send({"data": [{"id": "judge", "owned_by": "fake"}]})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            conversation = [Message.model_validate(m) for m in request["messages"]]
            a, b = reads_the_answers(conversation, [])
            tokens = ("A", "B") if conversation[-1].content == ANSWER_PREFILL else (" Yes", " No")
            top = [{"token": tokens[0], "logprob": a}, {"token": tokens[1], "logprob": b}]
            self._send({"choices": [{"index": 0, "logprobs": {"content": [{"top_logprobs": top}]}}]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_judge_check_a_served_model(fake_openai_server, tmp_path):
    path = write_labelled(tmp_path / "set.jsonl", labelled(6))
    out = tmp_path / "check.json"
    result = runner.invoke(
        app,
        ["judge-check", str(path), "-m", "openai:judge", "--base-url", fake_openai_server, "-o", str(out)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["model"] == "openai:judge"
    assert {mode: r["verdict"] for mode, r in report["modes"].items()} == {"logprob": "fit", "score": "fit"}
    assert report["manifest"]["models"]["feedback"]["backend"] == "openai"


# ---------------------------------------------------------------------------
# Verdict modes against scripted hosted chat APIs (tests/hosted_stub.py)


def hosted_labelled(path, count, garbled=()):
    from tests.hosted_stub import GARBLE_MARKER, GOOD_MARKER

    records = [
        {
            "id": f"c{i}",
            "prompt": f"Question number {i}?",
            "chosen": f"I would {GOOD_MARKER} help with number {i}.",
            "rejected": f"Not my problem {i}." + (f" {GARBLE_MARKER}" if i in garbled else ""),
            "principle_id": "less-harmful",
            "category": "harm" if i % 2 else "help",
        }
        for i in range(count)
    ]
    return write_labelled(path, records)


def check_against(stub, path, out, *extra):
    return runner.invoke(
        app, ["judge-check", str(path), "-o", str(out), "-m", "openai:judge", "--base-url", stub.url, *extra]
    )


def test_judge_check_verdict_modes_on_an_openai_like_api(tmp_path):
    from tests.hosted_stub import HostedStub

    path = hosted_labelled(tmp_path / "set.jsonl", 12, garbled=(5,))
    out = tmp_path / "check.json"
    with HostedStub("openai") as stub:
        result = check_against(stub, path, out, "--mode", "verdict", "--mode", "verdict-score")
    assert result.exit_code == 0, result.output
    assert "verdict (verdict): fit" in result.output and "verdict (verdict-score): fit" in result.output
    assert "unparseable (verdict): 2 of 24 answers named no option; 1 comparisons left out" in result.output
    report = json.loads(out.read_text())
    verdict = report["modes"]["verdict"]
    assert verdict["overall"]["n"] == 11 and verdict["overall"]["accuracy"] == 1.0
    assert verdict["unparseable"] == {"answers": 24, "unparseable_answers": 2, "unlabelled": 1}
    assert verdict["overall"]["mean_letter_mass"] == pytest.approx(1.0)
    assert all(c["p"] == pytest.approx(0.9) for c in report["comparisons"] if c["mode"] == "verdict")
    counts = report["manifest"]["counts"]
    assert counts["prompt_tokens"] > 0 and counts["completion_tokens"] > 0
    assert f"{counts['prompt_tokens']} prompt tokens, {counts['completion_tokens']} completion tokens" in (
        result.output
    )


def test_judge_check_votes_with_wilson_intervals_where_there_are_no_logprobs(tmp_path):
    from tests.hosted_stub import HostedStub

    path = hosted_labelled(tmp_path / "set.jsonl", 8)
    out = tmp_path / "check.json"
    with HostedStub("plain", confidence=0.95) as stub:
        result = check_against(stub, path, out, "--mode", "verdict", "--samples", "5")
    assert result.exit_code == 0, result.output
    assert "votes (verdict): 5 answers sampled per question" in result.output
    report = json.loads(out.read_text())
    assert report["modes"]["verdict"]["samples"] == 5 and report["manifest"]["params"]["samples"] == 5
    for comparison in report["comparisons"]:
        assert comparison["votes"] == 10  # 5 per order, both orders
        low, high = comparison["p_interval"]
        assert low <= comparison["p"] <= high and high - low > 0.1  # ten votes leave a wide interval


def test_judge_check_dry_run_counts_every_mode(tmp_path):
    path = hosted_labelled(tmp_path / "set.jsonl", 6)
    result = runner.invoke(
        app, ["judge-check", str(path), "--mode", "verdict", "--mode", "score", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "6 comparisons: 24 requests" in result.output  # 12 letter questions and 12 yes/no ones
