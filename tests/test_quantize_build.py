"""edgeship build with --target/--quantize behind the gate, end to end on the digits CNN."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import opened_bundle
from agent.preflight import selftest_bundle
from tests.conftest import EXAMPLES, KeyPair
from tests.test_cli import assert_one_line_error, run

DIGITS = EXAMPLES / "digits"
MODEL, CALIB, EVAL = DIGITS / "digits.onnx", DIGITS / "calibration.npz", DIGITS / "eval.npz"


def _build(tmp: Path, key: KeyPair, *args: str, out: str = "d.edge") -> tuple[object, Path]:
    target = tmp / out
    p = run("edgeship", "build", str(MODEL), "--name", "digits", "--version", "1.0.0", "--key", str(key.private),
            "-o", str(target), "--json", *args)
    return p, target


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_static_int8_bundle_passes_gate_and_selftest(target: str, tmp_path: Path, release_key: KeyPair) -> None:
    p, out = _build(tmp_path, release_key, "--target", target, "--quantize", "int8",
                    "--calibration", str(CALIB), "--eval", str(EVAL))
    assert p.returncode == 0, p.stderr  # type: ignore[attr-defined]
    summary = json.loads(p.stdout)  # type: ignore[attr-defined]
    q = summary["quantization"]
    assert q["target"] == target and q["mode"] == "int8" and q["gate"]["labelled"] is True
    [cand] = q["candidates"]
    assert cand["chosen"] and cand["accuracy_drop_pp"] <= 1.0 and cand["size_ratio"] < 0.5
    with opened_bundle(out, trusted_keys=[release_key.trusted()]) as vb:
        assert vb.manifest.runtime.name == target
        assert vb.manifest.quantization == q  # the report is signed into the manifest
        assert vb.manifest.selftest.atol > 1e-5  # quantized: a wider documented tolerance
        assert selftest_bundle(vb)["passed"]


def test_auto_tflite_lists_every_candidate(tmp_path: Path, release_key: KeyPair) -> None:
    p, out = _build(tmp_path, release_key, "--target", "tflite", "--quantize", "auto",
                    "--calibration", str(CALIB), "--eval", str(EVAL))
    assert p.returncode == 0, p.stderr  # type: ignore[attr-defined]
    q = json.loads(p.stdout)["quantization"]  # type: ignore[attr-defined]
    names = [c["name"] for c in q["candidates"]]
    assert names[0] == "fp32" and len(names) == 5
    chosen = [c for c in q["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["kept"] and q["chosen"] == chosen[0]["name"]
    kept = [c for c in q["candidates"] if c["kept"]]
    assert chosen[0]["size"] <= min(c["size"] for c in kept) * 1.25
    assert all(c["reason"] for c in q["candidates"])
    assert out.is_file()


def test_gate_rejects_broken_quantization(tmp_path: Path, release_key: KeyPair) -> None:
    # calibration data a thousand times off scale: the int8 ranges are useless and accuracy collapses
    bad = tmp_path / "bad-calibration.npz"
    with np.load(CALIB) as z:
        np.savez(bad, x=z["x"] * 1000.0)
    p, out = _build(tmp_path, release_key, "--target", "onnx", "--quantize", "int8",
                    "--calibration", str(bad), "--eval", str(EVAL))
    assert_one_line_error(p, 1, "no candidate passed the gate")  # type: ignore[arg-type]
    assert not out.exists()
    assert [x.name for x in tmp_path.iterdir()] == ["bad-calibration.npz"]


def test_unlabelled_eval_uses_min_cosine(tmp_path: Path, release_key: KeyPair) -> None:
    unl = tmp_path / "unlabelled.npz"
    with np.load(EVAL) as z:
        np.savez(unl, x=z["x"][:64])
    p, out = _build(tmp_path, release_key, "--target", "onnx", "--quantize", "fp16", "--eval", str(unl),
                    "--min-cosine", "0.999")
    assert p.returncode == 0, p.stderr  # type: ignore[attr-defined]
    [c] = json.loads(p.stdout)["quantization"]["candidates"]  # type: ignore[attr-defined]
    assert c["accuracy"] is None and c["cosine"] >= 0.999 and c["kept"]
    p2, _ = _build(tmp_path, release_key, "--target", "onnx", "--quantize", "int8", "--calibration", str(CALIB),
                   "--eval", str(unl), "--min-cosine", "1.0", out="d2.edge")
    assert_one_line_error(p2, 1, "--min-cosine")  # type: ignore[arg-type]


def test_unsupported_operator_for_tflite(tmp_path: Path, release_key: KeyPair) -> None:
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->ij"), helper.make_node("Erf", ["y"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "odd.onnx"
    save(model, path)
    p = run("edgeship", "build", str(path), "--name", "odd", "--version", "1.0.0", "--key", str(release_key.private),
            "--target", "tflite", "-o", str(tmp_path / "odd.edge"))
    assert_one_line_error(p, 2, "Einsum")
    assert "--target onnx" in p.stderr and "Erf" in p.stderr
    assert not (tmp_path / "odd.edge").exists()


@pytest.mark.parametrize(
    "make, args, code, phrase",
    [
        (None, ["--quantize", "int8"], 2, "needs --calibration"),
        (None, ["--quantize", "int8", "--calibration", "missing.npz"], 2, "missing.npz"),
        ({"x": np.zeros((4, 1, 6, 6), np.float32)}, ["--quantize", "int8", "--calibration", "{f}"], 2, "input expects"),
        ({"image": np.zeros((4, 1, 8, 8), np.float32), "other": np.zeros((4, 2), np.float32)},
         ["--quantize", "int8", "--calibration", "{f}"], 2, "no array for input"),
        ({"x": np.zeros((4, 1, 8, 8), np.float32), "labels": np.zeros((3,), np.int64)},
         ["--quantize", "fp16", "--eval", "{f}"], 2, "labels"),
        (b"not an npz", ["--quantize", "int8", "--calibration", "{f}"], 2, "not a readable .npz"),
    ],
)
def test_bad_quantization_inputs(make: object, args: list[str], code: int, phrase: str, tmp_path: Path,
                                 release_key: KeyPair) -> None:
    f = tmp_path / "data.npz"
    if isinstance(make, dict):
        np.savez(f, **make)
    elif isinstance(make, bytes):
        f.write_bytes(make)
    p, out = _build(tmp_path, release_key, *[a.replace("{f}", str(f)) for a in args])
    assert_one_line_error(p, code, phrase)  # type: ignore[arg-type]
    assert not out.exists()


def test_tflite_source_cannot_target_onnx(mlp_tflite: Path, tmp_path: Path, release_key: KeyPair) -> None:
    p = run("edgeship", "build", str(mlp_tflite), "--name", "m", "--version", "1.0.0", "--key", str(release_key.private),
            "--target", "onnx", "-o", str(tmp_path / "m.edge"))
    assert_one_line_error(p, 2, "--target tflite")


@pytest.mark.parametrize("converted_seed, reproduces", [(0, True), (1, False)])
def test_a_conversion_must_reproduce_its_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                converted_seed: int, reproduces: bool) -> None:
    """The converted float model is measured once, as the reference of the candidates, and its
    outputs must match the ONNX source's on the check inputs; a converter that got it wrong stops the build."""
    import types

    import packager.convert
    from agent.errors import ModelError
    from packager.optimize import OptimizeRequest, optimize
    from tests import modelfactory as mf

    source = mf.onnx_mlp(tmp_path / "src.onnx", seed=0)

    def fake_convert(src: Path, dst: Path, **_: object) -> object:
        return types.SimpleNamespace(path=mf.tflite_mlp(dst, seed=converted_seed))

    monkeypatch.setattr(packager.convert, "convert_onnx_to_tflite", fake_convert)
    work = tmp_path / "work"
    work.mkdir()
    req = OptimizeRequest(source=source, target="tflite", latency_budget_s=0.01)
    if reproduces:
        assert optimize(req, work).path.suffix == ".tflite"
    else:
        with pytest.raises(ModelError, match="does not reproduce the ONNX model"):
            optimize(req, work)
