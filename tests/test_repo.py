"""The TUF repository (packager.repo), checked with python-tuf's own client.

Real keys, real bundles, and ``tuf.ngclient.Updater`` reading the repository directory through a
tiny fetcher: if the client accepts it, a device will.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import DownloadHTTPError, ExpiredMetadataError, UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from agent.bundle import inspect_bundle
from agent.config import BundleLimits
from agent.errors import BadData, KeyLoadError, SignatureError, UntrustedSigner, UsageError
from agent.signing import TransferSignature, transfer_subject
from packager import repo_keys
from packager.repo import (
    BLOCK_SIZE,
    Expiry,
    VersionConflict,
    init_repo,
    publish,
    refresh_offline,
    refresh_online,
    release_keys_add,
    release_keys_remove,
    rotate,
    status,
    timestamp_version,
)
from packager.repo_publish import copy_hashed, transfer_signature_path
from packager.signer import sign_transfer
from packager.repo_store import rfc3339
from tests.conftest import KeyPair, build

NOW = datetime.now(timezone.utc)
BASE = "https://repo.invalid/"
V1 = "mlp/mlp-1.0.0.edge"
V2 = "mlp/mlp-2.0.0.edge"


# --- a device, as far as TUF goes ------------------------------------------------------------


class RepoDirFetcher(FetcherInterface):
    """Serves REPO/metadata and REPO/targets by URL, 404 for anything else."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo.resolve()

    def _fetch(self, url: str) -> Iterator[bytes]:
        rel = url[len(BASE):] if url.startswith(BASE) else ""
        path = (self.repo / rel).resolve()
        if rel.split("/")[0] not in ("metadata", "targets") or not path.is_relative_to(self.repo) \
                or not path.is_file():
            raise DownloadHTTPError(f"{url} not found", 404)
        return iter([path.read_bytes()])


def client(repo: Path, cache: Path, *, anchor: bytes | None = None) -> Updater:
    """An Updater whose cache is ``cache``; it trusts ``anchor`` (default: the repo's 1.root.json)."""
    (cache / "metadata").mkdir(parents=True, exist_ok=True)
    return Updater(str(cache / "metadata"), BASE + "metadata/", str(cache / "targets"), BASE + "targets/",
                   fetcher=RepoDirFetcher(repo),
                   bootstrap=anchor if anchor is not None else (repo / "metadata" / "1.root.json").read_bytes())


def device(repo: Path, cache: Path) -> Updater:
    """A device that already updated once: it trusts the newest root it has cached."""
    return client(repo, cache, anchor=(cache / "metadata" / "root.json").read_bytes())


def trusted_root_version(cache: Path) -> int:
    return int(json.loads((cache / "metadata" / "root.json").read_bytes())["signed"]["version"])


def target(up: Updater, path: str) -> TargetFile:
    info = up.get_targetinfo(path)
    assert info is not None, path
    return info


def fetch(up: Updater, path: str, dest: Path) -> bytes:
    return Path(up.download_target(target(up, path), str(dest))).read_bytes()


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path, release_key: KeyPair) -> Path:
    path = tmp_path / "repo"
    init_repo(path, release_keys=[release_key.public], now=NOW)
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, mlp_onnx: Path, release_key: KeyPair,
            other_key: KeyPair) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("repo-bundles")
    build(mlp_onnx, release_key, d / "v2.edge", version="2.0.0")
    build(mlp_onnx, release_key, d / "conflict.edge", version="1.0.0", selftest_cases=2)
    build(mlp_onnx, other_key, d / "foreign.edge", version="3.0.0")
    return {"v2": d / "v2.edge", "conflict": d / "conflict.edge", "foreign": d / "foreign.edge"}


def snapshot_of(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


# --- init, status ------------------------------------------------------------------------------


def test_init_layout(repo: Path, release_key: KeyPair, tmp_path: Path) -> None:
    md = repo / "metadata"
    assert sorted(p.name for p in md.iterdir()) == ["1.root.json", "1.snapshot.json", "1.targets.json",
                                                    "root.json", "timestamp.json"]
    assert (md / "root.json").read_bytes() == (md / "1.root.json").read_bytes()
    assert sorted(p.name for p in (repo / "keys" / "online").iterdir()) == ["snapshot.key", "timestamp.key"]
    offline = sorted(p.name.split("-")[0] for p in (repo / "keys" / "offline").iterdir())
    assert offline == ["root", "targets"]
    for key in (repo / "keys").rglob("*.key"):
        assert key.stat().st_mode & 0o777 == 0o600, key
    config = json.loads((repo / "repo.json").read_bytes())
    assert config["format"] == 1 and config["expiry_seconds"]["timestamp"] == 86400
    st = status(repo, NOW)
    assert [(r.role, r.version, r.expired) for r in st.roles] == [
        ("root", 1, False), ("targets", 1, False), ("snapshot", 1, False), ("timestamp", 1, False)]
    assert st.role("timestamp").seconds_left == 86400 - 1 or st.role("timestamp").seconds_left == 86400
    assert st.release_key_ids == (release_key.key_id,)
    assert [(t.path, t.kind) for t in st.targets] == [("edgeship/release-keys.json", "release-keys")]
    assert timestamp_version(repo) == 1


def test_init_refusals(repo: Path, release_key: KeyPair, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not an empty directory"):
        init_repo(repo, release_keys=[release_key.public], now=NOW)
    with pytest.raises(UsageError, match="threshold"):
        init_repo(tmp_path / "r2", release_keys=[release_key.public], root_threshold=2, root_keys=1, now=NOW)
    with pytest.raises(UsageError, match="release key"):
        init_repo(tmp_path / "r3", release_keys=[], now=NOW)
    with pytest.raises(KeyLoadError):
        init_repo(tmp_path / "r4", release_keys=[release_key.private], now=NOW)
    with pytest.raises(UsageError, match="expiry"):
        Expiry(timestamp=timedelta(0))
    with pytest.raises(ValueError, match="timezone"):
        status(repo, datetime.now())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no half-built repositories left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    info = init_repo(empty, release_keys=[release_key.public], root_threshold=2, root_keys=3, now=NOW)
    assert info.trust_anchor == empty / "metadata" / "1.root.json"
    assert info.thresholds["root"] == 2 and len(info.key_ids["root"]) == 3


# --- publish -----------------------------------------------------------------------------------


def test_fresh_client_gets_bundle_with_custom_fields(repo: Path, mlp_bundle: Path, release_key: KeyPair,
                                                     tmp_path: Path) -> None:
    res = publish(repo, mlp_bundle, groups=["lab", "canary", "lab"], now=NOW)
    data = mlp_bundle.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    assert res.changed and res.target_path == V1 and res.sha256 == sha and res.groups == ("canary", "lab")
    assert res.stored_path == repo / "targets" / "mlp" / f"{sha}.mlp-1.0.0.edge"
    assert res.signer == release_key.key_id and (res.targets_version, res.timestamp_version) == (2, 2)

    up = client(repo, tmp_path / "dev")
    up.refresh()
    info = up.get_targetinfo(V1)
    assert info is not None and info.length == len(data) and info.hashes == {"sha256": sha}
    manifest = inspect_bundle(mlp_bundle)
    assert info.custom == {"edgeship": {
        "kind": "bundle", "name": "mlp", "version": "1.0.0",
        "runtime": {"name": "onnx", "min_version": manifest["runtime"]["min_version"]},  # type: ignore[index]
        "device_class": {"arch": "any", "accelerator": None},
        "groups": ["canary", "lab"],
        "published": rfc3339(NOW),
        "block_size": 262144,
        "block_sha256": [hashlib.sha256(data[i:i + BLOCK_SIZE]).hexdigest() for i in range(0, len(data), BLOCK_SIZE)],
        "transfer_signature": TransferSignature.from_json(info.custom["edgeship"]["transfer_signature"]).to_json(),
    }}
    assert res.transfer_signer == release_key.key_id
    assert info.custom["edgeship"]["transfer_signature"]["keyid"] == release_key.key_id
    assert fetch(up, V1, tmp_path / "got.edge") == data

    keys_doc = json.loads(fetch(up, "edgeship/release-keys.json", tmp_path / "rk.json"))
    assert target(up, "edgeship/release-keys.json").custom == {"edgeship": {"kind": "release-keys"}}
    assert keys_doc["format"] == 1 and [k["key_id"] for k in keys_doc["keys"]] == [release_key.key_id]
    assert keys_doc["keys"][0]["pem"].encode() == release_key.public.read_bytes()


def test_block_hashes_of_a_multi_block_file(tmp_path: Path) -> None:
    data = os.urandom(2 * BLOCK_SIZE + 1234)
    (tmp_path / "big").write_bytes(data)
    inc = copy_hashed(tmp_path / "big", tmp_path, limits=BundleLimits())
    assert inc.path.read_bytes() == data and inc.length == len(data)
    starts = (0, BLOCK_SIZE, 2 * BLOCK_SIZE)
    assert inc.blocks == tuple(hashlib.sha256(data[i:i + BLOCK_SIZE]).hexdigest() for i in starts)
    assert inc.sha256 == hashlib.sha256(data).hexdigest()


def test_client_sees_v2_after_publish(repo: Path, mlp_bundle: Path, bundles: dict[str, Path], tmp_path: Path) -> None:
    publish(repo, mlp_bundle, now=NOW)
    up = client(repo, tmp_path / "dev")
    up.refresh()
    assert up.get_targetinfo(V1) is not None and up.get_targetinfo(V2) is None
    res = publish(repo, bundles["v2"], groups=["canary"], now=NOW)
    assert res.changed and (res.targets_version, res.timestamp_version) == (3, 3)
    up = device(repo, tmp_path / "dev")
    up.refresh()
    assert target(up, V2).custom["edgeship"]["groups"] == ["canary"]
    assert fetch(up, V2, tmp_path / "v2.edge") == bundles["v2"].read_bytes()
    assert up.get_targetinfo(V1) is not None


def test_identical_republish_is_a_noop_and_other_bytes_conflict(repo: Path, mlp_bundle: Path,
                                                                bundles: dict[str, Path]) -> None:
    publish(repo, mlp_bundle, groups=["canary"], now=NOW)
    before = snapshot_of(repo)
    again = publish(repo, mlp_bundle, now=NOW + timedelta(hours=1))
    assert not again.changed and "already published" in again.message and again.groups == ("canary",)
    with pytest.raises(VersionConflict, match="already published with different bytes"):
        publish(repo, bundles["conflict"], now=NOW)
    assert snapshot_of(repo) == before  # no version bumps, no files, no temp files
    assert timestamp_version(repo) == 2


def test_untrusted_signer_refused(repo: Path, bundles: dict[str, Path]) -> None:
    before = snapshot_of(repo)
    with pytest.raises(UntrustedSigner):
        publish(repo, bundles["foreign"], now=NOW)
    assert snapshot_of(repo) == before


def test_a_bundle_without_its_transfer_signature_is_published_without_one(repo: Path, mlp_bundle: Path,
                                                                         tmp_path: Path) -> None:
    alone = tmp_path / "alone" / mlp_bundle.name
    alone.parent.mkdir()
    shutil.copy(mlp_bundle, alone)
    res = publish(repo, alone, now=NOW)
    assert res.changed and res.transfer_signer is None
    up = client(repo, tmp_path / "dev")
    up.refresh()
    info = up.get_targetinfo(V1)
    assert info is not None and "transfer_signature" not in info.custom["edgeship"]


@pytest.mark.parametrize("case", ["other-build", "foreign-key", "second-release-key", "garbage"])
def test_a_transfer_signature_that_does_not_fit_the_bundle_is_refused_and_nothing_published(
        repo: Path, mlp_bundle: Path, bundles: dict[str, Path], other_key: KeyPair, tmp_path: Path, case: str) -> None:
    here = tmp_path / "in" / mlp_bundle.name
    here.parent.mkdir()
    shutil.copy(mlp_bundle, here)
    sidecar = transfer_signature_path(here)
    if case == "other-build":  # the signature of another build of the same name and version
        sidecar.write_bytes(transfer_signature_path(bundles["conflict"]).read_bytes())
        error, match = BadData, "signs other bytes than this bundle's"
    elif case == "foreign-key":  # the right blocks, signed by a key the repository does not trust
        sidecar.write_bytes(sign_transfer(here, other_key.signing(), subject_name=transfer_subject("mlp", "1.0.0"),
                                          shard_size=BLOCK_SIZE))
        error, match = UntrustedSigner, "transfer signature .*not trusted"
    elif case == "second-release-key":  # a release key, but not the one that signed the bundle
        release_keys_add(repo, other_key.public, now=NOW)
        sidecar.write_bytes(sign_transfer(here, other_key.signing(), subject_name=transfer_subject("mlp", "1.0.0"),
                                          shard_size=BLOCK_SIZE))
        error, match = SignatureError, "signs both with one key"
    else:
        sidecar.write_bytes(b"{not json")
        error, match = BadData, "transfer signature"
    before = snapshot_of(repo)
    with pytest.raises(error, match=match):
        publish(repo, here, now=NOW)
    assert snapshot_of(repo) == before


def test_republishing_the_same_bytes_reports_the_stored_transfer_signature_whatever_lies_beside_them(
        repo: Path, mlp_bundle: Path, tmp_path: Path) -> None:
    first = publish(repo, mlp_bundle, now=NOW)
    here = tmp_path / "again" / mlp_bundle.name
    here.parent.mkdir()
    shutil.copy(mlp_bundle, here)
    transfer_signature_path(here).write_bytes(b"stale")  # not read: nothing is published
    again = publish(repo, here, now=NOW)
    assert not again.changed and again.transfer_signer == first.transfer_signer is not None


def test_invalid_group_and_missing_keys(repo: Path, mlp_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="invalid group"):
        publish(repo, mlp_bundle, groups=["Canary"], now=NOW)
    with pytest.raises(UsageError, match="not found"):
        publish(repo, tmp_path / "nope.edge", now=NOW)
    usb = tmp_path / "usb"
    shutil.move(repo / "keys" / "offline", usb)
    with pytest.raises(KeyLoadError, match="targets metadata needs 1"):
        publish(repo, mlp_bundle, now=NOW)
    assert publish(repo, mlp_bundle, keys_dir=usb, now=NOW).changed
    rot = rotate(repo, "targets", keys_dir=usb, now=NOW)
    assert rot.new_key_files[0].parent == usb and rot.retired_key_files[0].parent == usb / "retired"


# --- expiry ------------------------------------------------------------------------------------


def test_expired_timestamp_refused_then_refreshed(repo: Path, mlp_bundle: Path, tmp_path: Path) -> None:
    publish(repo, mlp_bundle, now=NOW - timedelta(days=30))
    with pytest.raises(ExpiredMetadataError):
        client(repo, tmp_path / "dev").refresh()
    st = status(repo, NOW)
    assert st.role("timestamp").expired and st.role("snapshot").expired and not st.role("targets").expired
    assert st.role("timestamp").seconds_left < 0
    assert refresh_online(repo, now=NOW, margin=timedelta(hours=1))
    up = client(repo, tmp_path / "dev2")
    up.refresh()
    assert up.get_targetinfo(V1) is not None


def test_refresh_online_only_when_needed(repo: Path, tmp_path: Path) -> None:
    shutil.move(repo / "keys" / "offline", tmp_path / "usb")  # the server has only the online keys
    hour = timedelta(hours=1)
    assert not refresh_online(repo, now=NOW, margin=hour)
    assert timestamp_version(repo) == 1
    assert refresh_online(repo, now=NOW + timedelta(hours=23.5), margin=hour)
    st = status(repo, NOW)
    assert (st.role("snapshot").version, st.role("timestamp").version) == (1, 2)
    assert not refresh_online(repo, now=NOW + timedelta(hours=23.5), margin=hour)
    assert refresh_online(repo, now=NOW + timedelta(days=6, hours=23.5), margin=hour)
    st = status(repo, NOW)
    assert (st.role("targets").version, st.role("snapshot").version, st.role("timestamp").version) == (1, 2, 3)
    client(repo, tmp_path / "dev").refresh()


def test_concurrent_refresh_online_is_consistent(repo: Path, tmp_path: Path) -> None:
    n = 6
    barrier = threading.Barrier(n)
    results: list[bool] = []
    errors: list[BaseException] = []

    def server(when: datetime) -> None:
        try:
            barrier.wait()
            results.append(refresh_online(repo, now=when, margin=timedelta(hours=1)))
        except BaseException as e:  # surfaced below
            errors.append(e)

    for when in (NOW + timedelta(hours=23.5), NOW + timedelta(days=6, hours=23.5)):
        results.clear()
        threads = [threading.Thread(target=server, args=(when,)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and sorted(results) == [False] * (n - 1) + [True]
    assert timestamp_version(repo) == 3
    assert status(repo, NOW).role("snapshot").version == 2
    client(repo, tmp_path / "dev").refresh()


def test_refresh_offline(repo: Path, tmp_path: Path) -> None:
    day = timedelta(days=1)
    assert refresh_offline(repo, now=NOW, margin=day) == []
    assert refresh_offline(repo, now=NOW + timedelta(days=89.5), margin=day) == ["targets"]
    assert refresh_offline(repo, now=NOW + timedelta(days=364.5), margin=day) == ["root", "targets"]
    st = status(repo, NOW)
    assert [r.version for r in st.roles] == [2, 3, 3, 3]
    up = client(repo, tmp_path / "dev")
    up.refresh()
    assert trusted_root_version(tmp_path / "dev") == 2


# --- rotation ----------------------------------------------------------------------------------


def test_root_rotated_twice_client_on_root_1_follows(repo: Path, mlp_bundle: Path, tmp_path: Path) -> None:
    publish(repo, mlp_bundle, now=NOW)
    old = client(repo, tmp_path / "old-device")
    old.refresh()
    first = rotate(repo, "root", now=NOW)
    second = rotate(repo, "root", now=NOW)
    assert (first.root_version, second.root_version) == (2, 3)
    assert set(first.new_key_ids).isdisjoint(first.old_key_ids) and second.old_key_ids == first.new_key_ids
    md = repo / "metadata"
    assert (md / "root.json").read_bytes() == (md / "3.root.json").read_bytes()
    assert len(list((repo / "keys" / "retired").glob("root-*.key"))) == 2
    assert status(repo, NOW).role("root").key_ids == second.new_key_ids
    for cache, up in ((tmp_path / "new-device", client(repo, tmp_path / "new-device")),
                      (tmp_path / "old-device", device(repo, tmp_path / "old-device"))):
        up.refresh()
        assert trusted_root_version(cache) == 3
        assert fetch(up, V1, cache / "got.edge") == mlp_bundle.read_bytes()


def test_root_with_threshold_rotation(tmp_path: Path, release_key: KeyPair) -> None:
    path = tmp_path / "repo"
    init_repo(path, release_keys=[release_key.public], root_threshold=2, root_keys=3, now=NOW)
    os.unlink(next((path / "keys" / "offline").glob("root-*.key")))  # one root key lost: 2 of 3 still sign
    res = rotate(path, "root", now=NOW, threshold=1, count=1)
    assert res.root_version == 2 and len(res.new_key_ids) == 1 and len(res.retired_key_files) == 2
    up = client(path, tmp_path / "dev")
    up.refresh()
    assert trusted_root_version(tmp_path / "dev") == 2


def test_root_signed_only_by_new_key_is_refused(repo: Path, tmp_path: Path) -> None:
    current: Metadata[Root] = Metadata.from_file(str(repo / "metadata" / "root.json"))
    old_key = repo_keys.find(repo / "keys" / "offline", "root", current.signed.roles["root"].keyids)[0]
    new_key = CryptoSigner.generate_ed25519()
    forged = Metadata.from_bytes(current.to_bytes())
    forged.signed.revoke_key(old_key.keyid, "root")
    forged.signed.add_key(new_key.public_key, "root")
    forged.signed.version = 2
    forged.sign(new_key)
    (repo / "metadata" / "2.root.json").write_bytes(forged.to_bytes())
    with pytest.raises(UnsignedMetadataError):
        client(repo, tmp_path / "dev").refresh()
    forged.sign(old_key.signer, append=True)  # control: with the old root's signature too it is accepted
    (repo / "metadata" / "2.root.json").write_bytes(forged.to_bytes())
    client(repo, tmp_path / "dev2").refresh()
    assert trusted_root_version(tmp_path / "dev2") == 2


def test_rotate_timestamp_snapshot_targets(repo: Path, mlp_bundle: Path, bundles: dict[str, Path],
                                           tmp_path: Path) -> None:
    publish(repo, mlp_bundle, now=NOW)
    cache = tmp_path / "device"
    client(repo, cache).refresh()
    for i, role in enumerate(("timestamp", "snapshot", "targets"), start=2):
        res = rotate(repo, role, now=NOW)  # type: ignore[arg-type]
        assert res.root_version == i and res.retired_key_files[0].parent == repo / "keys" / "retired"
        assert status(repo, NOW).role(role).key_ids == res.new_key_ids  # type: ignore[arg-type]
        for up in (device(repo, cache), client(repo, tmp_path / f"fresh-{role}")):
            up.refresh()
            assert up.get_targetinfo(V1) is not None
    assert sorted(p.name for p in (repo / "keys" / "online").iterdir()) == ["snapshot.key", "timestamp.key"]
    ts_key = repo_keys.load(repo / "keys" / "online" / "timestamp.key", "timestamp")
    assert (ts_key.keyid,) == status(repo, NOW).role("timestamp").key_ids
    publish(repo, bundles["v2"], now=NOW)  # signed with the new targets key
    up = device(repo, cache)
    up.refresh()
    assert fetch(up, V2, tmp_path / "v2.edge") == bundles["v2"].read_bytes()


# --- release keys ------------------------------------------------------------------------------


def test_release_keys_add_remove(repo: Path, mlp_bundle: Path, bundles: dict[str, Path], release_key: KeyPair,
                                 other_key: KeyPair, tmp_path: Path) -> None:
    up = client(repo, tmp_path / "dev")
    up.refresh()
    before = target(up, "edgeship/release-keys.json")
    added = release_keys_add(repo, other_key.public, now=NOW)
    assert added.changed and added.key_ids == (release_key.key_id, other_key.key_id)
    assert not release_keys_add(repo, other_key.public, now=NOW).changed
    up = device(repo, tmp_path / "dev")
    up.refresh()
    after = target(up, "edgeship/release-keys.json")
    assert after.hashes != before.hashes
    doc = json.loads(fetch(up, "edgeship/release-keys.json", tmp_path / "rk.json"))
    assert [k["key_id"] for k in doc["keys"]] == [release_key.key_id, other_key.key_id]
    assert publish(repo, bundles["foreign"], now=NOW).changed  # other_key may sign now

    removed = release_keys_remove(repo, release_key.key_id[:12], now=NOW)
    assert removed.changed and removed.key_ids == (other_key.key_id,)
    with pytest.raises(UsageError, match="last release key"):
        release_keys_remove(repo, other_key.key_id, now=NOW)
    with pytest.raises(UsageError, match="not in the repository"):
        release_keys_remove(repo, release_key.key_id, now=NOW)
    with pytest.raises(UntrustedSigner):
        publish(repo, mlp_bundle, now=NOW)
    assert status(repo, NOW).release_key_ids == (other_key.key_id,)
