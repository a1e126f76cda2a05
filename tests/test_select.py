"""Release selection: a pure decision over verified releases and device facts."""

from __future__ import annotations

import pytest

from agent.errors import VersionConflict
from agent.select import DeviceFacts, decide
from agent.trust import Release
from tests.fakeserver import blocked_target

FACTS = DeviceFacts(machine="x86_64", runtimes={"onnx": "1.32.0", "tflite": None}, groups=("canary",))


def rel(version: str, *, name: str = "digits", groups: tuple[str, ...] = (), runtime: str = "onnx",
        min_runtime: str = "1.17.0", arch: str = "any", accelerator: str | None = None, seed: int = 0) -> Release:
    data = f"{name}-{version}-{seed}".encode() * 50
    return Release(name=name, version=version, runtime=runtime, min_runtime=min_runtime, arch=arch,
                   accelerator=accelerator, groups=groups, published="",
                   target=blocked_target(data, path=f"{name}/{name}-{version}.edge"))


def test_newest_fitting_release_wins() -> None:
    rels = [rel("1.0.0"), rel("1.10.0"), rel("1.9.0"), rel("1.10.0-rc.1"), rel("3.0.0", name="other")]
    d = decide(rels, model="digits", facts=FACTS, current=None, seen={})
    assert d.action == "fetch" and d.release is not None and d.release.version == "1.10.0"
    # semver precedence: a pre-release of a newer version beats an older release
    d = decide([*rels, rel("2.0.0-rc.1")], model="digits", facts=FACTS, current=None, seen={})
    assert d.release is not None and d.release.version == "2.0.0-rc.1"


def test_groups_runtime_arch_and_accelerator_filter() -> None:
    rels = [rel("1.0.0"), rel("2.0.0", groups=("beta",)), rel("3.0.0", runtime="tflite"),
            rel("4.0.0", min_runtime="9.0"), rel("5.0.0", arch="aarch64"), rel("6.0.0", accelerator="npu"),
            rel("1.5.0", groups=("canary", "beta"))]
    d = decide(rels, model="digits", facts=FACTS, current=None, seen={})
    assert d.release is not None and d.release.version == "1.5.0"
    assert {v for v, _ in d.skipped} == {"2.0.0", "3.0.0", "4.0.0", "5.0.0", "6.0.0"}


def test_up_to_date_is_an_outcome_not_an_error() -> None:
    r = rel("1.0.0")
    d = decide([r], model="digits", facts=FACTS, current=("1.0.0", r.target.sha256), seen={"1.0.0": r.target.sha256})
    assert d.action == "up_to_date"
    assert decide([], model="digits", facts=FACTS, current=None, seen={}).action == "none_available"


def test_never_downgrades() -> None:
    d = decide([rel("1.0.0")], model="digits", facts=FACTS, current=("2.0.0", "ab" * 32), seen={})
    assert d.action == "up_to_date"


def test_same_version_with_new_content_is_refused() -> None:
    old, new = rel("1.0.0", seed=1), rel("1.0.0", seed=2)
    with pytest.raises(VersionConflict, match="different bytes"):
        decide([new], model="digits", facts=FACTS, current=("1.0.0", old.target.sha256),
               seen={"1.0.0": old.target.sha256})


def test_refused_release_is_not_retried() -> None:
    bad = rel("2.0.0")
    d = decide([rel("1.0.0"), bad], model="digits", facts=FACTS, current=None, seen={},
               refused=frozenset({bad.target.sha256}))
    assert d.release is not None and d.release.version == "1.0.0"
