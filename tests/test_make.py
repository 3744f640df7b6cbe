"""The two make commands a newcomer runs install and run what they say (issue 24, items 9 and 10).

``make -n`` prints the commands without running them, so these checks cost nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry(target: str, tmp_path: Path) -> list[str]:
    """The commands ``make TARGET`` would run for a fresh clone (a venv that does not exist yet)."""
    venv = tmp_path / "venv"
    done = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), f"VENV={venv}", target], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def test_demo_installs_only_what_it_runs(tmp_path):
    lines = _dry("demo", tmp_path)
    installs = [line for line in lines if "pip install" in line]
    assert any("torch==" in line for line in installs)
    (kdedge,) = [line for line in installs if " -e " in line]
    assert kdedge.endswith("-e '.'")  # was -e '.[dev,edge]': ~1.5 GB of edge runtimes the demo never runs
    assert lines[-1].endswith("kdedge compress-and-export")


def test_test_installs_every_runtime_and_runs_in_parallel(tmp_path):
    lines = _dry("test", tmp_path)
    assert any(line.endswith("-e '.[dev,edge]'") for line in lines)
    assert lines[-1].startswith("KDEDGE_REQUIRE_EDGE=1 ") and " -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder" in lines[-1]
    fast = _dry("test-fast", tmp_path)[-1]
    assert fast.endswith("-m \"not slow\"") and " -n 2 " in fast
    serial = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), f"VENV={tmp_path / 'venv'}", "TEST_WORKERS=1", "test"], capture_output=True, text=True,
                            check=True).stdout.splitlines()[-1]
    assert " -n " not in serial  # TEST_WORKERS=1: one process, as a debugger wants it
