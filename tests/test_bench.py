"""The bench scripts stay runnable: each imports what it measures and parses its flags.

(The benches themselves are run by hand - they time things, and tests assert no timings - so an
API change that breaks one would otherwise go unnoticed until someone measures.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted(p.name for p in (ROOT / "bench").glob("*.py") if "argparse" in p.read_text())
"""The scripts with flags (bench/mobilenet.py is a helper the quantize bench imports)."""


def test_every_bench_is_listed() -> None:
    assert {"agent.py", "transfer.py", "quantize.py"} <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
def test_bench_imports_and_parses_its_flags(name: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
