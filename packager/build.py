"""Build a signed bundle: model -> manifest -> statement -> signature -> archive.

Every parameter that affects the bytes a device runs ends up in a signed file:
the model files, the manifest (runtime, device class, tensors, tolerance,
quantization report) and the golden self-test.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from agent.fsutil import fsync_dir, sha256_file, write_atomic
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from agent import __version__, safejson
from agent.archive import write_archive
from agent.bundle import open_bundle
from agent.errors import ManifestError, ModelError, UsageError
from agent.keys import TrustedKey
from agent.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SELFTEST_NAME,
    SIGNATURE_NAME,
    DeviceClass,
    Manifest,
    RuntimeReq,
    SelfTestSpec,
    TensorSpec,
    check_name,
    check_semver,
)
from agent.runtime import open_session, runtime_version
from agent.selftest import default_tolerance, generate_inputs, run_selftest, save_cases
from agent.signing import build_statement, transfer_subject
from packager.data import load_samples
from packager.introspect import ModelInfo, read_signature
from packager.keys import SigningKey
from packager.progress import Reporter, Silent
from packager.repo_publish import BLOCK_SIZE, transfer_signature_path
from packager.signer import sign_statement, sign_transfer

log = logging.getLogger(__name__)

LABELS_NAME = "labels.txt"
MAX_LABELS_BYTES = 1 << 20


@dataclass(frozen=True, kw_only=True)
class BuildRequest:
    """Everything ``edgeship build`` was asked for."""

    model: Path
    name: str
    version: str
    out: Path | None = None
    labels: Path | None = None
    sample_inputs: Path | None = None
    selftest_cases: int = 4
    arch: str = "any"
    accelerator: str | None = None
    min_runtime: str | None = None
    force: bool = False
    quantization_report: Mapping[str, Any] | None = None
    quantized: bool = False
    """The model was quantized or converted to lower precision: self-test tolerance is wider."""

    def __post_init__(self) -> None:
        try:
            check_name(self.name)
            check_semver(self.version)
        except ManifestError as e:
            raise UsageError(str(e)) from None
        if not 1 <= self.selftest_cases <= 64:
            raise UsageError("--selftest-cases must be between 1 and 64")

    def output_path(self) -> Path:
        return self.out if self.out is not None else Path.cwd() / f"{self.name}-{self.version}.edge"


@dataclass(frozen=True, kw_only=True)
class BuildResult:
    path: Path
    manifest: Manifest
    signer: str
    files: Mapping[str, tuple[int, str]]
    """file name -> (size, sha256)"""
    bundle_sha256: str
    bundle_size: int
    transfer_signature: Path
    """``NAME-VERSION.edge.sig`` beside the bundle: its block hashes, signed (docs/bundle-format.md)."""
    selftest: Mapping[str, Any] = field(default_factory=dict)


def _created() -> str:
    """Creation time, UTC; SOURCE_DATE_EPOCH makes builds reproducible."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    ts = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return ts.replace(microsecond=0).isoformat().replace("+00:00", "Z")





def _selftest_inputs(req: BuildRequest, specs: Sequence[TensorSpec]) -> list[dict[str, np.ndarray]]:
    if req.sample_inputs is not None:
        samples = load_samples(req.sample_inputs, specs, what="--sample-inputs")
        return samples.all_feeds(req.selftest_cases)
    return generate_inputs(specs, cases=req.selftest_cases, seed=0)


def _payload_model_names(info: ModelInfo) -> list[str]:
    reserved = {MANIFEST_NAME, SIGNATURE_NAME, SELFTEST_NAME, LABELS_NAME}
    model_name = "model.onnx" if info.runtime == "onnx" else "model.tflite"
    names = [model_name, *info.external_data_files]
    clash = [n for n in info.external_data_files if n in reserved or n == model_name]
    if clash:
        raise UsageError(f"external data file name(s) {clash} clash with bundle file names; rename them")
    return names


def build_bundle(
    req: BuildRequest,
    key: SigningKey,
    *,
    reporter: Reporter | None = None,
    model_info: ModelInfo | None = None,
) -> BuildResult:
    """Build, sign and write the bundle atomically; verify it by reading it back.

    A failed build leaves neither the bundle nor temporary files behind.
    """
    rep = reporter or Silent()
    out = req.output_path()
    if out.exists() and not req.force:
        raise UsageError(f"{out} already exists; pass --force to replace it (a released version should never change)")
    if not out.parent.is_dir():
        raise UsageError(f"output directory does not exist: {out.parent}")
    if req.labels is not None and not req.labels.is_file():
        raise UsageError(f"labels file not found: {req.labels}")

    with rep.step(f"Reading model {req.model.name}"):
        info = model_info or read_signature(req.model)
    rv = runtime_version(info.runtime)
    if rv is None:
        raise ModelError(f"the {info.runtime} runtime is not installed on this machine: it is needed to compute the self-test")

    stage = Path(tempfile.mkdtemp(prefix=".edgeship-build-", dir=out.parent))
    tmp_bundle: Path | None = None
    try:
        names = _payload_model_names(info)
        shutil.copyfile(req.model, stage / names[0])
        for ext in info.external_data_files:
            src = req.model.parent / ext
            if not src.is_file():
                raise UsageError(f"external data file {ext!r} referenced by {req.model.name} not found next to it")
            shutil.copyfile(src, stage / ext)
        labels_name = None
        if req.labels is not None:
            data = req.labels.read_bytes()
            if len(data) > MAX_LABELS_BYTES:
                raise UsageError(f"labels file {req.labels.name} is larger than {MAX_LABELS_BYTES} bytes")
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"labels file {req.labels.name} is not UTF-8 text") from None
            (stage / LABELS_NAME).write_bytes(data)
            labels_name = LABELS_NAME

        with rep.step(f"Running the model on {req.selftest_cases} self-test input(s) ({info.runtime} {rv})"):
            session = open_session(info.runtime, stage / names[0])
            try:
                inputs = _selftest_inputs(req, session.inputs)
                outputs = [session.run(feeds) for feeds in inputs]
                for i, outs in enumerate(outputs):
                    for tname, arr in outs.items():
                        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                            raise ModelError(f"the model outputs NaN/Inf for self-test case {i} (tensor {tname!r}); refusing to sign it")
                rtol, atol = 0.0, 0.0
                for s in session.outputs:
                    r, a = default_tolerance(s.dtype, req.quantized or s.quantization is not None)
                    rtol, atol = max(rtol, r), max(atol, a)
                result = run_selftest(session, inputs, outputs, rtol=rtol, atol=atol)
            finally:
                session.close()
            (stage / SELFTEST_NAME).write_bytes(save_cases(inputs, outputs))

        manifest = Manifest(
            format=FORMAT_VERSION,
            name=req.name,
            version=req.version,
            created=_created(),
            runtime=RuntimeReq(name=info.runtime, min_version=req.min_runtime or info.min_runtime_version),
            device_class=DeviceClass(arch=req.arch, accelerator=req.accelerator),
            model_files=tuple(names),
            labels=labels_name,
            inputs=tuple(session.inputs),
            outputs=tuple(session.outputs),
            selftest=SelfTestSpec(file=SELFTEST_NAME, cases=len(inputs), rtol=rtol, atol=atol),
            quantization=req.quantization_report,
            builder={
                "edgeship": __version__,
                "runtime": rv,
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
        )
        (stage / MANIFEST_NAME).write_bytes(safejson.dumps(manifest.to_dict()))

        with rep.step(f"Signing with key {key.key_id[:16]}"):
            files = {n: sha256_file(stage / n) for n in manifest.payload_files()}
            statement = build_statement(subject_name=req.name, resources={n: d for n, (_, d) in files.items()})
            (stage / SIGNATURE_NAME).write_bytes(sign_statement(statement, key))

        with rep.step(f"Writing {out.name}"):
            fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
            tmp_bundle = Path(tmp_name)
            order = [MANIFEST_NAME, SIGNATURE_NAME, *[n for n in manifest.payload_files() if n != MANIFEST_NAME]]
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # a bundle is public; mkstemp's 0600 is for secrets
            with os.fdopen(fd, "wb") as fh:
                write_archive([(n, stage / n) for n in order], fh)
                fh.flush()
                os.fsync(fh.fileno())

        with rep.step("Verifying the written bundle"):
            check_dir = stage / "verify"
            check_dir.mkdir()
            open_bundle(tmp_bundle, check_dir, trusted_keys=[TrustedKey(key_id=key.key_id, public_key=key.public_key)])

        sidecar = transfer_signature_path(out)
        with rep.step(f"Signing its blocks into {sidecar.name}"):
            transfer = sign_transfer(tmp_bundle, key, subject_name=transfer_subject(req.name, req.version),
                                     shard_size=BLOCK_SIZE)
        # The bundle first, then its transfer signature: a crash between them leaves the old
        # signature beside the new bundle, which publish refuses by name (it signs other bytes).
        os.replace(tmp_bundle, out)
        tmp_bundle = None
        fsync_dir(out.parent)
        write_atomic(sidecar, transfer)
    finally:
        if tmp_bundle is not None:
            tmp_bundle.unlink(missing_ok=True)
        shutil.rmtree(stage, ignore_errors=True)

    size, digest = sha256_file(out)
    log.info("wrote %s (%d bytes, sha256 %s)", out, size, digest)
    return BuildResult(
        path=out,
        manifest=manifest,
        signer=key.key_id,
        files=files,
        bundle_sha256=digest,
        bundle_size=size,
        transfer_signature=sidecar,
        selftest={"cases": result.cases, "max_abs_error": result.max_abs_error, "rtol": rtol, "atol": atol},
    )
