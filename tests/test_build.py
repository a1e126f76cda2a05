"""edgeship build on real models: what ends up signed, and the errors for bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.bundle import opened_bundle
from agent.errors import UsageError
from agent.preflight import selftest_bundle
from agent.selftest import load_cases
from tests.conftest import KeyPair, build


def test_tflite_bundle_with_labels_and_samples(mlp_tflite: Path, release_key: KeyPair, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\n")
    samples = tmp_path / "s.npz"
    xs = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    np.savez(samples, x=xs)
    r = build(mlp_tflite, release_key, tmp_path / "t.edge", name="tmlp", labels=labels, sample_inputs=samples, selftest_cases=8)
    assert set(r.files) == {"manifest.json", "model.tflite", "labels.txt", "selftest.npz"}
    with opened_bundle(r.path, trusted_keys=[release_key.trusted()]) as vb:
        assert vb.manifest.runtime.name == "tflite" and vb.manifest.labels == "labels.txt"
        assert vb.file("labels.txt").read_text() == "a\nb\nc\nd\n"
        inputs, outputs = load_cases(vb.file("selftest.npz").read_bytes(), max_bytes=1 << 20)
        # the sample file held 3 cases; asking for 8 takes the 3 there are, in order, batch 1 each
        assert len(inputs) == 3 and vb.manifest.selftest.cases == 3
        np.testing.assert_array_equal(inputs[1]["x"], xs[1:2])
        assert selftest_bundle(vb)["passed"]


def test_onnx_external_data_is_bundled(release_key: KeyPair, tmp_path: Path) -> None:
    from tests.modelfactory import onnx_mlp

    model = onnx_mlp(tmp_path / "ext.onnx", external_data=True)
    data_files = [p.name for p in tmp_path.iterdir() if p.name != "ext.onnx"]
    assert data_files, "the factory should have written an external data file"
    r = build(model, release_key, tmp_path / "ext.edge", name="ext")
    assert set(data_files) <= set(r.files)
    assert r.manifest.model_files == ("model.onnx", *data_files)
    with opened_bundle(r.path, trusted_keys=[release_key.trusted()]) as vb:
        assert selftest_bundle(vb)["passed"]  # the runtime finds the weights next to model.onnx


def test_deterministic_selftest_inputs(mlp_onnx: Path, release_key: KeyPair, tmp_path: Path) -> None:
    a = build(mlp_onnx, release_key, tmp_path / "a.edge")
    b = build(mlp_onnx, release_key, tmp_path / "b.edge")
    assert a.files["selftest.npz"] == b.files["selftest.npz"]
    assert a.files["model.onnx"] == b.files["model.onnx"]


@pytest.mark.parametrize(
    "arrays, phrase",
    [
        ({"y": np.zeros((2, 8), np.float32), "z": np.zeros((2, 8), np.float32)}, "no array for input"),
        ({"x": np.zeros((2, 5), np.float32)}, "input expects"),
        ({"x": np.zeros((8,), np.float32)}, "dimensions"),
    ],
)
def test_mismatched_sample_inputs(arrays: dict[str, np.ndarray], phrase: str, mlp_onnx: Path,
                                  release_key: KeyPair, tmp_path: Path) -> None:
    samples = tmp_path / "bad.npz"
    np.savez(samples, **arrays)
    with pytest.raises(UsageError, match=phrase):
        build(mlp_onnx, release_key, tmp_path / "o.edge", sample_inputs=samples)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.npz"]


def test_not_a_model(release_key: KeyPair, tmp_path: Path) -> None:
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"\x00\x01 this is not a model")
    with pytest.raises(UsageError, match="not an ONNX or TFLite model"):
        build(junk, release_key, tmp_path / "o.edge")
    assert not (tmp_path / "o.edge").exists()


def test_build_writes_a_transfer_signature_over_the_bundles_blocks(mlp_onnx: Path, release_key: KeyPair,
                                                                   tmp_path: Path) -> None:
    """Beside NAME.edge, NAME.edge.sig: the release key's signature over the bundle file's 256 KiB
    blocks, which verifies against the file's own block hashes and not against any other's."""
    import hashlib

    from agent.errors import SignatureError
    from agent.signing import read_transfer_signature, verify_transfer_signature

    r = build(mlp_onnx, release_key, tmp_path / "m.edge", version="1.2.3")
    assert r.transfer_signature == tmp_path / "m.edge.sig"
    data = r.path.read_bytes()
    blocks = [hashlib.sha256(data[i:i + 262144]).hexdigest() for i in range(0, len(data), 262144)]
    sig, _ = read_transfer_signature(r.transfer_signature.read_bytes(), max_bytes=1 << 20, max_depth=16)
    kw = {"subject_name": "mlp/mlp-1.2.3.edge", "shard_size": 262144, "length": len(data)}
    assert verify_transfer_signature(sig, [release_key.trusted()], digests=blocks, **kw) == release_key.key_id
    with pytest.raises(SignatureError):
        verify_transfer_signature(sig, [release_key.trusted()], digests=[hashlib.sha256(b"").hexdigest()] * len(blocks),
                                  **kw)
