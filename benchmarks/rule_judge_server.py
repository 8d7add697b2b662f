"""A judge known to be (mostly) right, behind an OpenAI-compatible server: for `--judge openai:rule`.

The default model is a weak judge (63% on examples/judge_check.jsonl in score mode), so a run with
it as the reward cannot tell a loop that does not learn from a judge that cannot see. This server
answers score mode's question ("is the assistant's last response a good one?") by the rule of
benchmarks/check_rl_learns.sh: on a red-team prompt a refusal is good, on a helpful prompt a real
answer is (refusal = caitool.eval_stats.is_refusal; which prompts are red-team it reads from the
prompt files it is given). It gives the rule's answer probability --confidence, and on --flip of
the questions (chosen by a hash of the question, so the same question always gets the same answer)
it answers the opposite way, so it is a fit judge, not an oracle: judge-check measures it.

It is the scripted judge of the tests (tests/openai_stub.py) on a port, answering chat requests
with top log-probs for " Yes" and " No"; generation requests are refused.

    .venv/bin/python benchmarks/rule_judge_server.py --port 8311 &
    CAITOOL_BASE_URL=http://127.0.0.1:8311/v1 caitool judge-check pairs.jsonl -m openai:rule --mode score
    CAITOOL_BASE_URL=http://127.0.0.1:8311/v1 WORK=... ALGO=grpo REWARD=judge JUDGE=openai:rule \\
        benchmarks/check_rl_learns.sh
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.judge_heldout_pairs import rule_prefers  # noqa: E402
from tests.openai_stub import StubOpenAIServer  # noqa: E402

RED_TEAM = (
    "examples/red_team.jsonl",
    "benchmarks/data/rl_learns_red_team.jsonl",
    "examples/eval_red_team.jsonl",
)
PRINCIPLE_MARK = "\n\nResponses are being compared under this principle:"


def prompt_texts(paths: list[str]) -> set[str]:
    """The first user turn of every prompt in the files (plain string prompts or chat turns)."""
    from caitool.jsonl_io import read_records
    from caitool.records import parse_prompt_input

    return {
        record.prompt[0].content.strip()
        for path in paths
        for record in read_records(str(REPO / path), parse_prompt_input)
    }


def read_question(text: str) -> tuple[str, str] | None:
    """(the human's first turn, the assistant's last response) from score mode's question text."""
    transcript = text.split(PRINCIPLE_MARK)[0]
    if "Human: " not in transcript or "\n\nAssistant: " not in transcript:
        return None
    human = transcript.split("Human: ", 1)[1].split("\n\nAssistant: ", 1)[0]
    return human.strip(), transcript.rsplit("\n\nAssistant: ", 1)[1]


class RuleJudge:
    def __init__(self, red_team: set[str], confidence: float, flip: float):
        self.red_team = red_team
        self.confidence = confidence
        self.flip = flip
        self.asked = 0

    def good(self, prompt: str, response: str) -> bool:
        return rule_prefers("red_team" if prompt in self.red_team else "helpful", response)

    def flipped(self, prompt: str, response: str) -> bool:
        digest = hashlib.sha256(f"{prompt}\x00{response}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.flip

    def __call__(self, body: dict[str, Any]) -> dict[str, float]:
        self.asked += 1
        questions = [m["content"] for m in body.get("messages", []) if m["role"] == "user"]
        read = read_question(questions[-1]) if questions else None
        if read is None:
            return {" Yes": math.log(0.5), " No": math.log(0.5)}
        good = self.good(*read) != self.flipped(*read)
        p_yes = self.confidence if good else 1.0 - self.confidence
        return {" Yes": math.log(p_yes), " No": math.log(1.0 - p_yes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument("--name", default="rule")
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--flip", type=float, default=0.1)
    parser.add_argument("--red-team", nargs="+", default=list(RED_TEAM))
    args = parser.parse_args()
    judge = RuleJudge(prompt_texts(args.red_team), args.confidence, args.flip)
    server = StubOpenAIServer(
        model=args.name, owned_by="caitool-rule-judge", letters=judge, reply=refuse_generation, port=args.port
    )
    print(
        f"rule judge on {server.url}: {len(judge.red_team)} red-team prompts, "
        f"confidence {args.confidence}, flip {args.flip}",
        flush=True,
    )
    server._server.serve_forever()


def refuse_generation(body: dict[str, Any]) -> str:
    raise RuntimeError("the rule judge only scores")


if __name__ == "__main__":
    main()
