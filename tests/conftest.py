"""Shared fixtures: real keys, real models, real bundles (built once per session)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.archive import extract_archive, write_archive
from agent.config import BundleLimits
from agent.keys import TrustedKey, load_public_key
from agent.manifest import MANIFEST_NAME, SIGNATURE_NAME

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path
    key_id: str

    def trusted(self) -> TrustedKey:
        return load_public_key(self.public)

    def signing(self):  # type: ignore[no-untyped-def]
        from packager.keys import load_private_key

        return load_private_key(self.private, passphrase=None)


def make_keypair(directory: Path, name: str) -> KeyPair:
    from packager.keys import generate_keypair

    directory.mkdir(parents=True, exist_ok=True)
    gen = generate_keypair(directory, name=name)
    return KeyPair(private=gen.private_path, public=gen.public_path, key_id=gen.key_id)


@pytest.fixture(scope="session")
def release_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return make_keypair(tmp_path_factory.mktemp("keys"), "release")


@pytest.fixture(scope="session")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return make_keypair(tmp_path_factory.mktemp("keys-other"), "other")


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.modelfactory import onnx_mlp

    return onnx_mlp(tmp_path_factory.mktemp("models") / "mlp.onnx")


@pytest.fixture(scope="session")
def mlp_tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.modelfactory import tflite_mlp

    return tflite_mlp(tmp_path_factory.mktemp("models-tfl") / "mlp.tflite")


def build(model: Path, key: KeyPair, out: Path, *, name: str = "mlp", version: str = "1.0.0", **kw):  # type: ignore[no-untyped-def]
    from packager.build import BuildRequest, build_bundle

    req = BuildRequest(model=model, name=name, version=version, out=out, **kw)
    return build_bundle(req, key.signing())


@pytest.fixture(scope="session")
def mlp_bundle(tmp_path_factory: pytest.TempPathFactory, mlp_onnx: Path, release_key: KeyPair) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "mlp-1.0.0.edge"
    build(mlp_onnx, release_key, out)
    return out


def unpack(bundle: Path, dest: Path) -> dict[str, Path]:
    """Extract a bundle without verifying it (to tamper with it)."""
    dest.mkdir(parents=True, exist_ok=True)
    with open(bundle, "rb") as fh:
        members = extract_archive(fh, dest, BundleLimits())
    return {n: dest / n for n in members}


def repack(files: list[tuple[str, Path]], out: Path) -> Path:
    with open(out, "wb") as fh:
        write_archive(files, fh)
    return out


def archive_order(files: dict[str, Path]) -> list[tuple[str, Path]]:
    """Members in the order the builder writes them: manifest, signature, then the rest by name."""
    return [(n, files[n]) for n in sorted(files, key=lambda n: (n != MANIFEST_NAME, n != SIGNATURE_NAME, n))]


def resign(files: dict[str, Path], directory: Path, key: KeyPair, subject: str = "mlp") -> None:
    """Sign the unpacked ``directory`` again with ``key`` (after editing its files)."""
    from packager.signer import sign_directory

    files[SIGNATURE_NAME].write_bytes(sign_directory(directory, key.signing(), subject_name=subject))


def with_other_model(bundle: Path, model: Path, key: KeyPair, workdir: Path, out: Path, *, subject: str) -> Path:
    """``bundle`` with its model file replaced by ``model``, validly re-signed: its self-test,
    recorded with the original model, no longer holds on a real runtime."""
    files = unpack(bundle, workdir)
    shutil.copyfile(model, files["model.onnx"])
    resign(files, workdir, key, subject)
    return repack(archive_order(files), out)


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst
