"""Provenance manifests: what made an artifact (command, models and their weight hashes,
parameters, seed, constitution, inputs, versions, times).

JSONL outputs get a sidecar ``OUT.jsonl.manifest.json``; model directories get a
``caitool_manifest.json`` inside. Records themselves carry the short model id and seed,
so a single line stays attributable when it is copied out of its file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from caitool import __version__
from caitool.cache import cache_dir

MODEL_MANIFEST = "caitool_manifest.json"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def command_line() -> str:
    return shlex.join(["caitool", *sys.argv[1:]]) if sys.argv else "caitool"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _hash_cache_file() -> Path:
    return cache_dir() / "weight-hashes.json"


def weights_hash(model_dir: str | Path) -> str:
    """SHA-256 over a model directory's weight files, cached by path, size and mtime."""
    model_dir = Path(model_dir).resolve()
    weight_files = sorted(
        p for p in model_dir.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf"} and p.is_file()
    )
    if not weight_files:
        return "unknown"
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weight_files]
    cache_file = _hash_cache_file()
    cache: dict[str, Any] = {}
    if cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except json.JSONDecodeError:
            cache = {}
    entry = cache.get(str(model_dir))
    if entry and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = hashlib.sha256()
    for path in weight_files:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    value = digest.hexdigest()
    cache[str(model_dir)] = {"stamp": stamp, "sha256": value}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return value


def environment() -> dict[str, str]:
    versions = {"caitool": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "datasets", "peft"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions


def build_manifest(
    *,
    phase: str,
    params: dict[str, Any],
    started_at: str,
    models: dict[str, Any] | None = None,
    inputs: list[str | Path] | None = None,
    constitution: Any | None = None,
    counts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest dict for one run of one phase."""
    return {
        "phase": phase,
        "command": command_line(),
        "started_at": started_at,
        "finished_at": now_iso(),
        "params": params,
        "models": {role: _as_plain(info) for role, info in (models or {}).items()},
        "inputs": [_describe_input(p) for p in (inputs or [])],
        "constitution": _as_plain(constitution) if constitution is not None else None,
        "counts": counts or {},
        "versions": environment(),
        "host": platform.node(),
    }


def _as_plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    return value


def _describe_input(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if str(path) == "-" or not path.is_file():
        return {"path": str(path)}
    return {"path": str(path), "sha256": file_sha256(path)}
