"""Streaming JSONL input and resumable, atomic JSONL output.

Reading: records stream one line at a time; a bad line raises a CaitoolError naming
``file:line`` and what is wrong. Phases validate their whole input in a first streaming
pass (``check_input``) before they create any output, so bad input never leaves a
half-written file behind.

Writing: ``ResumableWriter`` appends to ``OUT.part`` and flushes after every batch.
When the run finishes it renames ``OUT.part`` to ``OUT`` (atomic), so a file under the
final name is always complete. If the run is killed, ``OUT.part`` stays; rerunning the
same command resumes automatically: it truncates a torn last line, skips every id already
written, and continues. A ``OUT.part.key.json`` beside it records the parameters that
shaped the output, so a partial file from a different command is never silently mixed in.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from caitool.errors import CaitoolError
from caitool.records import Record
from caitool.run_key import KeyFile

T = TypeVar("T")

STDIO = "-"


def display_name(path: str | Path) -> str:
    return "<stdin>" if str(path) == STDIO else str(path)


def spool_stdin() -> Path:
    """Copy stdin to a temporary file so it can be validated and then read again."""
    handle = tempfile.NamedTemporaryFile(prefix="caitool-stdin-", suffix=".jsonl", delete=False)
    with handle:
        shutil.copyfileobj(sys.stdin.buffer, handle)
    return Path(handle.name)


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; errors name file and line."""
    name = display_name(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed in finally; bytes so bad UTF-8 is ours to report
    except FileNotFoundError:
        raise CaitoolError("no such file", where=name) from None
    except IsADirectoryError:
        raise CaitoolError("is a directory, expected a JSONL file", where=name) from None
    try:
        for line_number, raw_line in enumerate(handle, start=1):
            where = f"{name}:{line_number}"
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CaitoolError(f"not valid UTF-8 (byte {err.start})", where=where) from None
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise CaitoolError(f"invalid JSON ({err.msg}, column {err.colno})", where=where) from None
            if not isinstance(value, dict):
                raise CaitoolError(f"expected a JSON object, got {type(value).__name__}", where=where)
            yield line_number, value
    finally:
        handle.close()


def read_records(path: str | Path, parse: Callable[[dict[str, Any]], T]) -> Iterator[T]:
    """Stream parsed records. ``parse`` raises CaitoolError; this adds ``file:line``.

    Duplicate ids get a stable suffix (``-2``, ``-3``...) when they were derived from
    the prompt, and are an error when the user gave them explicitly, because resuming
    a run identifies records by id.
    """
    name = display_name(path)
    seen: dict[str, int] = {}
    for line_number, raw in iter_json_lines(path):
        where = f"{name}:{line_number}"
        try:
            record = parse(raw)
        except CaitoolError as err:
            raise CaitoolError(str(err), where=where) from None
        record_id = getattr(record, "id", None)
        if record_id is not None:
            if record_id in seen:
                if "id" in raw:
                    raise CaitoolError(
                        f'duplicate id "{record_id}" (first on line {seen[record_id]})', where=where
                    )
                record = _with_suffixed_id(record, seen)
            seen[record.id] = line_number
        yield record


def _with_suffixed_id(record: Any, seen: dict[str, int]) -> Any:
    suffix = 2
    while f"{record.id}-{suffix}" in seen:
        suffix += 1
    return record.model_copy(update={"id": f"{record.id}-{suffix}"})


def check_input(path: str | Path, parse: Callable[[dict[str, Any]], Any]) -> int:
    """Validate every line of ``path`` without keeping records; return the record count."""
    count = sum(1 for _ in read_records(path, parse))
    if count == 0:
        raise CaitoolError("no records (the file is empty)", where=display_name(path))
    return count


def open_input(path: str | Path) -> Path:
    """The path to read: stdin is spooled to a temporary file first."""
    if str(path) == STDIO:
        return spool_stdin()
    return Path(path)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------
# Output


def part_path(out: Path) -> Path:
    return out.with_name(out.name + ".part")


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + ".manifest.json")


class ResumableWriter:
    """Append-only JSONL output that survives kills and appears atomically when complete.

    Use as a context manager. ``done_ids`` holds the ids found in a previous partial run.
    On normal exit the ``.part`` file is renamed to the final name and the manifest is
    written beside it; on an exception the ``.part`` file is kept for the next run.
    """

    def __init__(self, out: str | Path, run_key: dict[str, Any], *, resume: bool = True):
        self.to_stdout = str(out) == STDIO
        self.out = Path(out)
        self.run_key = run_key
        self.resume = resume
        self.done_ids: set[str] = set()
        self.resumed_count = 0
        self.written = 0
        self._handle: Any = None
        self.manifest: dict[str, Any] | None = None

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> ResumableWriter:
        if self.to_stdout:
            self._handle = sys.stdout
            return self
        self.out.parent.mkdir(parents=True, exist_ok=True)
        part = part_path(self.out)
        if part.exists() and self.resume:
            self._check_key()
            self._recover(part)
        else:
            part.unlink(missing_ok=True)
            self._key_file().write(self.run_key)
        self._handle = open(part, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.to_stdout:
            sys.stdout.flush()
            return
        self._handle.close()
        if exc_type is not None:
            return
        part = part_path(self.out)
        os.replace(part, self.out)
        self._key_file().remove()
        if self.manifest is not None:
            write_json_atomic(manifest_path(self.out), self.manifest)

    # -- writing -------------------------------------------------------------
    def write_batch(self, records: Iterable[Record]) -> None:
        """Write records and flush, so a kill loses at most the batch in flight."""
        lines = [record.to_json() + "\n" for record in records]
        self._handle.write("".join(lines))
        self._handle.flush()
        if not self.to_stdout:
            os.fsync(self._handle.fileno())
        self.written += len(lines)
        for record in records:
            self.done_ids.add(record.id)

    def is_done(self, record_id: str) -> bool:
        return record_id in self.done_ids

    # -- resume ----------------------------------------------------------------
    def _key_file(self) -> KeyFile:
        return KeyFile(self.out.with_name(self.out.name + ".part.key.json"))

    def _check_key(self) -> None:
        differing = self._key_file().differences(self.run_key)
        if differing:
            raise CaitoolError(
                f"{part_path(self.out)} is a partial output of a different command "
                f"(differs in: {', '.join(differing)}); "
                "rerun the same command, or pass --no-resume to discard it"
            )

    def _recover(self, part: Path) -> None:
        """Drop a torn last line, then collect the ids already written."""
        good_bytes = 0
        with open(part, "rb") as handle:
            for raw_line in handle:
                if not raw_line.endswith(b"\n"):
                    break
                try:
                    record_id = json.loads(raw_line)["id"]
                except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                    break
                self.done_ids.add(str(record_id))
                good_bytes += len(raw_line)
        with open(part, "r+b") as handle:
            handle.truncate(good_bytes)
        self.resumed_count = len(self.done_ids)


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, records: Iterable[Record | dict[str, Any]]) -> None:
    """Write a small JSONL file in one go (for summaries and logs produced at the end)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            line = record.to_json() if isinstance(record, Record) else json.dumps(record, ensure_ascii=False)
            handle.write(line + "\n")
    os.replace(tmp, path)
