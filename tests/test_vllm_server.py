"""The benchmarks' vLLM server helper (tests/vllm_server.py): a benchmark stopped with SIGTERM
stops the server it started, which runs in its own session and would otherwise outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A benchmark in miniature: the helper with a stand-in server whose kill leaves a mark.
BENCHMARK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import caitool.models
    import tests.vllm_server as helper

    mark = Path(sys.argv[1])

    class StandInServer:
        url = "http://127.0.0.1:1/v1"
        def __init__(self, *args, **kwargs):
            pass
        def start(self):
            return self
        def kill(self):
            mark.write_text("killed")

    helper.VLLMServer = StandInServer
    helper.vllm_python = lambda: Path(sys.executable)
    caitool.models.ensure_default_model = lambda: Path(".")
    with helper.default_model_server(None, mark.parent, eager=True):
        print("serving", flush=True)
        time.sleep(60)
    """
)


def test_a_benchmark_stopped_with_sigterm_stops_its_server(tmp_path):
    mark = tmp_path / "server-killed"
    benchmark = subprocess.Popen(
        [sys.executable, "-c", BENCHMARK, str(mark)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        for line in benchmark.stdout:  # the helper's own line first
            if line.strip() == "serving":
                break
        benchmark.send_signal(signal.SIGTERM)
        assert benchmark.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        benchmark.kill()
    assert mark.read_text() == "killed"
