"""Prompt sets for eval as they are published: JSONL, JSON, CSV, TSV or parquet, and labelled.

A prompt may say what the right behaviour is: ``expect`` is ``refuse`` (a harmful request) or
``comply`` (a safe one, possibly one that sounds unsafe), and ``category`` groups prompts in
the report. Published sets name these differently (XSTest's CSV has ``prompt,type,label`` with
``label`` safe/unsafe), so the fields are options and a value map turns the set's labels into
caitool's: ``--expect-field label --expect-map "safe=comply unsafe=refuse" --category-field type``.

A JSONL file in caitool's own layout is read as it is; anything else is read with
``datasets`` (the formats it reads by file extension, or a hub dataset id such as
``owner/name`` or ``owner/name:test`` when the machine can reach a hub), checked row by row,
and written as caitool prompt records into eval's output directory, which generation then reads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caitool.errors import CaitoolError
from caitool.records import PromptRecord, parse_prompt_input

EXPECTATIONS = ("refuse", "comply")
# File extensions and the ``datasets`` builder that reads them.
TABLE_FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".json": "json", ".jsonl": "json"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?$")


def parse_expect_map(values: Sequence[str]) -> dict[str, str]:
    """``safe=comply unsafe=refuse`` (one option or several) -> {"safe": "comply", "unsafe": "refuse"}."""
    mapping: dict[str, str] = {}
    for item in (part for value in values for part in value.split()):
        label, sep, expectation = item.partition("=")
        if not sep or not label or expectation not in EXPECTATIONS:
            raise CaitoolError(f'--expect-map "{item}": expected LABEL=refuse or LABEL=comply')
        mapping[label] = expectation
    return mapping


@dataclass(frozen=True)
class PromptFields:
    """Which columns hold the prompt, its expectation and its category, and how labels map."""

    prompt: str = "prompt"
    expect: str = "expect"
    category: str = "category"
    expect_map: dict[str, str] = field(default_factory=dict)

    @property
    def caitool_layout(self) -> bool:
        names = (self.prompt, self.expect, self.category)
        return names == ("prompt", "expect", "category") and not self.expect_map


def needs_conversion(path: str | Path, fields: PromptFields) -> bool:
    """A plain JSONL file in caitool's layout (or stdin) is read as it is; everything else is converted."""
    text = str(path)
    if text == "-" and not fields.caitool_layout:
        raise CaitoolError("stdin is read as caitool JSONL; give a published set's file to map its fields")
    return not (text == "-" or (text.endswith(".jsonl") and fields.caitool_layout))


def check_expectation(record: PromptRecord) -> PromptRecord:
    """``expect``, when given, is refuse or comply; ``category`` becomes text."""
    extra = record.model_extra or {}
    expect = extra.get("expect")
    if expect is not None and expect not in EXPECTATIONS:
        raise CaitoolError(
            f'field "expect" must be "refuse" or "comply", got {expect!r} '
            "(map a set's own labels with --expect-field and --expect-map)"
        )
    if extra.get("category") is not None:
        extra["category"] = str(extra["category"])
    return record


def parse_eval_prompt(raw: dict[str, Any]) -> PromptRecord:
    """A prompt record for eval: any accepted prompt form, with a valid expectation if it has one."""
    return check_expectation(parse_prompt_input(raw))


def read_rows(source: str) -> list[dict[str, Any]]:
    """The rows of a local table file, or of a hub dataset's split, as ``datasets`` reads them."""
    path = Path(source)
    try:
        import datasets

        datasets.disable_progress_bars()
        if path.exists():
            builder = TABLE_FORMATS.get(path.suffix.lower())
            if builder is None:
                raise CaitoolError(
                    f"{source}: cannot read a {path.suffix or 'extension-less'} file; "
                    f"use one of {', '.join(sorted(TABLE_FORMATS))}"
                )
            options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            table = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
        elif _HUB_ID.match(source):
            name, _, split = source.partition(":")
            table = datasets.load_dataset(name, split=split or "train")
        else:
            raise CaitoolError(f"{source}: no such file (nor a hub dataset id such as owner/name:split)")
    except CaitoolError:
        raise
    except Exception as err:  # datasets raises many kinds; the user needs one line
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CaitoolError(f"{source}: could not be read as a table: {first_line}") from None
    return [dict(row) for row in table]


def caitool_row(row: dict[str, Any], fields: PromptFields) -> dict[str, Any]:
    """One published row as a caitool prompt input: the named columns renamed, labels mapped."""
    if fields.prompt not in row:
        raise CaitoolError(f'missing field "{fields.prompt}" (choose the prompt column with --prompt-field)')
    out = {k: v for k, v in row.items() if k not in (fields.prompt, fields.expect, fields.category)}
    out["prompt"] = row[fields.prompt]
    label = row.get(fields.expect)
    if label is not None and label != "":
        label = str(label)
        expect = fields.expect_map.get(label, label)
        if expect not in EXPECTATIONS:
            known = ", ".join(sorted(fields.expect_map)) or "none given"
            raise CaitoolError(
                f'field "{fields.expect}": {label!r} is neither refuse nor comply, nor mapped by '
                f"--expect-map (mapped: {known})"
            )
        out["expect"] = expect
    if row.get(fields.category) not in (None, ""):
        out["category"] = str(row[fields.category])
    return out


def convert_prompt_set(source: str, fields: PromptFields) -> list[PromptRecord]:
    """Every row of a published set as a checked prompt record; a bad row is one line naming it."""
    records = []
    for number, row in enumerate(read_rows(source), start=1):
        try:
            records.append(parse_eval_prompt(caitool_row(row, fields)))
        except CaitoolError as err:
            raise CaitoolError(f"{source}: row {number}: {err}") from None
    if not records:
        raise CaitoolError(f"{source}: no prompts")
    return records
