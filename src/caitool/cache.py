"""Where caitool keeps what it builds once: the default model's safetensors copy and the
weight-hash cache, under ``$CAITOOL_CACHE`` (default ``~/.cache/caitool``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("CAITOOL_CACHE", Path.home() / ".cache" / "caitool")).expanduser()
