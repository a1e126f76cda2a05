"""agent.host.ModelHost against the real runtimes: validation, statistics, watch counters, swaps under load."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from agent.bundle import open_bundle
from agent.errors import BadData, ModelError, UsageError
from agent.host import BadRequest, ModelHost, ModelInfo, UnknownModel
from agent.manifest import DeviceClass, Manifest, Runtime, RuntimeReq, SelfTestSpec
from agent.runtime import open_session
from tests import modelfactory as mf
from tests.conftest import KeyPair, build

SHA = "ab" * 32


def manifest_for(path: Path, runtime: Runtime, name: str = "mlp", version: str = "1.0.0",
                 labels: str | None = None) -> Manifest:
    """A manifest declaring exactly what the runtime reports for ``path`` (as a build would)."""
    with open_session(runtime, path) as s:
        inputs, outputs = s.inputs, s.outputs
    return Manifest(format=1, name=name, version=version, created="2026-11-27T21:00:00Z",
                    runtime=RuntimeReq(name=runtime, min_version="1.0"), device_class=DeviceClass(),
                    model_files=("model.onnx" if runtime == "onnx" else "model.tflite",), inputs=inputs,
                    outputs=outputs, labels=labels,
                    selftest=SelfTestSpec(file="selftest.npz", cases=1, rtol=0.0, atol=0.0))


def activate(host: ModelHost, path: Path, runtime: Runtime, name: str = "mlp", version: str = "1.0.0",
             **kw) -> ModelInfo:  # type: ignore[no-untyped-def]
    host.activate(name, version=version, sha256=SHA, model_path=path, runtime=runtime,
                  manifest=manifest_for(path, runtime, name, version), **kw)
    return host.info(name)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("host-models")
    return {
        "onnx0": mf.onnx_mlp(d / "m0.onnx", seed=0),
        "onnx1": mf.onnx_mlp(d / "m1.onnx", seed=1),
        "tflite0": mf.tflite_mlp(d / "m0.tflite", seed=0),
        "tflite1": mf.tflite_mlp(d / "m1.tflite", seed=1),
        "nan": mf.onnx_nan_model(d / "nan.onnx"),
        "two_io": mf.onnx_two_io(d / "two.onnx"),
    }


@pytest.fixture
def host() -> Iterator[ModelHost]:
    h = ModelHost()
    yield h
    assert h.close(timeout=10)


X = np.random.default_rng(7).standard_normal((5, 8)).astype(np.float32)


def reference(seed: int, x: np.ndarray = X) -> np.ndarray:
    return mf.mlp_reference(x, mf.mlp_weights(seed=seed))


# --- serving ------------------------------------------------------------------------------------


def test_installed_bundle_serves_with_its_labels(tmp_path: Path, mlp_onnx: Path, release_key: KeyPair,
                                                 host: ModelHost) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\nfish\n")
    bundle = build(mlp_onnx, release_key, tmp_path / "mlp.edge", labels=labels).path
    (tmp_path / "release").mkdir()
    release = open_bundle(bundle, tmp_path / "release", trusted_keys=[release_key.trusted()])
    host.activate("mlp", version="1.0.0", sha256=SHA, model_path=release.model_path, runtime="onnx",
                  manifest=release.manifest)
    info = host.info("mlp")
    assert info.labels == ("cat", "dog", "bird", "fish")
    assert [m.name for m in host.models()] == ["mlp"]
    np.testing.assert_allclose(host.infer("mlp", {"x": X})["probs"], reference(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_infer_matches_the_reference(models: dict[str, Path], host: ModelHost, runtime: Runtime) -> None:
    info = activate(host, models[f"{runtime}0"], runtime)
    assert (info.name, info.version, info.sha256, info.runtime, info.ready) == ("mlp", "1.0.0", SHA, runtime, True)
    assert info.backend.startswith("onnxruntime" if runtime == "onnx" else ("ai-edge-litert", "tflite-runtime"))
    assert [(s.name, s.dtype, s.shape) for s in info.inputs] == [("x", "float32", (-1, 8))]
    assert [(s.name, s.dtype, s.shape) for s in info.outputs] == [("probs", "float32", (-1, 4))]
    out = host.infer("mlp", {"x": X})
    assert list(out) == ["probs"] and out["probs"].dtype == np.float32
    np.testing.assert_allclose(out["probs"], reference(0), rtol=1e-5, atol=1e-6)
    # a non-contiguous view is accepted (copied), a one-row batch too
    wide = np.repeat(X, 2, axis=1)
    np.testing.assert_allclose(host.infer("mlp", {"x": wide[:, ::2]})["probs"], reference(0, wide[:, ::2]),
                               rtol=1e-5, atol=1e-6)
    assert host.infer("mlp", {"x": X[:1]})["probs"].shape == (1, 4)
    stats = host.stats("mlp")
    assert (stats.inferences, stats.errors, stats.rejected, stats.nonfinite, stats.in_flight) == (3, 0, 0, 0, 0)


def test_two_inputs_of_different_dtypes(models: dict[str, Path], host: ModelHost) -> None:
    activate(host, models["two_io"], "onnx", name="two")
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = host.infer("two", {"a": a, "b": np.array([10, 0, -10], dtype=np.int64)})
    np.testing.assert_array_equal(out["sum"], a + np.array([10, 0, -10], dtype=np.float32))
    assert out["argmax"].dtype == np.int64 and out["argmax"].tolist() == [0, 0]


def test_bad_requests_are_typed_counted_and_harmless(models: dict[str, Path], host: ModelHost) -> None:
    activate(host, models["onnx0"], "onnx")
    with pytest.raises(UnknownModel, match="'nope' is not active") as unknown:
        host.infer("nope", {"x": X})
    assert isinstance(unknown.value, UsageError)
    cases = [
        ({}, "missing input"),
        ({"x": X, "y": X}, r"unknown input\(s\) \['y'\]"),
        ({"y": X}, r"unknown input\(s\) \['y'\]"),
        ({"x": X.astype(np.float64)}, "dtype float64 does not match the model's float32"),
        ({"x": X[:, :7]}, r"shape \[5, 7\] does not match the model's \[-1, 8\]"),
        ({"x": X[None]}, r"shape \[1, 5, 8\]"),
        ({"x": X.tolist()}, "expected a numpy array, got list"),
    ]
    for feeds, message in cases:
        with pytest.raises(BadRequest, match=message) as bad:
            host.infer("mlp", feeds)  # type: ignore[arg-type]
        assert isinstance(bad.value, BadData)
    with pytest.raises(UnknownModel, match="version '9.9.9'"):
        host.call("mlp", {"x": X}, version="9.9.9")
    outputs, info = host.call("mlp", {"x": X}, version="1.0.0")
    assert info.version == "1.0.0" and outputs["probs"].shape == (5, 4)
    stats = host.stats("mlp")
    assert (stats.inferences, stats.errors, stats.rejected) == (1, 0, len(cases))
    watch = host.watch_counters("mlp")
    assert (watch.inferences, watch.errors, watch.nonfinite) == (1, 0, 0)


def test_nonfinite_outputs_are_returned_and_counted(models: dict[str, Path], host: ModelHost) -> None:
    activate(host, models["nan"], "onnx", name="nan")
    small = host.infer("nan", {"x": np.ones((1, 4), np.float32)})["y"]  # 4 values: the list-sum check
    large = host.infer("nan", {"x": np.ones((64, 4), np.float32)})["y"]  # 256 values: numpy's check
    assert np.isnan(small).all() and np.isnan(large).all()
    assert host.watch_counters("nan").nonfinite == 2
    assert host.stats("nan").nonfinite == 2
    activate(host, models["onnx0"], "onnx")
    host.infer("mlp", {"x": X})
    assert host.watch_counters("mlp").nonfinite == 0


def test_a_call_is_counted_in_the_watch_only_with_its_faults(models: dict[str, Path], host: ModelHost) -> None:
    """The deployer commits once ``inferences`` reaches the window: a call that has run but whose
    NaN has not been counted yet must not count as a clean inference in between."""
    activate(host, models["nan"], "onnx", name="nan")
    act = host._slots["nan"].active  # noqa: SLF001 - hold the call between running and counting
    assert act is not None
    checking, release = threading.Event(), threading.Event()
    real = act.has_nonfinite

    def slow_check(outputs):  # type: ignore[no-untyped-def]
        checking.set()
        assert release.wait(10)
        return real(outputs)

    act.has_nonfinite = slow_check
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(host.infer, "nan", {"x": np.ones((1, 4), np.float32)})
        assert checking.wait(10)
        mid = host.watch_counters("nan")
        release.set()
        done.result(10)
    assert (mid.inferences, mid.nonfinite) == (0, 0)
    after = host.watch_counters("nan")
    assert (after.inferences, after.nonfinite) == (1, 1)


@pytest.mark.parametrize("values", [[1.0, np.inf, 0.0, 0.0], [np.float32(3e38)] * 4, [-np.inf, np.inf, 1, 2]])
def test_the_small_output_check_is_exact(values: list[float], models: dict[str, Path], host: ModelHost) -> None:
    """y = (x - x) / (x - x) is NaN for finite x; for x = inf it is NaN too. Check the list-sum path on
    outputs built directly: large finite float32 values must not overflow into a false positive."""
    activate(host, models["nan"], "onnx", name="nan")
    act = host._slots["nan"].active  # noqa: SLF001 - the check itself, on chosen values
    assert act is not None
    out = {"y": np.array([values], dtype=np.float32)}
    assert act.has_nonfinite(out) == (not np.isfinite(out["y"]).all())


def test_latency_budget_and_percentiles(models: dict[str, Path]) -> None:
    host = ModelHost(latency_window=8)
    try:
        activate(host, models["onnx0"], "onnx", latency_budget_ms=1e-6)
        for _ in range(20):
            host.infer("mlp", {"x": X})
        watch = host.watch_counters("mlp")
        assert (watch.inferences, watch.over_budget, watch.latency_budget_ms) == (20, 20, 1e-6)
        stats = host.stats("mlp")
        assert stats.window == 8 and stats.inferences == 20
        assert stats.p50_ms is not None and stats.p95_ms is not None and stats.p99_ms is not None
        assert 0 < stats.p50_ms <= stats.p95_ms <= stats.p99_ms < 1000
        host.end_watch("mlp")  # a budget still counts after the watch window
        host.infer("mlp", {"x": X})
        assert host.watch_counters("mlp").over_budget == 21
        host.reset_stats("mlp")
        stats = host.stats("mlp")
        assert (stats.inferences, stats.window, stats.p50_ms) == (0, 0, None)
        assert host.watch_counters("mlp").inferences == 21  # the watch window is not reset with the stats
        activate(host, models["onnx1"], "onnx", version="1.1.0")  # no budget: nothing is over it
        host.infer("mlp", {"x": X})
        watch = host.watch_counters("mlp")
        assert (watch.version, watch.inferences, watch.over_budget) == ("1.1.0", 1, 0)
        assert host.stats("mlp").inferences == 1  # the model's statistics carry across versions
    finally:
        host.close()


# --- activation ---------------------------------------------------------------------------------


def test_failed_activation_keeps_the_old_version(tmp_path: Path, models: dict[str, Path], host: ModelHost) -> None:
    activate(host, models["onnx0"], "onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        host.activate("mlp", version="1.1.0", sha256=SHA, model_path=broken, runtime="onnx",
                      manifest=manifest_for(models["onnx1"], "onnx", version="1.1.0"))
    wrong = manifest_for(models["two_io"], "onnx", version="1.1.0")  # declares other tensors
    with pytest.raises(ModelError, match="differ from the manifest"):
        host.activate("mlp", version="1.1.0", sha256=SHA, model_path=models["onnx1"], runtime="onnx", manifest=wrong)
    with pytest.raises(UsageError, match="the manifest is for"):
        host.activate("mlp", version="2.0.0", sha256=SHA, model_path=models["onnx1"], runtime="onnx",
                      manifest=manifest_for(models["onnx1"], "onnx", version="1.1.0"))
    assert host.info("mlp").version == "1.0.0" and host.open_sessions() == 1
    np.testing.assert_allclose(host.infer("mlp", {"x": X})["probs"], reference(0), rtol=1e-5, atol=1e-6)


def test_manifest_fixes_a_dynamic_dimension(models: dict[str, Path], host: ModelHost) -> None:
    """Requests are checked against the narrower of the manifest's and the runtime's shapes."""
    m = manifest_for(models["onnx0"], "onnx")
    pinned = Manifest(**{**m.__dict__, "inputs": (type(m.inputs[0])(name="x", dtype="float32", shape=(2, 8)),)})
    host.activate("mlp", version="1.0.0", sha256=SHA, model_path=models["onnx0"], runtime="onnx", manifest=pinned)
    info = host.info("mlp")
    assert info.inputs[0].shape == (2, 8)
    assert host.infer("mlp", {"x": X[:2]})["probs"].shape == (2, 4)
    with pytest.raises(BadRequest, match=r"does not match the model's \[2, 8\]"):
        host.infer("mlp", {"x": X})


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_exact_requests_take_the_direct_lane(models: dict[str, Path], host: ModelHost, runtime: Runtime) -> None:
    """Feeds that are exactly what a fixed-shape model declares skip the host's own validation and
    the runtime's Python layer; anything else is validated as before, with the same answers."""
    m = manifest_for(models[f"{runtime}0"], runtime)
    pinned = Manifest(**{**m.__dict__, "inputs": (type(m.inputs[0])(name="x", dtype="float32", shape=(5, 8)),)})
    host.activate("mlp", version="1.0.0", sha256=SHA, model_path=models[f"{runtime}0"], runtime=runtime,
                  manifest=pinned)
    act = host._slots["mlp"].active  # noqa: SLF001 - count the direct lane's calls
    assert act is not None and act.direct is not None
    direct, taken = act.direct, []

    def counting(feeds):  # type: ignore[no-untyped-def]
        taken.append(feeds)
        return direct(feeds)

    act.direct = counting
    for _ in range(3):
        np.testing.assert_allclose(host.infer("mlp", {"x": X})["probs"], reference(0), rtol=1e-5, atol=1e-6)
    wide = np.repeat(X, 2, axis=1)[:, ::2]  # exact dtype and shape, not contiguous: the runtime copies it
    np.testing.assert_allclose(host.infer("mlp", {"x": wide})["probs"], reference(0, wide), rtol=1e-5, atol=1e-6)
    assert len(taken) == 4
    for feeds, message in [({"x": X.astype(np.float64)}, "dtype float64"), ({"x": X[:2]}, r"shape \[2, 8\]"),
                           ({"x": X.tolist()}, "expected a numpy array"), ({"x": X, "y": X}, "unknown input")]:
        with pytest.raises(BadRequest, match=message):
            host.infer("mlp", feeds)  # type: ignore[arg-type]
    assert len(taken) == 4  # none of those went the direct way
    stats = host.stats("mlp")
    assert (stats.inferences, stats.rejected, stats.errors, stats.in_flight) == (4, 4, 0, 0)


def test_nonfinite_check_is_sampled_after_the_watch_window(models: dict[str, Path], host: ModelHost) -> None:
    activate(host, models["nan"], "onnx", name="nan")  # watching: every call is checked
    x = np.ones((1, 4), np.float32)
    for _ in range(32):
        host.infer("nan", {"x": x})
    assert host.watch_counters("nan").nonfinite == 32
    host.end_watch("nan")
    host.reset_stats("nan")
    for _ in range(64):
        assert np.isnan(host.infer("nan", {"x": x})["y"]).all()  # outputs are returned as they are
    assert host.stats("nan").nonfinite == 64 // 16
    assert host.stats("nan").inferences == 64
    activate(host, models["nan"], "onnx", name="nan", version="1.0.1", watching=False)  # a committed release
    for _ in range(16):
        host.infer("nan", {"x": x})
    assert host.watch_counters("nan").nonfinite == 1


def test_deactivate_and_close(models: dict[str, Path]) -> None:
    host = ModelHost()
    activate(host, models["onnx0"], "onnx")
    activate(host, models["tflite0"], "tflite", name="mlpt")
    assert host.open_sessions() == 2
    host.deactivate("mlp")
    host.deactivate("mlp")  # idempotent
    with pytest.raises(UnknownModel):
        host.infer("mlp", {"x": X})
    with pytest.raises(UnknownModel):
        host.watch_counters("mlp")
    assert [m.name for m in host.models()] == ["mlpt"] and host.open_sessions() == 1
    assert host.close(timeout=5) and host.open_sessions() == 0 and host.models() == []


def _heavy_onnx(path: Path, n: int = 768, depth: int = 64) -> Path:
    """x [n, n] multiplied ``depth`` times by one n x n matrix: long enough to swap under it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (np.eye(n) + 1e-3).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", "w"], [f"h{i + 1}" if i < depth - 1 else "y"])
             for i in range(depth)]
    graph = helper.make_graph(nodes, "heavy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    onnx.save_model(model, str(path))
    return path


def test_a_request_in_flight_finishes_on_the_old_session(tmp_path: Path, models: dict[str, Path],
                                                         host: ModelHost) -> None:
    heavy = _heavy_onnx(tmp_path / "heavy.onnx")
    activate(host, heavy, "onnx", name="heavy")
    x = np.full((768, 768), 1e-3, np.float32)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(host.call, "heavy", {"x": x})
        deadline = time.monotonic() + 30
        while host.stats("heavy").in_flight == 0:
            assert time.monotonic() < deadline and not pending.done()
            time.sleep(0.001)
        activate(host, heavy, "onnx", name="heavy", version="2.0.0")
        draining = host.open_sessions()
        outputs, info = pending.result(timeout=60)
    assert draining == 2, "the old session must stay open while its request runs"
    assert info.version == "1.0.0" and outputs["y"].shape == (768, 768) and np.isfinite(outputs["y"]).all()
    assert host.open_sessions() == 1  # closed when its last request ended
    assert host.watch_counters("heavy").inferences == 0  # the request counted for 1.0.0, not 2.0.0
    assert host.stats("heavy").inferences == 1


def test_swaps_under_concurrent_load_never_fail_a_request(models: dict[str, Path], host: ModelHost) -> None:
    """Four threads call infer while activate() swaps 20 times between two versions on two runtimes.

    Zero failures, and every reply is wholly the output of the version the host says ran it.
    """
    releases: dict[str, tuple[Runtime, Path, np.ndarray]] = {
        "1.0.0": ("onnx", models["onnx0"], reference(0)), "1.1.0": ("tflite", models["tflite1"], reference(1))}
    runtime, path, _ = releases["1.0.0"]
    activate(host, path, runtime, version="1.0.0")
    stop = threading.Event()
    seen: dict[str, int] = {"1.0.0": 0, "1.1.0": 0}
    failures: list[BaseException] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                outputs, info = host.call("mlp", {"x": X})
                np.testing.assert_allclose(outputs["probs"], releases[info.version][2], rtol=1e-5, atol=1e-6)
                seen[info.version] += 1
            except BaseException as exc:  # noqa: BLE001 - any failure fails the test
                failures.append(exc)
                return

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows: the hold takes no lock
    try:
        for t in threads:
            t.start()
        for i in range(20):
            version = "1.1.0" if i % 2 == 0 else "1.0.0"
            runtime, path, _ = releases[version]
            activate(host, path, runtime, version=version)
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        sys.setswitchinterval(interval)
    assert failures == []
    assert seen["1.0.0"] > 0 and seen["1.1.0"] > 0
    assert host.stats("mlp").errors == 0 and host.stats("mlp").inferences == sum(seen.values())
    assert host.open_sessions() == 1  # every retired session was closed
