"""``python -m benchmarks.gpu_suite --dry-run``, the GPU suite on CPU under the Triton interpreter at tiny shapes, runs
clean: every op's Triton path passes its float32 and bfloat16 checks and every op is timed on both paths."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.kernels.kit import REPO_ROOT
from zoo.kernels._common import triton_available

OPS = ("gated_delta_rule", "ssd", "selective_scan", "titans_linear_memory", "hash_lookup")


@pytest.mark.skipif(not triton_available(), reason="needs triton (the dry run uses its interpreter)")
def test_gpu_suite_dry_run_checks_and_times_every_op(tmp_path):
    out = tmp_path / "gpu.md"
    environment = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run", "--out", str(out)],
                          cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = out.read_text()
    assert "## Failures" not in report and "| NO |" not in report
    for op in OPS:
        for dtype in ("float32", "bfloat16"):
            assert f"| {op} |" in report and f"| {dtype} | triton |" in report and f"| {dtype} | torch |" in report
        assert report.count(f"| {op} |") == 2 + 4, op  # two checks, and Triton and torch timed in two dtypes
