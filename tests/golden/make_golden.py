"""Regenerate the golden bundles of the CURRENT format version (run only when a new format
version is introduced; old golden bundles are kept and must keep verifying forever).

    python tests/golden/make_golden.py

Writes golden-<runtime>-1.0.0.edge and golden.pub here. The private key is thrown away.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from agent.manifest import FORMAT_VERSION  # noqa: E402
from packager.build import BuildRequest, build_bundle  # noqa: E402
from packager.keys import generate_keypair, load_private_key  # noqa: E402
from tests.modelfactory import onnx_mlp, tflite_mlp  # noqa: E402


def main() -> None:
    os.environ["SOURCE_DATE_EPOCH"] = "1795000000"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        gen = generate_keypair(t, name="golden")
        key = load_private_key(gen.private_path, passphrase=None)
        (HERE / "golden.pub").write_bytes(gen.public_path.read_bytes())
        for runtime, model in (("onnx", onnx_mlp(t / "mlp.onnx")), ("tflite", tflite_mlp(t / "mlp.tflite"))):
            out = HERE / f"golden-{runtime}-format{FORMAT_VERSION}.edge"
            build_bundle(BuildRequest(model=model, name=f"golden-{runtime}", version="1.0.0", out=out, force=True), key)
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
