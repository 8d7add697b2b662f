"""What a run was started with, kept beside its unfinished work so that only the same command
continues it.

Three things resume: a record phase's ``OUT.part`` (:mod:`caitool.jsonl_io`), a training run's
checkpoints (:mod:`caitool.training`) and eval's generation files (:mod:`caitool.evaluate`).
Each writes a key (a JSON object of the settings that shape the result) when it starts, and
a later run compares its own key with the recorded one, naming the settings that differ.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def as_json(values: Mapping[str, Any]) -> dict[str, Any]:
    """The key as it reads back from disk (tuples become lists), so equal settings compare equal."""
    return json.loads(json.dumps(values, default=str))


def differing_settings(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The names of the settings whose values differ (or that only one side has), sorted."""
    current = as_json(current)
    return sorted(k for k in {*recorded, *current} if recorded.get(k) != current.get(k))


class KeyFile:
    """The JSON file holding the key of the run that left unfinished work beside it."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, values: Mapping[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(as_json(values), sort_keys=True, indent=2, ensure_ascii=False))
        os.replace(tmp, self.path)

    def read(self) -> dict[str, Any] | None:
        """The recorded key; None when there is none (or it is unreadable, e.g. torn by a kill)."""
        try:
            recorded = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return recorded if isinstance(recorded, dict) else None

    def differences(self, values: Mapping[str, Any]) -> list[str] | None:
        """The settings ``values`` changes against the recorded key; None when nothing is recorded."""
        recorded = self.read()
        return None if recorded is None else differing_settings(recorded, values)

    def matches(self, values: Mapping[str, Any]) -> bool:
        return self.differences(values) == []

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
