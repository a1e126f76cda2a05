"""Broker-level attacks on the update channel, against real Mosquitto.

The attacker is :class:`tests.updatechannel.EvilServer`: it answers the
device's requests from the real repository through the real request handler,
then alters what it publishes, the way anyone who can publish on a device's
reply topic could. Each attack must be refused with a typed error, and the
device's trusted state (TUF metadata, staged bundles, model records) must be
exactly what it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from datetime import timedelta
from pathlib import Path

import pytest

from agent.daemon import Agent
from agent.errors import (
    BlockRejected, EdgeshipError, LimitExceeded, LinkError, MetadataDigestMismatch, MetadataExpired,
    MetadataVersionError, UntrustedSigner, VersionConflict,
)
from agent.errors import DigestMismatch
from agent.signing import read_transfer_signature, transfer_subject
from agent.archive import extract_archive, write_archive
from agent.config import BundleLimits
from agent.protocol import HINT_TOPIC, BlockRequest, MetaRequest, Reply, decode_reply, encode_reply, resp_topic
from agent.settings import AgentConfig
from packager.repo import BLOCK_SIZE, init_repo, publish, release_keys_add, release_keys_remove
from packager.repo_publish import PublishResult, transfer_signature_path
from packager.repo_chain import commit
from packager.repo_keys import signers_for
from packager.repo_store import Layout, load_chain, load_config, locked
from packager.signer import sign_transfer
from tests.conftest import KeyPair, build
from tests.modelfactory import onnx_mlp
from tests.mosquitto import Broker, broker_module  # noqa: F401 - fixture
from tests.updatechannel import EvilServer, agent_config, held_state, make_repo, now, publish_raw, running_server, trusted_snapshot


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, mlp_onnx: Path, mlp_tflite: Path, release_key: KeyPair,
            other_key: KeyPair) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("attack-bundles")
    for sub in ("big", "o", "s"):
        (out / sub).mkdir()
    big = onnx_mlp(out / "big.onnx", in_features=256, hidden=1024, seed=3)  # ~1 MiB: several 256 KiB blocks
    return {
        "1.0.0": build(mlp_onnx, release_key, out / "mlp-1.0.0.edge", version="1.0.0").path,
        "1.1.0": build(mlp_onnx, release_key, out / "mlp-1.1.0.edge", version="1.1.0").path,
        "1.1.0-big": build(big, release_key, out / "big" / "mlp-1.1.0.edge", version="1.1.0").path,
        "1.0.0-other-bytes": build(mlp_tflite, release_key, out / "o" / "mlp-1.0.0.edge", version="1.0.0").path,
        "1.1.0-other-signer": build(mlp_onnx, other_key, out / "s" / "mlp-1.1.0.edge", version="1.1.0").path,
    }


@pytest.fixture
def repo(tmp_path: Path, release_key: KeyPair, bundles: dict[str, Path]) -> Path:
    return make_repo(tmp_path / "repo", release_key.public, bundles["1.0.0"])


class Device:
    """A device that already holds v1.0.0 (fetched through the honest server)."""

    def __init__(self, broker: Broker, repo: Path, state: Path, device: str = "dev1", **limits: float) -> None:
        self.config: AgentConfig = agent_config(broker.url, state, repo / "metadata" / "1.root.json",
                                                device=device, limits={"request_timeout": 1, "request_retries": 2,
                                                                       **limits})
        self.broker = broker
        self.repo = repo
        self.state = state
        self.stale_timestamp = b""

    def bootstrap(self) -> None:
        async def go() -> None:
            async with running_server(self.repo, self.broker.url):
                await Agent(self.config).run_once()
        asyncio.run(go())
        assert self.agent().model_state("mlp").current.version == "1.0.0"  # type: ignore[union-attr]

    def agent(self) -> Agent:
        return Agent(self.config)

    def attacked(self, tamper: Callable[..., list[tuple[str, bytes]]] | None, **kw: float) -> tuple[Agent, EvilServer, BaseException | None]:
        """One update cycle through the attacker; returns the agent, the attacker and what run_once raised."""
        agent = self.agent()
        evil = EvilServer(self.repo, self.config.broker, tamper=tamper, **kw)  # type: ignore[arg-type]
        raised: list[BaseException] = []

        async def go() -> None:
            async with evil.running():
                try:
                    await agent.run_once()
                except EdgeshipError as e:
                    raised.append(e)
        asyncio.run(go())
        return agent, evil, raised[0] if raised else None


def refused(device: Device, tamper: Callable[..., list[tuple[str, bytes]]] | None,
            error: type[Exception] | tuple[type[Exception], ...], *, metadata_unchanged: bool = False,
            **kw: float) -> tuple[Agent, BaseException]:
    """The attack fails with ``error``; what the device holds is unchanged, and with
    ``metadata_unchanged`` so is every byte of its TUF state (attacks on metadata itself).
    Attacks on blocks come after a genuine refresh, so the device may trust the newer metadata."""
    held, trusted = held_state(device.state), trusted_snapshot(device.state)
    agent, _, exc = device.attacked(tamper, **kw)
    assert isinstance(exc, error), f"expected {error}, got {exc!r}"
    assert held_state(device.state) == held, "the device's bundles or model records changed under attack"
    if metadata_unchanged:
        assert trusted_snapshot(device.state) == trusted, "trusted metadata changed under attack"
    assert agent.model_state("mlp").current.version == "1.0.0"  # type: ignore[union-attr]
    if isinstance(exc, (BlockRejected, LinkError)):  # reported on the model's record
        assert type(exc).__name__ in (agent.model_state("mlp").last_error or "")
    return agent, exc


def on_blocks(change: Callable[[BlockRequest, Reply], list[bytes]]) -> Callable[..., list[tuple[str, bytes]]]:
    """A tamper function that rewrites block replies and passes everything else through."""
    def tamper(device: str, req: MetaRequest | BlockRequest, reply: bytes) -> list[tuple[str, bytes]]:
        if not isinstance(req, BlockRequest) or not req.path.startswith("mlp/"):
            return [(resp_topic(device), reply)]
        return [(resp_topic(device), p) for p in change(req, decode_reply(reply))]
    return tamper


def on_meta(name: str, change: Callable[[bytes], bytes]) -> Callable[..., list[tuple[str, bytes]]]:
    def tamper(device: str, req: MetaRequest | BlockRequest, reply: bytes) -> list[tuple[str, bytes]]:
        if isinstance(req, MetaRequest) and req.name == name:
            r = decode_reply(reply)
            reply = encode_reply(Reply(id=r.id, status="ok", body=change(bytes(r.body)), total=r.total))
        return [(resp_topic(device), reply)]
    return tamper


def rebody(r: Reply, body: bytes) -> bytes:
    return encode_reply(Reply(id=r.id, status=r.status, body=body, offset=r.offset, total=r.total))


@pytest.fixture
def device(broker_module: Broker, repo: Path, tmp_path: Path, bundles: dict[str, Path]) -> Device:
    d = Device(broker_module, repo, tmp_path / "state")
    d.bootstrap()
    d.stale_timestamp = (repo / "metadata" / "timestamp.json").read_bytes()
    publish(repo, bundles["1.1.0-big"], now=now())
    return d


def test_honest_path_for_comparison(device: Device) -> None:
    agent, evil, exc = device.attacked(None)
    print("STATE", agent.model_state("mlp"), exc)
    assert exc is None and agent.model_state("mlp").current.version == "1.1.0"  # type: ignore[union-attr]
    asked = [r for _, r in evil.requests if isinstance(r, BlockRequest) and r.path.endswith(".mlp-1.1.0.edge")]
    assert len(asked) >= 2 and sum(-(-r.length // BLOCK_SIZE) for r in asked) >= 4  # several replies, several blocks


def test_bundle_bytes_altered_in_transit(device: Device) -> None:
    def flip(req: BlockRequest, r: Reply) -> list[bytes]:
        body = bytearray(r.body)
        body[len(body) // 2] ^= 0x01
        return [rebody(r, bytes(body))]
    _, exc = refused(device, on_blocks(flip), BlockRejected)
    assert "does not match its signed hash" in str(exc)


def test_block_from_another_bundle(device: Device, bundles: dict[str, Path]) -> None:
    other = bundles["1.0.0-other-bytes"].read_bytes() * 400  # as long as needed

    def swap(req: BlockRequest, r: Reply) -> list[bytes]:
        return [rebody(r, other[req.offset:req.offset + len(r.body)])]
    refused(device, on_blocks(swap), BlockRejected)


def test_truncated_block(device: Device) -> None:
    refused(device, on_blocks(lambda req, r: [rebody(r, r.body[: len(r.body) // 2])]), BlockRejected)


def test_truncated_stream_stops_as_a_link_error(device: Device) -> None:
    agent, exc = refused(device, on_blocks(lambda req, r: []), LinkError)
    assert "no answer" in str(exc)


def test_duplicated_blocks_are_harmless(device: Device) -> None:
    def twice(device_id: str, req: MetaRequest | BlockRequest, reply: bytes) -> list[tuple[str, bytes]]:
        return [(resp_topic(device_id), reply)] * 2

    agent, _, exc = device.attacked(twice)
    print("STATE", agent.model_state("mlp"), exc)
    assert exc is None and agent.model_state("mlp").current.version == "1.1.0"  # type: ignore[union-attr]
    assert sum(c.unmatched for c in agent.status.channels) > 0  # the duplicates were dropped, not used twice


def test_out_of_order_blocks_are_harmless(device: Device) -> None:
    def later_first(req: MetaRequest | BlockRequest) -> float:
        return 0.4 - req.offset / (4 << 20) if isinstance(req, BlockRequest) else 0.0

    agent, evil, exc = device.attacked(None, reply_delay=later_first)  # type: ignore[arg-type]
    print("STATE", agent.model_state("mlp"), exc)
    assert exc is None and agent.model_state("mlp").current.version == "1.1.0"  # type: ignore[union-attr]
    asked = [r.offset for _, r in evil.requests if isinstance(r, BlockRequest)]
    answered = [r.offset for r in evil.answered if isinstance(r, BlockRequest)]
    assert sorted(asked) == sorted(answered) and answered != asked  # replies overtook each other


def test_replies_addressed_to_another_device_are_ignored(broker_module: Broker, repo: Path, tmp_path: Path,
                                                         bundles: dict[str, Path]) -> None:
    publish(repo, bundles["1.1.0-big"], now=now())
    devs = [Device(broker_module, repo, tmp_path / f"s{i}", device=f"dev{i}") for i in (1, 2)]

    def cross(device_id: str, req: MetaRequest | BlockRequest, reply: bytes) -> list[tuple[str, bytes]]:
        other = "dev2" if device_id == "dev1" else "dev1"
        return [(resp_topic(other), reply), (resp_topic(device_id), reply)]  # the foreign copy first

    agents = [d.agent() for d in devs]
    evil = EvilServer(repo, devs[0].config.broker, tamper=cross)

    async def go() -> None:
        async with evil.running():
            await asyncio.gather(*(a.run_once() for a in agents))
    asyncio.run(go())
    for a in agents:
        assert a.model_state("mlp").current.version == "1.1.0"  # type: ignore[union-attr]
        assert sum(c.unmatched for c in a.status.channels) > 0


def test_malformed_messages_are_dropped(device: Device) -> None:
    junk = [b"", b"\x00" * 10, b"ES1\x00\xff\xff\xff\xff", b"{}", b"ES1\x00\x00\x00\x00\x05{}{}{"]

    def tamper(device_id: str, req: MetaRequest | BlockRequest, reply: bytes) -> list[tuple[str, bytes]]:
        return [(resp_topic(device_id), j) for j in junk] + [(resp_topic(device_id), reply)]

    async def bad_hint() -> None:
        await publish_raw(device.config.broker, HINT_TOPIC, b"not a hint", retain=True)
    asyncio.run(bad_hint())
    agent, _, exc = device.attacked(tamper)
    print("STATE", agent.model_state("mlp"), exc)
    assert exc is None and agent.model_state("mlp").current.version == "1.1.0"  # type: ignore[union-attr]
    assert sum(c.malformed for c in agent.status.channels) >= len(junk)


def test_endless_data_is_cut_off(device: Device) -> None:
    def flood(req: BlockRequest, r: Reply) -> list[bytes]:
        extra = [encode_reply(Reply(id=f"{i:016x}", status="ok", body=b"x" * 900_000)) for i in range(3)]
        return [*extra, rebody(r, r.body)]
    refused(device, on_blocks(flood), LimitExceeded)


def test_oversize_metadata(device: Device) -> None:
    refused(device, on_meta("timestamp.json", lambda b: b + b" " * 20_000), LimitExceeded, metadata_unchanged=True)


def test_replayed_older_metadata_is_a_rollback(device: Device) -> None:
    agent, _, exc = device.attacked(None)  # the device moves on to the newer timestamp
    print("STATE", agent.model_state("mlp"), exc)
    assert exc is None and agent.model_state("mlp").current.version == "1.1.0"  # type: ignore[union-attr]
    before = trusted_snapshot(device.state)
    agent, _, exc = device.attacked(on_meta("timestamp.json", lambda b: device.stale_timestamp))
    assert isinstance(exc, MetadataVersionError)
    assert trusted_snapshot(device.state) == before
    assert agent.model_state("mlp").current.version == "1.1.0"  # type: ignore[union-attr]


def test_snapshot_targets_mix_and_match(device: Device) -> None:
    newest = max((device.repo / "metadata").glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))
    older = device.repo / "metadata" / f"{int(newest.name.split('.')[0]) - 1}.targets.json"
    trusted_targets = (device.state / "tuf" / "cache" / "targets.json").read_bytes()
    _, exc = refused(device, on_meta(newest.name, lambda b: older.read_bytes()),
                     (MetadataVersionError, MetadataDigestMismatch))
    # the new timestamp and snapshot are genuine and may be kept; the targets the device trusts are not replaced
    assert (device.state / "tuf" / "cache" / "targets.json").read_bytes() == trusted_targets


def test_expired_timestamp_is_a_freeze(broker_module: Broker, tmp_path: Path, release_key: KeyPair,
                                       bundles: dict[str, Path]) -> None:
    repo = tmp_path / "old-repo"
    then = now() - timedelta(days=2)
    init_repo(repo, release_keys=[release_key.public], now=then)
    publish(repo, bundles["1.0.0"], now=then)
    d = Device(broker_module, repo, tmp_path / "state")
    d.agent()  # first start: the trust anchor becomes the trusted root
    root = (d.state / "tuf" / "trusted-root.json").read_bytes()
    agent, _, exc = d.attacked(None)  # nobody re-signs: the attacker serves the stale metadata
    assert isinstance(exc, MetadataExpired)
    assert agent.model_state("mlp").staged is None and not list((d.state / "bundles").iterdir())
    assert (d.state / "tuf" / "trusted-root.json").read_bytes() == root
    assert not [p.name for p in (d.state / "tuf" / "cache").glob("*.json") if p.name != "root.json"]


def test_unknown_signer_is_refused_for_good(broker_module: Broker, repo: Path, tmp_path: Path,
                                            bundles: dict[str, Path], other_key: KeyPair, release_key: KeyPair) -> None:
    d = Device(broker_module, repo, tmp_path / "state")
    d.bootstrap()
    # other_key was a release key when 1.1.0 was published, then it was withdrawn
    release_keys_add(repo, other_key.public, now=now())
    publish(repo, bundles["1.1.0-other-signer"], now=now())
    release_keys_remove(repo, other_key.key_id, now=now())
    before = {k: v for k, v in trusted_snapshot(d.state).items() if not k.startswith("tuf/")}
    agent, _, exc = d.attacked(None)
    assert isinstance(exc, UntrustedSigner)
    state = agent.model_state("mlp")
    assert state.current.version == "1.0.0"  # type: ignore[union-attr]
    assert any("UntrustedSigner" in r for r in state.refused.values())
    after = {k: v for k, v in trusted_snapshot(d.state).items() if not k.startswith(("tuf/", "models/"))}
    assert after == {k: v for k, v in before.items() if not k.startswith("models/")}
    again, evil, exc2 = d.attacked(None)  # not retried: no block of it is fetched again
    assert exc2 is None and not evil.block_offsets()


def test_same_version_with_new_content_is_refused(broker_module: Broker, repo: Path, tmp_path: Path,
                                                  bundles: dict[str, Path]) -> None:
    d = Device(broker_module, repo, tmp_path / "state")
    d.bootstrap()
    # The repository is made to sign other bytes as mlp 1.0.0 (a mistaken unpublish, then a re-publish).
    layout = Layout(repo).require()
    with locked(layout):
        chain = load_chain(layout)
        del chain.targets.signed.targets["mlp/mlp-1.0.0.edge"]
        root = chain.root.signed
        keys = {"targets": signers_for(root, "targets", layout.keys_offline),
                "snapshot": signers_for(root, "snapshot", layout.keys_online),
                "timestamp": signers_for(root, "timestamp", layout.keys_online)}
        commit(layout, chain, start="targets", keys=keys, expiry=load_config(layout).expiry, now=now())
    publish(repo, bundles["1.0.0-other-bytes"], now=now())
    before = {k: v for k, v in trusted_snapshot(d.state).items() if not k.startswith("tuf/")}
    agent, evil, exc = d.attacked(None)
    assert isinstance(exc, VersionConflict)
    assert {k: v for k, v in trusted_snapshot(d.state).items() if not k.startswith(("tuf/", "models/"))} == \
        {k: v for k, v in before.items() if not k.startswith("models/")}
    assert agent.model_state("mlp").current.version == "1.0.0"  # type: ignore[union-attr]
    assert not evil.block_offsets()  # refused before a single block was fetched


def _resign_targets(repo: Path, change: Callable[[dict[str, Any]], None], path: str = "mlp/mlp-1.1.0.edge") -> None:
    """What a holder of the targets key could do: change a bundle target's custom fields and re-sign."""
    layout = Layout(repo).require()
    with locked(layout):
        chain = load_chain(layout)
        change(chain.targets.signed.targets[path].unrecognized_fields["custom"]["edgeship"])
        root = chain.root.signed
        keys = {"targets": signers_for(root, "targets", layout.keys_offline),
                "snapshot": signers_for(root, "snapshot", layout.keys_online),
                "timestamp": signers_for(root, "timestamp", layout.keys_online)}
        commit(layout, chain, start="targets", keys=keys, expiry=load_config(layout).expiry, now=now())


def _transfer_signature_of(bundle: Path, key: KeyPair, version: str = "1.1.0") -> dict[str, str]:
    sig, _ = read_transfer_signature(sign_transfer(bundle, key.signing(), subject_name=transfer_subject("mlp", version),
                                                   shard_size=BLOCK_SIZE), max_bytes=1 << 20, max_depth=16)
    return sig.to_json()


@pytest.fixture
def broken_build(tmp_path: Path, bundles: dict[str, Path], release_key: KeyPair) -> Path:
    """mlp 1.1.0 whose selftest.npz no longer matches model.sig (as a broken build could make it), with a
    genuine transfer signature beside it: the release key signed these exact blocks."""
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    with open(bundles["1.1.0-big"], "rb") as fh:
        members = extract_archive(fh, unpacked, BundleLimits())
    with open(unpacked / "selftest.npz", "ab") as fh:
        fh.write(b"\n")
    odd = tmp_path / "broken" / "mlp-1.1.0.edge"
    odd.parent.mkdir()
    with open(odd, "wb") as out:
        write_archive([(n, unpacked / n) for n in members], out)
    transfer_signature_path(odd).write_bytes(
        sign_transfer(odd, release_key.signing(), subject_name=transfer_subject("mlp", "1.1.0"), shard_size=BLOCK_SIZE))
    return odd


def _publish_unchecked(repo: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> PublishResult:
    """Publish without the member digests publish itself checks (so that a broken build gets in)."""
    from agent.bundle import verify_stream

    def unhashed(path: Path, **kw: Any) -> Any:
        with open(path, "rb") as fh:
            return verify_stream(fh, member_digests=False, **kw)
    with monkeypatch.context() as m:
        m.setattr("packager.repo_publish.verify_file", unhashed)
        return publish(repo, bundle, now=now())


def _cycle(d: Device) -> tuple[Agent, list[dict[str, Any]], EdgeshipError | None]:
    """One update cycle through the honest server: the agent, its events for mlp, what run_once raised."""
    events: list[dict[str, Any]] = []
    agent = Agent(d.config, on_event=events.append)
    raised: list[EdgeshipError] = []

    async def go() -> None:
        async with running_server(d.repo, d.broker.url):
            try:
                await agent.run_once()
            except EdgeshipError as e:
                raised.append(e)
    asyncio.run(go())
    return agent, [e for e in events if e.get("model") == "mlp"], raised[0] if raised else None


def test_a_transfer_signature_vouches_for_the_bytes_and_install_still_checks_every_file(
        broker_module: Broker, repo: Path, tmp_path: Path, broken_build: Path, release_key: KeyPair,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a transfer signature the verifier checks the bundle's signature, names and manifest but
    does not hash the files again (the release key signed every block): a file that no longer
    matches model.sig, in a bundle the release key signed block by block, is staged; install hashes
    every file and refuses it."""
    from agent.install import prepare

    d = Device(broker_module, repo, tmp_path / "state")
    d.bootstrap()
    assert _publish_unchecked(repo, broken_build, monkeypatch).transfer_signer == release_key.key_id
    agent, events, exc = _cycle(d)
    assert exc is None
    assert any(e["step"] == "downloading" and e.get("transfer_signer") == release_key.key_id for e in events)
    staged = agent.model_state("mlp").staged  # it waits for 1.0.0's watch window to close
    assert staged is not None and staged.version == "1.1.0"
    with pytest.raises(DigestMismatch, match="selftest.npz' does not match its signed digest"):
        prepare(agent.store, staged, trusted_keys=[release_key.trusted()], facts=agent.facts, reserve_bytes=0)


@pytest.mark.parametrize("forgery", ["unknown-key", "other-bundle", "malformed"])
def test_a_forged_transfer_signature_does_not_spare_a_single_member_digest(
        broker_module: Broker, repo: Path, tmp_path: Path, bundles: dict[str, Path], broken_build: Path,
        other_key: KeyPair, release_key: KeyPair, monkeypatch: pytest.MonkeyPatch, forgery: str) -> None:
    """The targets key alone cannot make a device skip the member digests: a transfer signature that
    is not a release key's over exactly the blocks TUF lists is ignored, so the bundle is checked
    file by file as without one, and the broken build is refused before it is staged."""
    d = Device(broker_module, repo, tmp_path / "state")
    d.bootstrap()
    transfer_signature_path(broken_build).unlink()
    assert _publish_unchecked(repo, broken_build, monkeypatch).transfer_signer is None
    forged: Any
    if forgery == "unknown-key":  # the right blocks, signed by a key that is not a release key
        forged = _transfer_signature_of(broken_build, other_key)
    elif forgery == "other-bundle":  # a genuine release-key signature, over another bundle's blocks
        forged = _transfer_signature_of(bundles["1.1.0"], release_key)
    else:
        forged = {"keyid": release_key.key_id, "sig": "not base64"}
    _resign_targets(repo, lambda es: es.update(transfer_signature=forged))
    agent, events, exc = _cycle(d)
    assert isinstance(exc, DigestMismatch) and "selftest.npz" in str(exc)
    assert [e for e in events if e["step"] == "downloading" and "transfer_signer" not in e]
    state = agent.model_state("mlp")
    assert state.current.version == "1.0.0" and state.staged is None  # type: ignore[union-attr]
    assert any("DigestMismatch" in r and "selftest.npz" in r for r in state.refused.values())


def test_a_signed_bundle_with_a_wrong_gzip_crc_is_staged_and_installed_alike(
        broker_module: Broker, repo: Path, tmp_path: Path, bundles: dict[str, Path], release_key: KeyPair,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The device skips the gzip CRC-32 when it verifies a download (every block matched TUF's
    hash) and when it installs it, so it never stages a bundle that install then refuses. (edgeship
    publish checks the CRC-32; here another tool published the bundle.)"""
    import functools

    from agent.bundle import verify_file
    from agent.install import prepare

    data = bytearray(bundles["1.1.0-big"].read_bytes())
    data[-8] ^= 0xFF  # the trailer's CRC-32
    odd = tmp_path / "mlp-1.1.0.edge"
    odd.write_bytes(bytes(data))
    d = Device(broker_module, repo, tmp_path / "state")
    d.bootstrap()
    monkeypatch.setattr("packager.repo_publish.verify_file", functools.partial(verify_file, gzip_crc=False))
    publish(repo, odd, now=now())
    agent, _, exc = d.attacked(None)
    staged = agent.model_state("mlp").staged
    assert exc is None and staged is not None and staged.version == "1.1.0"
    release = prepare(agent.store, staged, trusted_keys=[release_key.trusted()], facts=agent.facts, reserve_bytes=0)
    assert release.version == "1.1.0" and release.path.is_dir()
