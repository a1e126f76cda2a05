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


def test_the_transfer_floor_does_all_its_work(tmp_path: Path) -> None:
    """bench/rrfloor.py (the bare request/response row of bench/transfer.py) fetches every byte
    through a real Mosquitto and inflates all of it (a wrong expected size fails it), with the
    paho window the agent's own client gets."""
    import gzip
    import os

    from agent.mqtt import MAX_INFLIGHT
    from bench.rrfloor import IN_FLIGHT, download, floor_server, inflated_size
    from tests.mosquitto import start_broker

    assert IN_FLIGHT == MAX_INFLIGHT

    bundle = tmp_path / "b.edge"
    bundle.write_bytes(gzip.compress(os.urandom(3 * 1024 * 1024 + 1234), mtime=0))
    broker = start_broker(tmp_path / "mosquitto")
    try:
        with floor_server(broker.host, broker.port, bundle):
            seconds = download(broker.host, broker.port, bundle.stat().st_size, tmp_path / "part",
                               in_flight=4, request=512 * 1024, expect=inflated_size(bundle))
            assert seconds > 0
            assert inflated_size(bundle) == 3 * 1024 * 1024 + 1234
            with pytest.raises(RuntimeError, match=f"inflated to {3 * 1024 * 1024 + 1234} bytes, not 5"):
                download(broker.host, broker.port, bundle.stat().st_size, tmp_path / "part",
                         in_flight=4, request=256 * 1024, expect=5)
    finally:
        broker.stop()
