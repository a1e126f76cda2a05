"""Install, switch, watch, commit and roll back: real bundles, real store, real self-tests, a fake host."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import InstallConfig, WatchConfig
from agent.deploy import Deployer, judge
from agent.errors import IncompatibleBundle, SelfTestFailed, StorageError
from agent.fsutil import sha256_file
from agent.runtime import runtime_version
from agent.select import DeviceFacts
from agent.store import Store, Watch
from tests.conftest import KeyPair, build, with_other_model
from tests.modelfactory import onnx_mlp, onnx_sqrt_model

FACTS = DeviceFacts(machine="x86_64", runtimes={"onnx": runtime_version("onnx"), "tflite": runtime_version("tflite")})


@dataclass
class FakeCounters:
    sha256: str = ""
    inferences: int = 0
    errors: int = 0
    nonfinite: int = 0
    over_budget: int = 0


@dataclass
class FakeHost:
    """Records activations; the test sets the watch counters."""

    active: dict[str, tuple[str, str]] = field(default_factory=dict)
    counters: dict[str, FakeCounters] = field(default_factory=dict)
    activations: list[tuple[str, str]] = field(default_factory=list)
    watching: dict[str, bool] = field(default_factory=dict)

    def activate(self, model: str, *, version: str, sha256: str, model_path: Any, runtime: Any, manifest: Any,
                 threads: int = 1, latency_budget_ms: float = 0.0, watching: bool = True) -> None:
        assert Path(model_path).is_file()
        self.active[model] = (version, sha256)
        self.watching[model] = watching
        self.counters[model] = FakeCounters(sha256=sha256)
        self.activations.append((model, version))

    def deactivate(self, model: str) -> None:
        self.active.pop(model, None)

    def end_watch(self, model: str) -> None:
        self.watching[model] = False

    def watch_counters(self, model: str) -> FakeCounters:
        return self.counters[model]


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory, mlp_onnx: Path, release_key: KeyPair) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("deploy-bundles")
    bundles = {v: build(mlp_onnx, release_key, out / f"mlp-{v}.edge", version=v).path for v in ("1.0.0", "1.1.0")}
    # 1.2.0: validly signed, but its model is not the one its self-test was recorded with
    good = build(mlp_onnx, release_key, out / "base-1.2.0.edge", version="1.2.0").path
    bundles["1.2.0-bad-selftest"] = with_other_model(good, onnx_mlp(out / "other.onnx", seed=7), release_key,
                                                     out / "x", out / "mlp-1.2.0.edge", subject="mlp")
    bundles["1.3.0-needs-new-runtime"] = build(mlp_onnx, release_key, out / "mlp-1.3.0.edge", version="1.3.0",
                                               min_runtime="99.0.0").path
    return bundles


def stage(store: Store, bundle: Path, version: str) -> str:
    sha = sha256_file(bundle)[1]
    tmp = store.downloads / f"{sha}.part"
    shutil.copyfile(bundle, tmp)
    store.stage(store.load("mlp"), version=version, sha256=sha, verified_file=tmp)
    return sha


def deployer(tmp_path: Path, host: FakeHost, **install: Any) -> tuple[Deployer, Store, list[dict[str, Any]]]:
    store = Store(tmp_path / "state")
    events: list[dict[str, Any]] = []
    d = Deployer(store, host, facts=FACTS, watch=WatchConfig(inferences=5, seconds=3600),
                 install=InstallConfig(**install), emit=lambda step, **f: events.append({"step": step, **f}))
    d.start(["mlp"])
    return d, store, events


def install(d: Deployer, key: KeyPair) -> None:
    asyncio.run(d.install("mlp", [key.trusted()]))


def test_judge() -> None:
    w = Watch(sha256="s", started="", inferences=10, seconds=60)
    assert judge(FakeCounters(inferences=3), watch=w, elapsed=1).verdict == "wait"
    assert judge(FakeCounters(inferences=10), watch=w, elapsed=1).verdict == "commit"
    assert judge(FakeCounters(inferences=1), watch=w, elapsed=61).verdict == "commit"
    assert judge(FakeCounters(inferences=99, nonfinite=1), watch=w, elapsed=99).verdict == "rollback"
    assert judge(FakeCounters(errors=2), watch=w, elapsed=0).reason.startswith("2 failed")
    assert judge(FakeCounters(over_budget=1), watch=w, elapsed=0).verdict == "rollback"


def test_install_watch_commit_then_rollback(tmp_path: Path, releases: dict[str, Path], release_key: KeyPair) -> None:
    host = FakeHost()
    d, store, events = deployer(tmp_path, host)
    sha1 = stage(store, releases["1.0.0"], "1.0.0")
    install(d, release_key)
    st = store.load("mlp")
    assert st.status == "watching" and st.active.sha256 == sha1 and st.staged is None  # type: ignore[union-attr]
    assert host.active["mlp"] == ("1.0.0", sha1) and host.watching["mlp"]
    assert not store.bundle_path(sha1).exists() and store.release_dir(sha1).is_dir()
    host.counters["mlp"].inferences = 5
    d.check_watches(["mlp"])
    assert store.load("mlp").status == "active"
    assert not host.watching["mlp"]  # committed: the host samples its NaN/Inf check from now on

    sha2 = stage(store, releases["1.1.0"], "1.1.0")
    install(d, release_key)
    assert host.active["mlp"] == ("1.1.0", sha2) and store.load("mlp").previous.sha256 == sha1  # type: ignore[union-attr]
    host.counters["mlp"].inferences = 2
    host.counters["mlp"].nonfinite = 1
    d.check_watches(["mlp"])
    st = store.load("mlp")
    assert st.status == "rolled_back" and st.active.sha256 == sha1 and sha2 in st.refused  # type: ignore[union-attr]
    assert host.active["mlp"] == ("1.0.0", sha1) and not host.watching["mlp"]  # back on a committed release
    assert not store.release_dir(sha2).exists()  # the failed release is pruned
    assert [e["step"] for e in events].count("rolled_back") == 1


def test_selftest_failure_keeps_the_old_model(tmp_path: Path, releases: dict[str, Path], release_key: KeyPair) -> None:
    host = FakeHost()
    d, store, events = deployer(tmp_path, host)
    stage(store, releases["1.0.0"], "1.0.0")
    install(d, release_key)
    before = store.load("mlp").active
    bad = stage(store, releases["1.2.0-bad-selftest"], "1.2.0")
    install(d, release_key)  # deferred: 1.0.0 is still in its watch window
    assert store.load("mlp").staged.sha256 == bad  # type: ignore[union-attr]
    host.counters["mlp"].inferences = 5
    assert d.check_watches(["mlp"]) == ["mlp"]  # committed; 1.2.0 waits to install
    with pytest.raises(SelfTestFailed):
        install(d, release_key)
    st = store.load("mlp")
    assert st.active == before and st.status == "failed" and bad in st.refused and st.staged is None
    assert host.active["mlp"][0] == "1.0.0"
    assert [p.name for p in store.releases.iterdir()] == [before.sha256]  # type: ignore[union-attr]


def test_incompatible_runtime_is_refused(tmp_path: Path, releases: dict[str, Path], release_key: KeyPair) -> None:
    d, store, _ = deployer(tmp_path, FakeHost())
    stage(store, releases["1.3.0-needs-new-runtime"], "1.3.0")
    with pytest.raises(IncompatibleBundle, match="99.0.0"):
        install(d, release_key)
    assert store.load("mlp").active is None


def test_not_enough_disk_keeps_it_staged(tmp_path: Path, releases: dict[str, Path], release_key: KeyPair) -> None:
    d, store, _ = deployer(tmp_path, FakeHost(), reserve_bytes=1 << 60)
    sha = stage(store, releases["1.0.0"], "1.0.0")
    with pytest.raises(StorageError, match="not enough disk space"):
        install(d, release_key)
    st = store.load("mlp")
    assert st.staged.sha256 == sha and st.active is None and not st.refused  # type: ignore[union-attr]
    assert not list(store.releases.iterdir())


def test_restart_serves_active_resumes_watch_and_cleans_leftovers(tmp_path: Path, releases: dict[str, Path],
                                                                  release_key: KeyPair) -> None:
    d, store, _ = deployer(tmp_path, FakeHost())
    sha1 = stage(store, releases["1.0.0"], "1.0.0")
    install(d, release_key)
    # leftovers of interrupted steps
    (store.releases / ".deadbeef.1234").mkdir()
    (store.releases / ("f" * 64)).mkdir()
    (store.bundles / ("e" * 64 + ".edge")).write_bytes(b"x")
    (store.models / ".mlp.json.abc.tmp").write_bytes(b"{")
    host = FakeHost()
    d2, store2, _ = deployer(tmp_path, host)
    assert host.active["mlp"] == ("1.0.0", sha1)
    assert store2.load("mlp").status == "watching"  # the window starts again after a restart
    assert sorted(p.name for p in store2.releases.iterdir()) == [sha1]
    assert not list(store2.bundles.iterdir()) and not list(store2.models.glob(".*"))
    host.counters["mlp"].inferences = 5
    d2.check_watches(["mlp"])
    assert store2.load("mlp").status == "active"


def test_sqrt_model_passes_selftest_but_not_negative_inputs(tmp_path: Path, release_key: KeyPair) -> None:
    """The NaN-in-service model used by the rollback tests really is that: sanity of the fixture."""
    model = onnx_sqrt_model(tmp_path / "sqrt.onnx")
    np.savez(tmp_path / "samples.npz", x=np.abs(np.random.default_rng(0).standard_normal((4, 4))).astype(np.float32))
    res = build(model, release_key, tmp_path / "sqrt-1.0.0.edge", name="sqrt", sample_inputs=tmp_path / "samples.npz")
    assert res.selftest["cases"] == 4
    from agent.runtime import open_session

    with open_session("onnx", model) as s:
        y = s.run({"x": -np.ones((1, 4), np.float32)})["y"]
    assert np.isnan(y).all()
