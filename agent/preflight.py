"""Can this verified bundle run here, correctly? Checked before a bundle is used.

``check_fit`` is a pure decision over the manifest and facts about the device;
``selftest_bundle`` loads the model on the real runtime and runs the golden self-test.
"""

from __future__ import annotations

import logging
import platform
from typing import Any, Mapping

from agent.bundle import VerifiedBundle
from agent.errors import IncompatibleBundle, SelfTestFailed
from agent.manifest import Manifest, TensorSpec, version_tuple
from agent.runtime import open_session, runtime_version
from agent.selftest import load_cases, run_selftest

log = logging.getLogger(__name__)

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def normalize_arch(machine: str) -> str:
    m = machine.lower()
    return _ARCH_ALIASES.get(m, m)


def check_fit(
    manifest: Manifest,
    *,
    machine: str,
    runtimes: Mapping[str, str | None],
    accelerators: frozenset[str] = frozenset(),
) -> None:
    """Raise :class:`IncompatibleBundle` unless the bundle can run on this device.

    ``runtimes`` maps runtime name -> installed version (None when absent).
    """
    rt = manifest.runtime
    have = runtimes.get(rt.name)
    if have is None:
        raise IncompatibleBundle(f"{manifest.name} {manifest.version} needs the {rt.name} runtime, which is not installed")
    if version_tuple(have) < version_tuple(rt.min_version):
        raise IncompatibleBundle(
            f"{manifest.name} {manifest.version} needs {rt.name} >= {rt.min_version}; this device has {have}"
        )
    want = manifest.device_class
    if want.arch != "any" and normalize_arch(want.arch) != normalize_arch(machine):
        raise IncompatibleBundle(f"{manifest.name} {manifest.version} is built for {want.arch}; this device is {machine}")
    if want.accelerator is not None and want.accelerator not in accelerators:
        raise IncompatibleBundle(
            f"{manifest.name} {manifest.version} needs accelerator {want.accelerator!r}, which this device does not have"
        )
    log.debug("bundle %s %s fits: %s %s on %s", manifest.name, manifest.version, rt.name, have, machine)


def _check_declared(kind: str, declared: tuple[TensorSpec, ...], actual: tuple[TensorSpec, ...]) -> None:
    d = {t.name: t for t in declared}
    a = {t.name: t for t in actual}
    if set(d) != set(a):
        raise SelfTestFailed(f"the model's {kind}s {sorted(a)} differ from the manifest's {sorted(d)}")
    for name, t in d.items():
        if a[name].dtype != t.dtype or len(a[name].shape) != len(t.shape) or any(
            x != -1 and y != -1 and x != y for x, y in zip(a[name].shape, t.shape)
        ):
            raise SelfTestFailed(
                f"{kind} {name!r} is {a[name].dtype}{list(a[name].shape)} in the model but "
                f"{t.dtype}{list(t.shape)} in the manifest"
            )


def selftest_bundle(bundle: VerifiedBundle, *, threads: int = 1, max_selftest_bytes: int = 16 << 20,
                    fit_checked: bool = False) -> dict[str, Any]:
    """Check fit (unless the caller did, with its own device facts), load the model on this
    device's runtime and run its golden self-test.

    Raises :class:`IncompatibleBundle` or :class:`SelfTestFailed`; returns the measured figures.
    """
    m = bundle.manifest
    if not fit_checked:
        check_fit(m, machine=platform.machine(), runtimes={m.runtime.name: runtime_version(m.runtime.name)},
                  accelerators=frozenset())
    inputs, expected = load_cases(bundle.file(m.selftest.file).read_bytes(), max_bytes=max_selftest_bytes)
    with open_session(m.runtime.name, bundle.model_path, threads=threads) as session:
        _check_declared("input", m.inputs, session.inputs)
        _check_declared("output", m.outputs, session.outputs)
        result = run_selftest(session, inputs, expected, rtol=m.selftest.rtol, atol=m.selftest.atol)
        backend = session.backend
    return {
        "passed": result.passed,
        "cases": result.cases,
        "max_abs_error": result.max_abs_error,
        "max_rel_error": result.max_rel_error,
        "backend": backend,
    }
