"""The benchmark suite runs end to end (its figures are measured by `python -m benchmarks`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def test_benchmark_suite_smoke_run(tmp_path: Path) -> None:
    """``python -m benchmarks --quick`` runs end to end, so the suite never rots."""
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    report = (tmp_path / "RESULTS.md").read_text()
    for heading in (
        "## 1. Scale",
        "## 2. The seed's case",
        "## 3. Single-task",
        "## 4. Framework",
        "## 5. The sync path",
        "## 6. The command line at scale",
        "## 7. Beyond one process",
        "### 7.4 Chaos",
        "## 8. Provider rate limits",
        "### 8.4 The limiter's own cost",
    ):
        assert heading in report
    assert (tmp_path / "scale.png").stat().st_size > 0
    assert '"scale"' in (tmp_path / "results.json").read_text()
