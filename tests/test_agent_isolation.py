"""The agent side imports and verifies a bundle without any workstation dependency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import KeyPair

BLOCKED = ["packager", "onnx", "ai_edge_quantizer", "torch", "tensorflow", "model_signing", "rich", "sklearn"]

SCRIPT = r"""
import importlib.abc, json, sys
BLOCKED = set(json.loads(sys.argv[1]))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked in this test: {name}")
        return None

sys.meta_path.insert(0, Block())
from pathlib import Path
from agent.bundle import opened_bundle
from agent.keys import load_public_key
from agent.preflight import selftest_bundle
import agent.cli  # the device CLI imports too

with opened_bundle(Path(sys.argv[2]), trusted_keys=[load_public_key(Path(sys.argv[3]))]) as vb:
    result = selftest_bundle(vb)
loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
print(json.dumps({"name": vb.manifest.name, "selftest": result["passed"], "loaded": loaded}))
"""


def test_agent_verifies_without_workstation_packages(mlp_bundle: Path, release_key: KeyPair) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(BLOCKED), str(mlp_bundle), str(release_key.public)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"name": "mlp", "selftest": True, "loaded": []}


def test_agent_package_never_imports_packager() -> None:
    root = Path(__file__).resolve().parent.parent / "agent"
    offenders = [
        str(p.relative_to(root.parent))
        for p in root.rglob("*.py")
        if any(line.lstrip().startswith(("import packager", "from packager")) for line in p.read_text().splitlines())
    ]
    assert offenders == []
