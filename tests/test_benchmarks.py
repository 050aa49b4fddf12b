"""The benchmark suite runs end to end (its figures are measured by `python -m benchmarks`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .cluster import services_up
from .conftest import ROOT


def test_benchmark_suite_smoke_run(tmp_path: Path) -> None:
    """``python -m benchmarks --quick`` runs end to end, so the suite never rots."""
    # Not measured for coverage (its subprocesses neither): the suite's own tests cover the
    # code, and coverage's tracing in a benchmark's workers made this test five times slower.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
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
        "## 8. Provider rate limits",
        "### 8.4 The limiter's own cost",
        "## 9. Streaming",
        "## 10. Tracing (OpenTelemetry)",
        "## 11. taskexec migrate",
    ):
        assert heading in report
    if services_up():
        assert "### 7.4 Chaos" in report
        assert "### 8.2 Two processes" in report
    else:  # a laptop without RabbitMQ and Redis: the sections say so instead
        assert "Not run: needs" in report
    assert (tmp_path / "scale.png").stat().st_size > 0
    assert '"scale"' in (tmp_path / "results.json").read_text()


def test_sections_without_the_services_say_they_were_not_run() -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.__main__ import distributed_gap, render_distributed

    lines = render_distributed({"skipped": "needs RabbitMQ at 127.0.0.1:5672"})
    assert "Not run: needs RabbitMQ at 127.0.0.1:5672" in lines
    assert distributed_gap({"skipped": "x"}, 2) == ""
