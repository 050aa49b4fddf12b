"""What the wheel holds: the package and the guides its warnings point to, and nothing else."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from taskexec._callsite import MIGRATION_GUIDE, guide

from .conftest import ROOT


def test_warnings_name_a_guide_that_exists_here() -> None:
    path = Path(guide("MIGRATION.md"))
    assert path.is_file()
    assert str(path) in MIGRATION_GUIDE
    assert guide("NO-SUCH-GUIDE.md") == "docs/NO-SUCH-GUIDE.md in the taskexec repository"


def test_the_wheel_ships_the_guides_and_not_the_tests(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    (wheel,) = tmp_path.glob("taskexec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"taskexec/docs/MIGRATION.md", "taskexec/docs/ROLLBACK.md"} <= names
    assert {"taskexec/__init__.py", "taskexec/py.typed", "taskexec/sync.py"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/", "compat/")) for n in names)
