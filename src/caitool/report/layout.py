"""The run directory ``make demo`` writes, and reading it back.

The step names and output paths below are the Makefile's (``$(call step,NAME)`` and each
command's ``-o``; ``tests/test_report.py`` checks that the two agree). The files inside a step's
output are named by the phase that writes them, so they are imported from it, not repeated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from caitool.errors import CaitoolError

# Files inside a step's output, named by the phase that writes them (the sections read them).
from caitool.evaluate import ANSWERS_FILE as ANSWERS_FILE
from caitool.evaluate import SUMMARY_FILE as SUMMARY_FILE
from caitool.jsonl_io import iter_json_lines, manifest_path, read_records
from caitool.ppo import SAMPLES_FILE as SAMPLES_FILE
from caitool.provenance import MODEL_MANIFEST as MODEL_MANIFEST
from caitool.records import PreferenceRecord, RevisionRecord, parse_record
from caitool.reward import METRICS_FILE as METRICS_FILE
from caitool.training import TRAINING_LOG as TRAINING_LOG

# The Makefile's names, in pipeline order.
PROMPTS = "prompts.jsonl"
BASE = "base.jsonl"
ROUND_FILE = re.compile(r"round(\d+)\.(critique|revise)\.jsonl$")
SFT_DIR = "sft"
PAIRS = "pairs.jsonl"
PREFS = "prefs.jsonl"
RM_DIR = "rm"
PPO_DIR = "ppo"
REVISION_PAIRS = "revision-pairs.jsonl"
# The RL stages make demo can run (ALGO=...), each in the directory of its name, with its label.
RL_STAGES = {"ppo": "PPO", "rloo": "RLOO", "dpo": "DPO"}
EVAL_DIR = "eval"
TIMINGS = "timings.tsv"


StepKind = Literal["records", "model", "eval"]  # a JSONL file, a model directory, eval's directory
# The training counts the overview names for a model step (the first three a manifest has).
COUNTS_SHOWN = ("examples", "steps", "pairs", "train", "held_out", "prompts")


def round_file(number: int, kind: str) -> str:
    return f"round{number}.{kind}.jsonl"


@dataclass(frozen=True)
class StepLayout:
    """One step of the pipeline: its name in timings.tsv, what its command writes (``-o``), and
    what kind of output that is."""

    name: str
    output: str
    kind: StepKind

    @property
    def done_marker(self) -> str:
        """The file whose presence means the step finished (model directories appear complete)."""
        return f"{self.output}/{SUMMARY_FILE}" if self.kind == "eval" else self.output

    def manifest(self, root: Path) -> Path:
        output = root / self.output
        return manifest_path(output) if self.kind == "records" else output / MODEL_MANIFEST

    def produced(self, root: Path) -> str:
        """What the finished step made, for the overview: records, training steps, or answers."""
        output = root / self.output
        if self.kind == "records":
            return _records(output)
        counts = (read_json(output / MODEL_MANIFEST) or {}).get("counts") or {}
        if self.kind == "eval":
            return f"{counts.get('answers', '?')} answers, {counts.get('judgements', '?')} judgements"
        shown = [k for k in COUNTS_SHOWN if isinstance(counts.get(k), int)]
        described = ", ".join(f"{k.replace('_', ' ')} {counts[k]}" for k in shown[:3])
        return described or f"{count_lines(output / TRAINING_LOG)} log entries"


def pipeline_steps(
    rounds: list[tuple[int, str]], rl_stages: Sequence[str] = (PPO_DIR,), revision_pairs: bool = False
) -> list[StepLayout]:
    """Every step in pipeline order, with one critique and one revise step per round, the
    revision pairs when dpo trains on them, and the RL stages that ran (dpo needs no reward model)."""
    return [
        StepLayout("generate", BASE, "records"),
        *(StepLayout(f"{kind}-{number}", round_file(number, kind), "records") for number, kind in rounds),
        StepLayout("sft", SFT_DIR, "model"),
        *([StepLayout("pairs-from-revisions", REVISION_PAIRS, "records")] if revision_pairs else []),
        StepLayout("generate-pairs", PAIRS, "records"),
        StepLayout("label-preferences", PREFS, "records"),
        *([StepLayout("train-rm", RM_DIR, "model")] if set(rl_stages) - {"dpo"} else []),
        *(StepLayout(stage, stage, "model") for stage in rl_stages),
        StepLayout("eval", EVAL_DIR, "eval"),
    ]


# ---------------------------------------------------------------------------
# Reading the run directory


@dataclass
class StepInfo:
    """One pipeline step as the overview table shows it."""

    name: str
    artifact: Path
    done: bool
    count: str = ""
    seconds: float | None = None
    peak_mb: float | None = None


@dataclass
class Run:
    """A run directory as the report sees it."""

    root: Path
    timings: dict[str, tuple[float, float]] = field(default_factory=dict)  # step -> (seconds, peak MB)
    constitution: str | None = None  # the constitution to show (None: the one the run recorded)

    @classmethod
    def open(cls, root: Path, constitution: str | None = None) -> Run:
        return cls(root=root, timings=read_timings(root / TIMINGS), constitution=constitution)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def rounds(self) -> list[tuple[int, str, Path]]:
        """(round number, "critique"|"revise", path) for every finished round file, in order."""
        found = []
        for candidate in self.root.glob("round*.jsonl"):
            match = ROUND_FILE.search(candidate.name)
            if match:
                found.append((int(match.group(1)), match.group(2), candidate))
        return sorted(found, key=lambda item: (item[0], item[1] == "revise"))

    def last_revise(self) -> Path | None:
        revised = [path for _, kind, path in self.rounds() if kind == "revise"]
        return revised[-1] if revised else None

    def rl_stages(self) -> list[str]:
        """The RL stages that ran here; ppo (shown as not run) when none did."""
        return [stage for stage in RL_STAGES if self.path(stage).exists()] or [PPO_DIR]

    def steps(self) -> list[StepLayout]:
        """The pipeline steps of this run, as :func:`pipeline_steps` lays them out."""
        rounds = [(number, kind) for number, kind, _ in self.rounds()]
        return pipeline_steps(rounds, self.rl_stages(), self.path(REVISION_PAIRS).exists())


def read_timings(path: Path) -> dict[str, tuple[float, float]]:
    """timings.tsv: "step<TAB>seconds<TAB>peak KB" lines; a rerun step's last line wins."""
    timings: dict[str, tuple[float, float]] = {}
    if not path.exists():
        return timings
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            try:
                timings[parts[0]] = (float(parts[1]), float(parts[2]) / 1024)
            except ValueError:
                continue
    return timings


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CaitoolError(f"invalid JSON ({err.msg})", where=str(path)) from None


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in iter_json_lines(path)] if path.exists() else []


def read_revisions(path: Path) -> list[RevisionRecord]:
    return list(read_records(path, lambda raw: parse_record(RevisionRecord, raw)))  # type: ignore[arg-type]


def read_preferences(path: Path) -> list[PreferenceRecord]:
    return list(read_records(path, lambda raw: parse_record(PreferenceRecord, raw)))  # type: ignore[arg-type]


def stage_log(run: Run, stage: str) -> list[dict[str, Any]]:
    """An RL stage's step entries (the Trainer's closing summary left out)."""
    return [e for e in read_lines(run.path(stage, TRAINING_LOG)) if "loss" in e or "reward" in e]


def count_lines(path: Path) -> int:
    return sum(1 for _ in iter_json_lines(path)) if path.exists() else 0


def manifest_seconds(manifest: dict[str, Any] | None) -> float | None:
    if not manifest or not manifest.get("started_at") or not manifest.get("finished_at"):
        return None
    started = datetime.fromisoformat(manifest["started_at"])
    finished = datetime.fromisoformat(manifest["finished_at"])
    return (finished - started).total_seconds()


def collect_steps(run: Run) -> list[StepInfo]:
    """Every step in pipeline order, done or not, with what it produced and what it cost."""
    prompts = run.path(PROMPTS)
    steps = [StepInfo("prompts", prompts, prompts.exists(), _records(prompts) if prompts.exists() else "")]
    for layout in run.steps():
        artifact = run.path(layout.done_marker)
        if not artifact.exists():
            steps.append(StepInfo(layout.name, artifact, False))
            continue
        # A timing line of a step whose artifact is gone describes a run that no longer exists,
        # so timings are read only for finished steps; the manifest's times stand in for a missing line.
        seconds, peak = run.timings.get(layout.name, (None, None))
        if seconds is None:
            seconds = manifest_seconds(read_json(layout.manifest(run.root)))
        steps.append(StepInfo(layout.name, artifact, True, layout.produced(run.root), seconds, peak))
    return steps


def _records(path: Path) -> str:
    return f"{count_lines(path)} records"
