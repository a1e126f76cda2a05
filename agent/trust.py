"""python-tuf glue: the MQTT fetcher, the device's trusted metadata, the verified view.

python-tuf's ``ngclient.Updater`` makes every trust decision (root chain,
thresholds, versions, expiry, snapshot consistency, lengths and hashes). This
module gives it a transport (:class:`MqttFetcher`, which turns its URLs into
requests on the device's channel), keeps the device's trusted root durable
(python-tuf writes metadata without fsync: we keep our own fsynced copy of the
newest root and bootstrap from it), maps python-tuf's exceptions onto the
edgeship error tree, and turns the signed targets into :class:`Release` objects.

The Updater is synchronous; it runs in a worker thread and the fetcher hands
each request to the event loop that owns the MQTT connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from agent import safejson
from agent.channel import Channel, ChannelClosed, RequestTimeout
from agent.config import UpdateLimits
from agent.download import BlockedTarget
from agent.errors import (
    BadData, EdgeshipError, JsonError, KeyLoadError, LimitExceeded, LinkError, MetadataDigestMismatch, MetadataExpired,
    MetadataRejected, MetadataSignatureError, MetadataVersionError, UsageError,
)
from agent.fsutil import fsync_dir, write_atomic
from agent.keys import TrustedKey, public_key_from_pem
from agent.manifest import check_name, check_semver
from agent.protocol import DEFAULT_BLOCK, BlockRequest, MetaRequest
from agent.signing import TransferSignature

log = logging.getLogger(__name__)

META_URL = "edgeship-meta:/"
TARGET_URL = "edgeship-target:/"
RELEASE_KEYS_PATH = "edgeship/release-keys.json"


# --- transport --------------------------------------------------------------


class MqttFetcher(FetcherInterface):
    """python-tuf transport over the device's request/response channel.

    Called from the Updater's worker thread; each request runs on ``loop``.
    "Not found" becomes ``DownloadHTTPError(404)`` so python-tuf learns at once
    that root N+1 does not exist.

    With each root probe it also asks for ``timestamp.json``, which python-tuf
    always fetches next once the probe finds no newer root: a refresh with
    nothing new takes one round trip instead of two, and a refresh that finds
    a new release one fewer. The early answer is only a transport shortcut:
    python-tuf verifies it as if fetched in turn. It is used only if that very
    probe found no newer root (else it is dropped and asked again with the next
    probe), so it is never checked against a root older than the newest.
    """

    TIMESTAMP = "timestamp.json"

    def __init__(self, channel: Channel, loop: asyncio.AbstractEventLoop, limits: UpdateLimits) -> None:
        self._channel = channel
        self._loop = loop
        self._limits = limits
        self._early: concurrent.futures.Future[Any] | None = None
        """The timestamp asked for with the last root probe that found no newer root."""

    def _submit(self, req: MetaRequest | BlockRequest) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(
            self._channel.request(req, timeout=self._limits.request_timeout), self._loop)

    def _call(self, req: MetaRequest | BlockRequest, fut: concurrent.futures.Future[Any] | None = None) -> Any:
        """The reply to ``req`` (already submitted as ``fut``, if given), asked again with a new
        id after a link error other than the channel closing, up to ``request_retries`` attempts."""
        last: Exception | None = None
        for _ in range(self._limits.request_retries):
            fut = fut if fut is not None else self._submit(req)
            # The channel ends every request (a reply, RequestTimeout, ChannelClosed) in about
            # request_timeout: the refresh runs before any download, so nothing queues ahead of
            # it (publishing may add aiomqtt's own 10 s). Past that the loop is stuck: no retry.
            cap = 2 * self._limits.request_timeout + 10
            try:
                return fut.result(cap)
            except concurrent.futures.TimeoutError:
                if fut.done():  # the coroutine's own TimeoutError (one class since 3.11)
                    raise
                fut.cancel()
                raise RequestTimeout(f"no reply to {req.op} request within {cap:g} s") from None
            except ChannelClosed:
                raise  # the session ended: asking again on it is pointless (the next session refreshes)
            except LinkError as e:
                last, fut = e, None
                req = type(req)(**{**req.__dict__, "id": Channel.new_id()})
        raise LinkError(f"no answer for {req.op} request: {last}")

    def close(self) -> None:
        """Forget an early timestamp python-tuf did not ask for (it stopped before it)."""
        if self._early is not None:
            self._early.cancel()
            self._early = None

    def _meta(self, name: str) -> Any:
        req = MetaRequest(id=Channel.new_id(), name=name)
        early, self._early = self._early, None
        if name == self.TIMESTAMP and early is not None:
            return self._call(req, early)
        if early is not None:
            early.cancel()
        if not name.endswith(".root.json"):
            return self._call(req)
        fut = self._submit(req)
        early = self._submit(MetaRequest(id=Channel.new_id(), name=self.TIMESTAMP))
        try:
            reply = self._call(req, fut)
        except BaseException:
            early.cancel()
            raise
        if reply.status == "not_found":
            self._early = early
        else:
            early.cancel()
        return reply

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url.startswith(META_URL):
            name = url[len(META_URL):]
            reply = self._meta(name)
            self._check_status(reply, name)
            yield bytes(reply.body)
            return
        if not url.startswith(TARGET_URL):
            raise tuf_errors.DownloadError(f"unexpected URL {url!r}")
        path = url[len(TARGET_URL):]
        offset, total = 0, None
        while total is None or offset < total:
            reply = self._call(BlockRequest(id=Channel.new_id(), path=path, offset=offset, length=DEFAULT_BLOCK))
            self._check_status(reply, path)
            if reply.offset != offset or not reply.body or (total is not None and reply.total != total):
                raise tuf_errors.DownloadError(f"{path}: reply does not answer the block request at {offset}")
            total = reply.total
            offset += len(reply.body)
            yield bytes(reply.body)

    @staticmethod
    def _check_status(reply: Any, name: str) -> None:
        if reply.status == "not_found":
            raise tuf_errors.DownloadHTTPError(f"{name} not found", 404)
        if reply.status != "ok":
            raise tuf_errors.DownloadError(f"{name}: server answered {reply.status}: {reply.message}")


# --- the verified view --------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Release:
    """One bundle the repository signed, with the fields a device selects on."""

    name: str
    version: str
    runtime: str
    min_runtime: str
    arch: str
    accelerator: str | None
    groups: tuple[str, ...]
    published: str
    target: BlockedTarget
    transfer_signature: TransferSignature | None = None
    """A release key's signature over the target's block hashes (docs/bundle-format.md), if published."""


@dataclass(frozen=True, kw_only=True)
class TrustedView:
    timestamp_version: int
    targets_version: int
    expires: datetime
    releases: tuple[Release, ...]
    release_keys: tuple[TrustedKey, ...]


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise BadData(f"{where}: custom field {key!r} missing or not a string")
    return v


def parse_release(tf: TargetFile, *, hash_prefix: bool) -> Release | None:
    """A bundle target -> Release; None for targets that are not bundles. Raises BadData when malformed."""
    custom = tf.custom if isinstance(tf.custom, dict) else {}
    es = custom.get("edgeship")
    if not isinstance(es, dict) or es.get("kind") != "bundle":
        return None
    where = f"target {tf.path}"
    runtime = es.get("runtime") or {}
    dc = es.get("device_class") or {}
    if not isinstance(runtime, dict) or not isinstance(dc, dict):
        raise BadData(f"{where}: malformed runtime or device_class")
    arch = dc.get("arch", "any")
    if not isinstance(arch, str):
        raise BadData(f"{where}: device_class.arch must be a string")
    groups = es.get("groups", [])
    blocks = es.get("block_sha256")
    sha = tf.hashes.get("sha256")
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise BadData(f"{where}: groups must be a list of strings")
    if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks) or not sha:
        raise BadData(f"{where}: block hashes or sha256 missing")
    block_size = es.get("block_size")
    if type(block_size) is not int:
        raise BadData(f"{where}: block_size must be an integer")
    transfer = es.get("transfer_signature")
    if transfer is not None:
        try:
            transfer = TransferSignature.from_json(transfer)
        except BadData as e:  # only the shortcut is lost: the device hashes every file, as without one
            log.warning("%s: ignoring its transfer signature: %s", where, e)
            transfer = None
    dirname, sep, base = tf.path.rpartition("/")
    url_path = f"{dirname}{sep}{sha}.{base}" if hash_prefix else tf.path
    try:
        name, version = check_name(_str(es, "name", where)), check_semver(_str(es, "version", where))
    except EdgeshipError as e:
        raise BadData(f"{where}: {e}") from None
    return Release(
        name=name, version=version,
        runtime=_str(runtime, "name", where), min_runtime=_str(runtime, "min_version", where),
        arch=arch, accelerator=dc.get("accelerator") or None,
        groups=tuple(groups), published=str(es.get("published", "")),
        target=BlockedTarget(path=tf.path, url_path=url_path, length=tf.length, sha256=sha,
                             block_size=block_size, block_sha256=tuple(blocks)),
        transfer_signature=transfer,
    )


def parse_release_keys(data: bytes) -> tuple[TrustedKey, ...]:
    try:
        obj = safejson.loads(data, max_bytes=256 << 10, max_depth=8)
    except JsonError as e:
        raise BadData(f"release keys: {e}") from None
    if not isinstance(obj, dict) or obj.get("format") != 1 or not isinstance(obj.get("keys"), list):
        raise BadData("release keys: not a format-1 release key list")
    keys = []
    for entry in obj["keys"]:
        pem = entry.get("pem") if isinstance(entry, dict) else None
        if not isinstance(pem, str):
            raise BadData("release keys: an entry has no PEM")
        try:
            key = public_key_from_pem(pem.encode(), source="release-keys.json")
        except KeyLoadError as e:
            raise BadData(f"release keys: {e}") from None
        if entry.get("key_id") not in (None, key.key_id):
            raise BadData("release keys: a key id does not match its key")
        keys.append(key)
    if not keys:
        raise BadData("release keys: the list is empty")
    return tuple(keys)


# --- the device's trusted metadata --------------------------------------------


_TUF_ERRORS: tuple[tuple[type[Exception], type[MetadataRejected]], ...] = (
    (tuf_errors.ExpiredMetadataError, MetadataExpired),
    (tuf_errors.BadVersionNumberError, MetadataVersionError),
    (tuf_errors.UnsignedMetadataError, MetadataSignatureError),
    (tuf_errors.LengthOrHashMismatchError, MetadataDigestMismatch),
)


def _translate(e: Exception) -> EdgeshipError:
    if isinstance(e, EdgeshipError):
        return e
    if isinstance(e, tuf_errors.DownloadLengthMismatchError):
        return LimitExceeded(f"metadata larger than allowed: {e}")
    if isinstance(e, tuf_errors.RepositoryError):
        for tuf_type, ours in _TUF_ERRORS:
            if isinstance(e, tuf_type):
                err: MetadataRejected = ours(f"{type(e).__name__}: {e}")
                break
        else:
            err = MetadataRejected(f"{type(e).__name__}: {e}")
        err.cause = e  # type: ignore[attr-defined]
        return err
    if isinstance(e, tuf_errors.DownloadError):
        cause = e.__cause__
        if isinstance(cause, EdgeshipError):
            return cause
        return LinkError(f"metadata download failed: {e}")
    if isinstance(e, OSError):
        return EdgeshipError(f"cannot write trusted metadata: {e}")
    raise e


class TufClient:
    """The device's TUF state under ``state_dir/tuf``.

    ``trusted-root.json`` (our fsynced copy of the newest verified root) is the
    bootstrap; ``cache/`` is python-tuf's metadata directory.
    """

    def __init__(self, state_dir: Path, anchor: Path, limits: UpdateLimits) -> None:
        self.dir = state_dir / "tuf"
        self.cache = self.dir / "cache"
        self.root_file = self.dir / "trusted-root.json"
        self.keys_dir = self.dir / "release-keys"
        self.limits = limits
        self.cache.mkdir(parents=True, exist_ok=True)
        self.keys_dir.mkdir(exist_ok=True)
        if not self.root_file.exists():
            try:
                data = anchor.read_bytes()
            except OSError as e:
                raise UsageError(f"cannot read the trust anchor {anchor}: {e.strerror}") from None
            try:
                Metadata[Root].from_bytes(data)
            except Exception as e:  # noqa: BLE001 - python-tuf raises several types for bad JSON
                raise UsageError(f"trust anchor {anchor} is not TUF root metadata: {e}") from None
            write_atomic(self.root_file, data)

    def trusted_root_version(self) -> int:
        return int(Metadata[Root].from_bytes(self.root_file.read_bytes()).signed.version)

    def trusted_timestamp_version(self) -> int:
        try:
            return int(Metadata.from_bytes((self.cache / "timestamp.json").read_bytes()).signed.version)
        except Exception:  # noqa: BLE001 - absent or unreadable means "nothing trusted yet"
            return 0

    def _config(self) -> UpdaterConfig:
        lim = self.limits
        return UpdaterConfig(max_root_rotations=lim.max_root_rotations, root_max_length=lim.root_max_bytes,
                             timestamp_max_length=lim.timestamp_max_bytes,
                             snapshot_max_length=lim.snapshot_max_bytes, targets_max_length=lim.targets_max_bytes)

    def refresh(self, fetcher: FetcherInterface) -> TrustedView:
        """Run the TUF client workflow and return what the repository now signs. Blocking."""
        try:
            updater = Updater(str(self.cache), META_URL, None, TARGET_URL, fetcher, self._config(),
                              bootstrap=self.root_file.read_bytes())
            updater.refresh()
            view = self._view(updater)
        except Exception as e:  # noqa: BLE001 - translated into the edgeship error tree
            raise _translate(e) from e
        finally:
            self._persist()
        return view

    def _persist(self) -> None:
        """Make python-tuf's writes durable and keep our copy of the newest root."""
        for p in self.cache.glob("*.json"):
            if p.is_file() and not p.is_symlink():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(self.cache)
        history = self.cache / "root_history"
        newest = max((int(p.name.split(".")[0]) for p in history.glob("*.root.json")
                      if p.name.split(".")[0].isdigit()), default=0)
        if newest > self.trusted_root_version():
            data = (history / f"{newest}.root.json").read_bytes()
            # python-tuf only writes a root into root_history after verifying it.
            write_atomic(self.root_file, data)
            log.info("now trusting root version %d", newest)

    def _view(self, updater: Updater) -> TrustedView:
        # The only way to list every verified target; python-tuf >= 5 exposes the Signed objects.
        trusted = updater._trusted_set  # noqa: SLF001
        targets = trusted.targets
        hash_prefix = bool(trusted.root.consistent_snapshot)
        releases = []
        for path in sorted(targets.targets):
            tf = updater.get_targetinfo(path)  # the public, verified lookup
            if tf is None:
                continue
            try:
                rel = parse_release(tf, hash_prefix=hash_prefix)
            except BadData as e:
                log.warning("ignoring signed target %s: %s", path, e)
                continue
            if rel is not None:
                releases.append(rel)
        return TrustedView(
            timestamp_version=int(trusted.timestamp.version),
            targets_version=int(targets.version),
            expires=min(trusted.timestamp.expires, trusted.snapshot.expires, targets.expires),
            releases=tuple(releases),
            release_keys=self._release_keys(updater),
        )

    def _release_keys(self, updater: Updater) -> tuple[TrustedKey, ...]:
        tf = updater.get_targetinfo(RELEASE_KEYS_PATH)
        if tf is None:
            raise MetadataRejected(f"the repository signs no {RELEASE_KEYS_PATH}: no bundle can be trusted")
        if tf.length > self.limits.release_keys_max_bytes:
            raise LimitExceeded(f"{RELEASE_KEYS_PATH} is {tf.length} bytes, over the limit")
        cached = self.keys_dir / f"{tf.hashes.get('sha256', 'none')}.json"
        path = updater.find_cached_target(tf, str(cached))
        if path is None:
            path = updater.download_target(tf, str(cached))
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            for old in self.keys_dir.glob("*.json"):
                if old != cached:
                    old.unlink(missing_ok=True)
        return parse_release_keys(Path(path).read_bytes())
