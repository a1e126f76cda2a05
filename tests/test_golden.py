"""Golden bundles of format 1, committed: every release must keep verifying them."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.bundle import opened_bundle
from agent.keys import load_public_key
from agent.preflight import selftest_bundle

GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_golden_format1_bundle_still_verifies_and_runs(runtime: str) -> None:
    key = load_public_key(GOLDEN / "golden.pub")
    with opened_bundle(GOLDEN / f"golden-{runtime}-format1.edge", trusted_keys=[key]) as vb:
        m = vb.manifest
        assert (m.format, m.name, m.version, m.runtime.name) == (1, f"golden-{runtime}", "1.0.0", runtime)
        assert m.created == "2026-11-18T11:06:40Z"
        assert vb.signer == key.key_id
        result = selftest_bundle(vb)
    assert result["passed"] and result["cases"] == m.selftest.cases
