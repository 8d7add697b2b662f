"""benchmarks/gpu_check.sh refuses to run without a GPU, in one clear line (--tiny is run by hand)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_without_cuda_the_gpu_check_stops_at_once_and_says_why(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the check would run")
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**os.environ, "PY": sys.executable, "WORK": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "gpu_check: FAILED" in result.stderr and "sees no CUDA GPU" in result.stderr
    assert "--tiny" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing was installed or built
