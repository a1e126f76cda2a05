"""Broker connection settings shared by the agent, the server and the fleet tools.

One frozen :class:`BrokerSettings` says where the broker is and how to
authenticate (mqtt:// or mqtts:// with a CA, a client certificate and key, or a
username and password); :func:`make_client` turns it into an ``aiomqtt.Client``
with TCP_NODELAY set (request/response over MQTT stalls on Nagle's algorithm
otherwise: ~10 ms per round trip measured here).

The update channel moves a bundle as hundreds of messages, so its hot paths reach the paho
client under aiomqtt (:func:`paho_of`): :func:`device_channel` and :func:`route` hand replies
to the device's channel as paho reads them, :func:`on_published` tells the server when a reply
is out. Per message, aiomqtt's queue, task wake-ups and per-publish futures cost more CPU than
the rest of the message's handling.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import unquote, urlsplit

from agent.errors import UsageError

if TYPE_CHECKING:
    import aiomqtt
    import paho.mqtt.client as paho

    from agent.channel import Channel

log = logging.getLogger(__name__)

Protocol = Literal["5", "3.1.1"]


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    host: str
    port: int
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int = 30

    def __post_init__(self) -> None:
        if not self.host:
            raise UsageError("broker URL has no host")
        if not 0 < self.port < 65536:
            raise UsageError(f"broker port {self.port} is out of range")
        if (self.cert is None) != (self.key is None):
            raise UsageError("a client certificate needs its key, and a key its certificate")
        if (self.ca or self.cert) and not self.tls:
            raise UsageError("a CA or client certificate needs an mqtts:// broker URL")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def __repr__(self) -> str:  # never show the password
        return f"BrokerSettings({self.url}, user={self.username!r})"


def parse_broker_url(url: str, **extra: Any) -> BrokerSettings:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]``; user:password in the URL is accepted."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise UsageError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"broker URL {url!r} must not carry a path or query")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"broker URL {url!r} has an invalid port") from None
    tls = parts.scheme == "mqtts"
    fields: dict[str, Any] = {"host": parts.hostname or "", "port": port or (8883 if tls else 1883), "tls": tls}
    if parts.username:
        fields["username"] = unquote(parts.username)
    if parts.password:
        fields["password"] = unquote(parts.password)
    fields.update({k: v for k, v in extra.items() if v is not None})
    return BrokerSettings(**fields)


def tls_context(settings: BrokerSettings) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    for what, path in (("CA", settings.ca), ("client certificate", settings.cert), ("client key", settings.key)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{what} file not found: {path}")
    ctx = ssl.create_default_context(cafile=str(settings.ca) if settings.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert is not None:
        try:
            ctx.load_cert_chain(str(settings.cert), str(settings.key))
        except (ssl.SSLError, OSError) as e:
            raise UsageError(f"cannot load client certificate {settings.cert}: {e}") from None
    return ctx


MAX_INFLIGHT = 64
"""QoS 1 publishes a client keeps in flight (requests and replies are pipelined)."""


@functools.cache
def _client_class() -> type[aiomqtt.Client]:
    import aiomqtt

    class Client(aiomqtt.Client):
        """aiomqtt's client, whose exit also marks a lost connection's error as seen. aiomqtt 2.5
        returns early from ``__aexit__`` when the connection is already gone, without retrieving
        that error, and asyncio then logs "Future exception was never retrieved" for every lost
        link (each broker restart, in a device's log). Nothing is hidden: the session learns of the
        loss from paho (``on_link_lost``) or from its message iteration, and an aiomqtt that raises
        the error from ``__aexit__`` still does."""

        async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            try:
                await super().__aexit__(exc_type, exc, tb)
            finally:
                lost = self._disconnected
                if lost.done() and not lost.cancelled():
                    lost.exception()

    return Client


def make_client(
    settings: BrokerSettings,
    *,
    identifier: str,
    protocol: Protocol = "5",
    will: aiomqtt.Will | None = None,
) -> aiomqtt.Client:
    import aiomqtt

    kwargs: dict[str, Any] = {}
    if protocol == "5":
        kwargs["protocol"] = aiomqtt.ProtocolVersion.V5
    else:
        kwargs["protocol"] = aiomqtt.ProtocolVersion.V311
        kwargs["clean_session"] = True
    client = _client_class()(
        settings.host,
        settings.port,
        identifier=identifier,
        username=settings.username,
        password=settings.password,
        tls_context=tls_context(settings),
        keepalive=settings.keepalive,
        will=will,
        timeout=10,
        max_inflight_messages=MAX_INFLIGHT,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        **kwargs,
    )
    # Requests and replies are pipelined on purpose; aiomqtt warns above 10 outstanding publishes.
    client.pending_calls_threshold = MAX_INFLIGHT
    return client


def paho_of(client: aiomqtt.Client) -> paho.Client:
    """The paho-mqtt client under ``client``, for per-message hot paths: a topic callback that runs
    as paho reads each message, a publish that does not wait on aiomqtt's per-call future. aiomqtt
    2.x keeps it as ``_client`` (pyproject pins aiomqtt below 3)."""
    return client._client  # noqa: SLF001


def on_published(client: aiomqtt.Client, listener: Callable[[int], None]) -> None:
    """Also call ``listener(mid)`` when paho is done with a publish (QoS 0: written to the socket;
    QoS 1: acknowledged), after aiomqtt's own handler. Runs on the event loop thread."""
    inner = cast("Callable[..., None] | None", paho_of(client).on_publish)  # aiomqtt's: the VERSION2 signature

    def both(c: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if inner is not None:
            inner(c, userdata, mid, reason_code, properties)
        listener(mid)

    paho_of(client).on_publish = both


def route(client: aiomqtt.Client, topic_filter: str, deliver: Callable[[bytes, memoryview | bytes, bool], None]) -> None:
    """Hand each message matching ``topic_filter`` (a topic, or one ending in ``/+``) to
    ``deliver(topic, payload, retain)`` as it is read, on the event loop thread, instead of
    queueing it for ``client.messages``: no Message object, queue hop or task wake-up per message.
    ``deliver`` must not raise. Messages are read by :class:`agent.mqttread.PacketReader`, which
    copies each byte once (paho's own reader copies a 256 KiB reply several times) and gives the
    payload as a memoryview; with a paho it does not know, a topic callback gives paho's bytes.
    One route per client. The topic callback is registered in any case: a message the reader
    leaves to paho (QoS 2, an MQTT 5 topic alias) reaches ``deliver`` through it, not
    ``client.messages``."""
    from agent.mqttread import install

    install(paho_of(client), topic_filter, deliver)

    def callback(_c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic.encode()
        except UnicodeDecodeError:
            log.debug("dropping a message whose topic is not UTF-8")
            return
        deliver(topic, message.payload, message.retain)

    paho_of(client).message_callback_add(topic_filter, callback)


class _Unsliced:
    """A queued packet that paho's writer slices (``packet[pos:]``, before each ``send``) into a
    memoryview rather than a copy."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self._data = data

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, key: slice) -> memoryview:
        return memoryview(self._data)[key]


UNSLICED_MIN = 16 * 1024
JOIN_MAX = UNSLICED_MIN
"""Small packets queued one after another are sent together up to this many bytes."""
_NO_JOIN_KINDS = frozenset({0x10, 0xE0})
"""CONNECT (kept alone: it opens the session) and DISCONNECT (paho closes the socket once it is written)."""


def _joinable(command: int, qos: int) -> bool:
    """May this queued packet share a ``send`` with others? Not CONNECT, DISCONNECT or a QoS 0
    PUBLISH (paho calls on_publish once that is written)."""
    kind = command & 0xF0
    return kind not in _NO_JOIN_KINDS and not (kind == 0x30 and qos == 0)


def lean_writes(pc: paho.Client) -> None:
    """Have paho send with fewer copies and system calls. Its ``_packet_write`` sends each queued
    packet with its own ``send`` of ``packet[pos:]``, a copy of a whole 256 KiB reply for a
    bytearray. Packets of at least UNSLICED_MIN bytes are queued wrapped so that the slice is a
    view. When an event loop drives the client (aiomqtt: a write callback, no paho thread, so every
    packet is queued and written on the loop's thread), a small packet queued behind another small
    one that has not started to go out is appended to it (up to JOIN_MAX bytes), so a PUBACK and
    the next request, or the PUBACKs of a burst of requests, leave in one ``send``; under paho's
    own loop thread, ``loop()`` or no loop, packets are queued as paho queues them (its writer
    thread would race the append). Left alone if this paho lacks the private attributes used
    (pyproject pins paho-mqtt 2.x)."""
    queue = getattr(pc, "_packet_queue", None)
    private = ("_out_packet", "_thread", "_sockpairW", "_on_socket_register_write")
    if queue is None or not all(hasattr(pc, name) for name in private) or getattr(pc, "_edgeship_writes", False):
        return
    from paho.mqtt.enums import MQTTErrorCode

    def packet_queue(command: int, packet: bytes | bytearray, mid: int, qos: int, info: Any = None) -> Any:
        n = len(packet)
        if n >= UNSLICED_MIN:
            return queue(command, _Unsliced(packet), mid, qos, info)
        out = pc._out_packet  # noqa: SLF001
        if out and _joinable(command, qos) and pc._thread is None and pc._sockpairW is None \
                and pc._on_socket_register_write is not None:  # noqa: SLF001  (an event loop writes)
            last = out[-1]
            if last["pos"] == 0 and last["to_process"] + n <= JOIN_MAX and _joinable(last["command"], last["qos"]):
                buf = last.get("joined")
                if buf is None:  # a buffer of our own, not the one paho built
                    buf = last["joined"] = last["packet"] = bytearray(last["packet"])  # type: ignore[typeddict-unknown-key]
                buf += packet
                last["to_process"] += n
                return MQTTErrorCode.MQTT_ERR_SUCCESS  # the writer is registered: the queue was not empty
        return queue(command, packet, mid, qos, info)

    pc._packet_queue = packet_queue  # noqa: SLF001
    pc._edgeship_writes = True  # noqa: SLF001


def device_channel(client: aiomqtt.Client, device: str, *, max_body: int, qos: int = 1,
                   on_link_lost: Callable[[], object] | None = None) -> Channel:
    """The request/response :class:`~agent.channel.Channel` of ``device`` over ``client``, on the
    hot path without aiomqtt's per-message machinery: replies on the device's reply topic go
    straight to the channel as paho reads them (they never reach ``client.messages``), and
    requests are published through paho without a future each (paho holds QoS 1 messages in its
    own in-flight window). A publish on a dead link calls ``on_link_lost()`` and raises
    ChannelClosed. The caller subscribes."""
    import aiomqtt
    import paho.mqtt.client as paho

    from agent.channel import Channel, ChannelClosed
    from agent.protocol import resp_topic

    def lost(why: str) -> ChannelClosed:
        if on_link_lost is not None:
            on_link_lost()
        return ChannelClosed(f"publish failed: {why}")

    async def publish(topic: str, payload: bytes) -> None:
        try:
            await client.publish(topic, payload, qos=qos)
        except aiomqtt.MqttError as e:
            raise lost(str(e)) from None

    def send(topic: str, payload: bytes) -> None:
        info = paho_of(client).publish(topic, payload, qos=qos)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise lost(paho.error_string(info.rc))

    channel = Channel(device, publish, max_body=max_body, send=send)
    lean_writes(paho_of(client))
    route(client, resp_topic(device), lambda _topic, payload, _retain: channel.deliver(payload))
    return channel
