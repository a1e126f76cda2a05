"""The update loop: connect, refresh on the hint and on a timer, fetch, verify, stage.

One :class:`Agent` is one device. It owns one MQTT connection (asyncio, so a
single process can host thousands of agents for fleet tests) and reconnects
with exponential backoff and jitter. Each update cycle:

1. refreshes TUF metadata through the server (python-tuf decides what is trusted);
2. for every model the device runs, picks the newest release that fits it;
3. downloads it block by block (resumable), each block checked against TUF;
4. verifies the whole file against TUF, then the bundle's own signature against
   the release keys the repository declares, and its fit to this device;
5. stages it ("verified and staged"); installing it is the store's next step.

Bad data is reported and not retried until the repository changes; a failed
link is retried with backoff, resuming the download where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import failpoint
from agent.aio import cancel_and_wait, wait_event
from agent.bundle import verify_stream
from agent.channel import Channel, ChannelStats
from agent.download import DownloadStats, GrowingReader, Progress, discard, download, part_path
from agent.errors import BadData, BlockRejected, EdgeshipError, LinkError, ManifestError
from agent.mqtt import device_channel
from agent.preflight import check_fit
from agent.protocol import HINT_TOPIC, MAX_BLOCK, ProtocolError, decode_hint, resp_topic
from agent.runtime import runtime_version
from agent.select import DeviceFacts, decide
from agent.deploy import Deployer, Host
from agent.reporting import DeviceReporting
from agent.settings import AgentConfig
from agent.signing import transfer_subject, verify_transfer_signature
from agent.store import ModelState, Store
from agent.trust import MqttFetcher, Release, TrustedView, TufClient

log = logging.getLogger(__name__)

Event = dict[str, Any]


@dataclass
class AgentStatus:
    connected: bool = False
    cycles: int = 0
    timestamp_version: int = 0
    last_error: str | None = None
    last_error_type: str | None = None
    last_exception: EdgeshipError | None = None
    hints: int = 0
    downloads: list[DownloadStats] = field(default_factory=list)
    channels: list[ChannelStats] = field(default_factory=list)
    """One per connection: replies dropped as malformed or unmatched are counted here."""


def _retrieve(client: Any) -> None:
    """Mark aiomqtt's connection futures as seen: a lost link is handled above, and an
    unretrieved exception would otherwise be logged as an error when they are collected."""
    for name in ("_connected", "_disconnected"):
        fut = getattr(client, name, None)
        if fut is not None and fut.done() and not fut.cancelled():
            fut.exception()


class Agent:
    def __init__(self, config: AgentConfig, *, on_event: Callable[[Event], None] | None = None,
                 host: Host | None = None) -> None:
        self.config = config
        self.store = Store(config.state_dir)
        self.tuf = TufClient(config.state_dir, config.root, config.limits)
        self.facts = DeviceFacts(
            machine=config.machine, accelerators=config.accelerators, groups=config.groups,
            runtimes={name: runtime_version(name) for name in ("onnx", "tflite")},
        )
        self.status = AgentStatus(timestamp_version=self.tuf.trusted_timestamp_version())
        self._on_event = on_event
        self._wake = asyncio.Event()
        self._random = random.Random()
        if host is None:
            from agent.host import ModelHost

            host = ModelHost()
        self.host = host
        self.reporting = DeviceReporting(config, self.store, host, self.facts.runtimes)
        self.deployer = Deployer(self.store, host, facts=self.facts, watch=config.watch, install=config.install,
                                 emit=self._event)
        self._started = False
        self._link_lost = asyncio.Event()

    def start(self) -> None:
        """Clean up after a crash and serve what the state files say (once per process)."""
        if not self._started:
            self._started = True
            self.deployer.start(self.config.models)

    # --- events -----------------------------------------------------------

    def _event(self, step: str, **fields: Any) -> None:
        ev: Event = {"step": step, **fields}
        log.info("%s %s", step, " ".join(f"{k}={v}" for k, v in fields.items()))
        self.reporting.event(step, fields)
        if self._on_event is not None:
            self._on_event(ev)

    def _error(self, exc: EdgeshipError, **fields: Any) -> None:
        self.status.last_error = str(exc)
        self.status.last_error_type = type(exc).__name__
        self.status.last_exception = exc
        self._event("error", error=type(exc).__name__, detail=str(exc), **fields)

    # --- connection -------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set, reconnecting on broker loss."""


        stop = stop or asyncio.Event()
        self.start()
        api = self._start_api()
        watcher = asyncio.ensure_future(self.deployer.watch_loop(self.config.models, stop))
        telemetry = asyncio.ensure_future(self.reporting.run(stop))
        try:
            await self._connect_loop(stop)
        finally:
            stop.set()
            await asyncio.gather(watcher, telemetry, return_exceptions=True)
            if api is not None:
                await asyncio.to_thread(api.stop)
            self.reporting.close()

    def _start_api(self) -> Any:
        """Start the inference API (agent.serve) on the configured address; record where it listens."""
        cfg = self.config.serve
        if not cfg.enabled:
            return None
        from agent.serve import InferenceServer, write_address

        api = InferenceServer(self.host, host=cfg.host, port=cfg.port,  # type: ignore[arg-type]
                              unix_socket=Path(cfg.unix_socket) if cfg.unix_socket else None).start()
        write_address(self.config.state_dir, api)
        self._event("serving", url=api.url)
        return api

    async def _connect_loop(self, stop: asyncio.Event) -> None:
        import aiomqtt

        from agent.mqtt import make_client

        delay = self.config.reconnect_min
        while not stop.is_set():
            client = make_client(self.config.broker, identifier=self.config.device_id,
                                 protocol=self.config.protocol, will=self.reporting.will())  # type: ignore[arg-type]
            try:
                async with client:
                    self.status.connected = True
                    delay = self.config.reconnect_min
                    self._event("connected", broker=self.config.broker.url)
                    await self._session(client, stop)
            except (aiomqtt.MqttError, LinkError) as e:
                log.warning("broker connection lost or refused: %s", e)
            finally:
                self.status.connected = False
                _retrieve(client)
            if stop.is_set():
                break
            wait = delay * (0.5 + self._random.random())
            delay = min(delay * 2, self.config.reconnect_max)
            log.info("reconnecting in %.1f s", wait)
            await wait_event(stop, wait)

    async def run_once(self) -> int:
        """Connect, run one update cycle, disconnect. Raises what the cycle hit."""
        import aiomqtt

        from agent.mqtt import make_client

        self.start()
        client = make_client(self.config.broker, identifier=self.config.device_id,
                             protocol=self.config.protocol)  # type: ignore[arg-type]
        try:
            async with client:
                channel = await self._open_channel(client)
                reader = asyncio.ensure_future(self._read_hints(client))
                try:
                    await self.update_cycle(channel)
                finally:
                    channel.close()
                    self.reporting.close()
                    await cancel_and_wait((reader,))
        except aiomqtt.MqttError as e:
            raise LinkError(f"broker {self.config.broker.url}: {e}") from None
        if self.status.last_exception is not None:
            raise self.status.last_exception
        return 0

    async def _open_channel(self, client: Any) -> Channel:
        lost = self._link_lost = asyncio.Event()
        # A publish on a dead link ends the session: reconnect, resume. Replies reach the channel
        # as paho reads them (agent.mqtt.device_channel); hints still arrive through _read.
        channel = device_channel(client, self.config.device_id, max_body=MAX_BLOCK, on_link_lost=lost.set)
        self.status.channels.append(channel.stats)
        await client.subscribe([(resp_topic(self.config.device_id), 1), (HINT_TOPIC, 1)])  # one round trip
        return channel

    async def _session(self, client: Any, stop: asyncio.Event) -> None:
        channel = await self._open_channel(client)
        reader = asyncio.ensure_future(self._read_hints(client))
        await self.reporting.connected(client)
        reports = asyncio.ensure_future(self.reporting.session(client))
        updater = asyncio.ensure_future(self._update_loop(channel, stop))
        stopper = asyncio.ensure_future(stop.wait())
        lost = asyncio.ensure_future(self._link_lost.wait())
        tasks = (reader, reports, updater, stopper, lost)
        try:
            done, _ = await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t is not lost and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if lost in done:
                log.debug("session: a publish failed, ending the session")
                raise LinkError("the broker connection was lost")
            if stop.is_set():
                await self.reporting.going_offline(client)
        finally:
            channel.close()
            await cancel_and_wait(tasks)
            log.debug("session ended")

    async def _read_hints(self, client: Any) -> None:
        """Watch the retained hint. (Replies never reach ``client.messages``: device_channel routes
        them to the channel as paho reads them.)"""
        async for msg in client.messages:
            topic = str(msg.topic)
            payload = bytes(msg.payload) if isinstance(msg.payload, (bytes, bytearray)) else b""
            if topic == HINT_TOPIC:
                try:
                    hint = decode_hint(payload)
                except ProtocolError as e:
                    log.debug("ignored a malformed hint: %s", e)
                    continue
                self.status.hints += 1
                if hint.timestamp_version != self.status.timestamp_version:
                    log.debug("hint: repository at timestamp %d, we trust %d; refreshing",
                              hint.timestamp_version, self.status.timestamp_version)
                    self._wake.set()

    async def _update_loop(self, channel: Channel, stop: asyncio.Event) -> None:
        backoff = self.config.reconnect_min
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.update_cycle(channel)
                wait = self.config.refresh_interval
                backoff = self.config.reconnect_min
            except LinkError as e:
                self._error(e)
                wait = min(backoff * (0.5 + self._random.random()), self.config.refresh_interval)
                backoff = min(backoff * 2, self.config.reconnect_max)
            except EdgeshipError as e:
                self._error(e)
                wait = self.config.refresh_interval
            except Exception as e:  # noqa: BLE001 - a bug must not kill the device's update loop
                log.exception("unexpected error in the update cycle")
                self._error(EdgeshipError(f"internal error: {type(e).__name__}: {e}"))
                wait = min(backoff * (0.5 + self._random.random()), self.config.refresh_interval)
                backoff = min(backoff * 2, self.config.reconnect_max)
            await wait_event(self._wake, wait)

    # --- one update cycle -------------------------------------------------

    async def refresh(self, channel: Channel) -> TrustedView:
        fetcher = MqttFetcher(channel, asyncio.get_running_loop(), self.config.limits)
        try:
            view = await asyncio.to_thread(self.tuf.refresh, fetcher)
        finally:
            fetcher.close()
        self.status.timestamp_version = view.timestamp_version
        return view

    async def update_cycle(self, channel: Channel) -> None:
        """Refresh, then bring every model up to its newest fitting release. Raises on a failed refresh."""
        self.status.cycles += 1
        view = await self.refresh(channel)
        self._event("refreshed", timestamp_version=view.timestamp_version, releases=len(view.releases))
        failure: EdgeshipError | None = None
        for model in self.config.models:
            try:
                await self._update_model(channel, view, model)
                await self.deployer.install(model, view.release_keys)
            except EdgeshipError as e:
                failure = failure or e
                self.store.note_error(self.store.load(model), f"{type(e).__name__}: {e}")
                if not isinstance(e, LinkError):
                    self._error(e, model=model)
        if isinstance(failure, LinkError):
            raise failure
        if failure is not None:
            self.status.last_exception = failure
        if failure is None:
            self.status.last_error = self.status.last_error_type = self.status.last_exception = None

    async def _update_model(self, channel: Channel, view: TrustedView, model: str) -> None:
        state = self.store.load(model)
        decision = decide(view.releases, model=model, facts=self.facts, current=state.held(), seen=state.seen,
                          refused=frozenset(state.refused))
        if decision.action != "fetch":
            log.debug("%s: %s", model, decision.action)
            for version, reason in decision.skipped:
                log.info("%s %s is not for this device: %s", model, version, reason)
            return
        rel = decision.release
        assert rel is not None
        transfer_signer = None
        if rel.transfer_signature is not None:
            # A release key signed these block hashes: once each block matches, the bytes are the
            # release's, and the verifier need not hash the members again. One that does not verify
            # (a mistake or a forgery in the targets metadata) only costs that shortcut: the members
            # are hashed and checked against the bundle's own signature, as without one.
            try:
                transfer_signer = verify_transfer_signature(
                    rel.transfer_signature, view.release_keys, subject_name=transfer_subject(rel.name, rel.version),
                    shard_size=rel.target.block_size, length=rel.target.length, digests=rel.target.block_sha256)
            except BadData as e:
                log.warning("%s %s: ignoring its %s; every file will be hashed", model, rel.version, e)
        self._event("downloading", model=model, version=rel.version, bytes=rel.target.length,
                    **({"transfer_signer": transfer_signer} if transfer_signer else {}))
        stats = DownloadStats()
        self.status.downloads.append(stats)
        # Verify while the blocks arrive: the checker reads the part file as its whole prefix grows.
        progress = Progress(rel.target)
        checking = asyncio.ensure_future(asyncio.to_thread(self._verify, part_path(self.store.downloads, rel.target),
                                                           progress, rel, view, transfer_signer is None))
        try:
            part = await download(channel, rel.target, self.store.downloads, self.config.limits, stats=stats,
                                  progress=progress)
        except BaseException:
            progress.abort()
            verdict = (await asyncio.gather(checking, return_exceptions=True))[0]
            if isinstance(verdict, BadData) and not isinstance(verdict, BlockRejected):
                self._refuse(state, rel, verdict)  # the check stopped the download: the bundle is bad
            raise
        self._event("downloaded", model=model, version=rel.version, blocks=stats.blocks_fetched,
                    resumed=stats.blocks_resumed, requests=stats.requests, narrowed=stats.narrowed)
        try:
            await checking
        except BadData as e:
            self._refuse(state, rel, e)
            raise
        failpoint.hit("verify.done")
        self.store.stage(state, version=rel.version, sha256=rel.target.sha256, verified_file=part)
        self._event("staged", model=model, version=rel.version, sha256=rel.target.sha256)

    def _refuse(self, state: ModelState, rel: Release, error: BadData) -> None:
        """TUF signed these exact bytes, yet the bundle is wrong for us: refuse this release for good."""
        discard(self.store.downloads, rel.target)
        self.store.refuse(state, rel.target.sha256, f"{type(error).__name__}: {error}")

    def _verify(self, part: Path, progress: Progress, rel: Release, view: TrustedView, member_digests: bool) -> None:
        """In a thread while the blocks arrive: the reader checks each block against the SHA-256
        TUF's targets role signed for it before the bundle verifier sees a byte of it. A failure
        here ends the download."""
        reader = GrowingReader(part, progress)
        try:
            # Every byte the verifier reads was checked against TUF first: neither the file's own
            # SHA-256 nor the gzip CRC-32 could add anything. The member digests could not either
            # when a release key signed the block hashes (a transfer signature, checked already);
            # the bundle's signature, its names and its manifest are checked, as always.
            checked = verify_stream(reader, trusted_keys=view.release_keys,  # type: ignore[arg-type]
                                    file_sha256=False, gzip_crc=False, member_digests=member_digests)
            reader.drain()
            m = checked.manifest
            if (m.name, m.version) != (rel.name, rel.version):
                raise ManifestError(f"target {rel.target.path} holds {m.name} {m.version}, "
                                    f"not {rel.name} {rel.version}")
            check_fit(m, machine=self.facts.machine, runtimes=self.facts.runtimes,
                      accelerators=self.facts.accelerators)
        except BaseException as e:
            progress.failed(e)
            raise
        finally:
            reader.close()

    def model_state(self, model: str) -> ModelState:
        return self.store.load(model)
