"""The shipped Mosquitto TLS + ACL example (examples/mosquitto/) against a real Mosquitto on
127.0.0.1 with real certificates: each identity reaches exactly its topics of edgeship/v1.

Negative checks follow one shape: the forbidden message goes first, then a control message that
must reach the same subscriber; once the control has arrived (Mosquitto handles packets in order),
a short extra wait (QUIET) shows nothing else came.

Observed with Mosquitto 2.0.11; the tests pass whether or not a later version changes it:
- the acl_file never refuses a SUBSCRIBE (the SUBACK grants it); it filters on delivery;
- a denied PUBLISH is answered (MQTT 5: reason code 0x87) and then the connection is closed
  (eclipse-mosquitto/mosquitto#2579), so each forbidden publish gets its own connection.
"""

from __future__ import annotations

import itertools
import os
import queue
import re
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.mosquitto import Broker, ClientCert, TlsFiles, make_pki, start_broker, start_broker_from

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mosquitto"
ACL = EXAMPLE / "acl.conf"

V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311
PROTOCOLS = [pytest.param(V5, id="mqtt5"), pytest.param(V311, id="mqtt311")]
WAIT = 3.0  # upper bound for anything that must arrive
QUIET = 0.3  # extra wait after the control message, for "nothing else arrived"
NOT_AUTHORIZED = 0x87

SERVER, FLEET = "edgeship-server", "edgeship-fleet"
SHARED_REQ = "$share/edgeship/edgeship/v1/req/+"


def req(device: str) -> str:
    return f"edgeship/v1/req/{device}"


def resp(device: str) -> str:
    return f"edgeship/v1/resp/{device}"


HINT = "edgeship/v1/hint"


# --------------------------------------------------------------------------------------------
# A synchronous MQTT peer


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class ConnectRefused(Exception):
    pass


class Peer:
    """One paho client with its loop thread and no automatic reconnect: a connection the broker
    closes stays closed, and every call waits for its acknowledgement."""

    def __init__(
        self,
        broker: Broker,
        context: ssl.SSLContext | None,
        *,
        client_id: str,
        protocol: MQTTProtocolVersion = V5,
        username: str | None = None,
        persistent: bool = False,
    ) -> None:
        self._broker = broker
        self._protocol = protocol
        self._persistent = persistent
        extra: dict[str, Any] = {} if protocol == V5 else {"clean_session": not persistent}
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            reconnect_on_failure=False,
            **extra,
        )
        if context is not None:
            self._client.tls_set_context(context)
        if username is not None:
            self._client.username_pw_set(username, "not-a-password")
        self._cond = threading.Condition()
        self._connack: ReasonCode | None = None
        self.session_present = False
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._pubacks: dict[int, ReasonCode] = {}
        self._closed = False
        self._started = False
        self.messages: queue.Queue[Received] = queue.Queue()
        c = self._client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_message = self._on_message

    # paho callbacks (loop thread)
    def _on_connect(self, _c: Any, _u: Any, flags: Any, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self._connack, self.session_present = rc, bool(flags.session_present)
            self._cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[ReasonCode], _p: Any) -> None:
        with self._cond:
            self._subacks[mid] = list(codes)
            self._cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self._pubacks[mid] = rc
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(m.topic, bytes(m.payload), bool(m.retain)))

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: ready() or self._closed, timeout=WAIT):
                raise AssertionError(f"no {what} within {WAIT} s")

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def connect(self) -> None:
        host, port = self._broker.host, self._broker.port
        try:
            if self._protocol == V5:
                props = None
                if self._persistent:
                    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                    props.SessionExpiryInterval = 3600
                self._client.connect(host, port, clean_start=not self._persistent, properties=props)
            else:
                self._client.connect(host, port)
        except OSError as exc:  # ssl.SSLError included: refused during the handshake
            raise ConnectRefused(f"{type(exc).__name__}: {exc}") from exc
        self._client.loop_start()
        self._started = True
        self._wait(lambda: self._connack is not None, "CONNACK")
        if self._connack is None or self._connack.is_failure:
            raise ConnectRefused(f"connection closed, CONNACK {self._connack}")

    def subscribe(self, *filters: str) -> list[ReasonCode]:
        rc, mid = self._client.subscribe([(f, 1) for f in filters])
        assert rc == MQTTErrorCode.MQTT_ERR_SUCCESS, rc
        assert mid is not None
        self._wait(lambda: mid in self._subacks, f"SUBACK for {filters}")
        assert mid in self._subacks, f"connection closed instead of SUBACK for {filters}"
        return self._subacks[mid]

    def subscribe_ok(self, *filters: str) -> None:
        codes = self.subscribe(*filters)
        assert not any(c.is_failure for c in codes), codes

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode | None:
        """QoS 1. The PUBACK reason code (always Success for MQTT 3.1.1), or None when the
        connection closed without one."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS, info.rc
        self._wait(lambda: info.mid in self._pubacks, f"PUBACK for {topic}")
        return self._pubacks.get(info.mid)

    def publish_ok(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        rc = self.publish(topic, payload, retain=retain)
        assert rc is not None and not rc.is_failure, f"publish to {topic}: {rc}"

    def next(self) -> Received:
        try:
            return self.messages.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no message within {WAIT} s") from None

    def until(self, topic: str, payload: bytes) -> list[Received]:
        """Every message up to and including (topic, payload), then whatever arrives within QUIET."""
        got: list[Received] = []
        deadline = time.monotonic() + WAIT
        while not any(m.topic == topic and m.payload == payload for m in got):
            remaining = deadline - time.monotonic()
            try:
                got.append(self.messages.get(timeout=max(remaining, 0.001)))
            except queue.Empty:
                raise AssertionError(f"{payload!r} on {topic} did not arrive; got {got}") from None
        return got + self.quiet()

    def quiet(self, wait: float = QUIET) -> list[Received]:
        got: list[Received] = []
        deadline = time.monotonic() + wait
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                got.append(self.messages.get(timeout=remaining))
            except queue.Empty:
                break
        return got

    def close(self) -> None:
        if not self.closed:
            try:
                self._client.disconnect()
            except OSError:
                pass
        if self._started:
            self._client.loop_stop()


class Connector:
    """Connects peers by certificate identity to one broker, and closes them all at the end."""

    def __init__(self, broker: Broker, tls: TlsFiles) -> None:
        self.broker, self.tls = broker, tls
        self._peers: list[Peer] = []
        self._ids = itertools.count()

    def peer(self, identity: str | None, *, client_id: str | None = None, **kw: Any) -> Peer:
        ctx = self.tls.client_context(identity)
        cid = client_id or f"{identity or 'anon'}-{next(self._ids)}"
        p = Peer(self.broker, ctx, client_id=cid, **kw)
        self._peers.append(p)
        return p

    def __call__(self, identity: str | None, *, client_id: str | None = None, **kw: Any) -> Peer:
        p = self.peer(identity, client_id=client_id, **kw)
        p.connect()
        return p

    def close(self) -> None:
        for p in self._peers:
            p.close()


def log_shows(broker: Broker, pattern: str) -> None:
    """Wait until the broker log has a line matching `pattern` (it is written asynchronously)."""
    deadline = time.monotonic() + WAIT
    while not re.search(pattern, broker.log_text()):
        if time.monotonic() > deadline:
            raise AssertionError(f"broker log has no match for {pattern!r}:\n{broker.log_text()}")
        time.sleep(0.01)


def secrets_in(got: list[Received]) -> list[Received]:
    return [m for m in got if b"secret" in m.payload or b"forged" in m.payload]


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_pki(tmp_path_factory.mktemp("pki"), devices=["device-1", "device-2"])


@pytest.fixture
def secure_broker(tmp_path: Path, pki: TlsFiles) -> Iterator[Broker]:
    """TLS with client certificates and the shipped acl.conf; one per test (starts in ~15 ms),
    so that no retained message or session leaks from one test into another."""
    b = start_broker(tmp_path / "mosquitto", tls=pki, acl=ACL)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def connect(secure_broker: Broker, pki: TlsFiles) -> Iterator[Connector]:
    c = Connector(secure_broker, pki)
    try:
        yield c
    finally:
        c.close()


# --------------------------------------------------------------------------------------------
# What each identity may do


def request_and_reply(connect: Connector, device_protocol: MQTTProtocolVersion) -> None:
    server = connect(SERVER)
    server.subscribe_ok(SHARED_REQ)
    device = connect("device-1", protocol=device_protocol)
    device.subscribe_ok(resp("device-1"))

    device.publish_ok(req("device-1"), b"request-1")
    assert server.next() == Received(req("device-1"), b"request-1", False)
    server.publish_ok(resp("device-1"), b"reply-1")
    assert device.next() == Received(resp("device-1"), b"reply-1", False)


@pytest.mark.parametrize("device_protocol", PROTOCOLS)
def test_request_reaches_server_through_shared_subscription_and_reply_comes_back(
    connect: Connector, device_protocol: MQTTProtocolVersion
) -> None:
    request_and_reply(connect, device_protocol)


def test_server_instances_share_the_requests(connect: Connector) -> None:
    servers = [connect(SERVER), connect(SERVER)]
    for s in servers:
        s.subscribe_ok(SHARED_REQ)
    sent = set()
    for device in ("device-1", "device-2"):
        d = connect(device)
        for i in range(10):
            d.publish_ok(req(device), f"{device}/{i}".encode())
            sent.add((req(device), f"{device}/{i}".encode()))

    got: list[list[Received]] = [[], []]
    deadline = time.monotonic() + WAIT
    while sum(map(len, got)) < len(sent) and time.monotonic() < deadline:
        for s, bucket in zip(servers, got):
            bucket += s.quiet(0.02)
    received = [(m.topic, m.payload) for bucket in got for m in bucket]
    assert sorted(received) == sorted(sent)  # each request exactly once
    assert all(got), "Mosquitto shares a $share group round-robin: both instances get requests"


def test_fleet_reads_every_devices_state_telemetry_and_events(connect: Connector) -> None:
    devices = {d: connect(d) for d in ("device-1", "device-2")}
    for d, peer in devices.items():
        peer.publish_ok(f"edgeship/v1/state/{d}", f"state {d}".encode(), retain=True)

    fleet = connect(FLEET)
    fleet.subscribe_ok("edgeship/v1/state/+", "edgeship/v1/telemetry/+", "edgeship/v1/events/+")
    retained = {fleet.next(), fleet.next()}
    assert retained == {
        Received(f"edgeship/v1/state/{d}", f"state {d}".encode(), True) for d in devices
    }
    expected = set()
    for d, peer in devices.items():
        for kind in ("telemetry", "events"):
            peer.publish_ok(f"edgeship/v1/{kind}/{d}", f"{kind} {d}".encode())
            expected.add(Received(f"edgeship/v1/{kind}/{d}", f"{kind} {d}".encode(), False))
    assert {fleet.next() for _ in expected} == expected


@pytest.mark.parametrize("device_protocol", PROTOCOLS)
def test_every_device_reads_the_retained_hint(connect: Connector, device_protocol: MQTTProtocolVersion) -> None:
    connect(SERVER).publish_ok(HINT, b"repository v7", retain=True)
    for device in ("device-1", "device-2"):
        peer = connect(device, protocol=device_protocol)
        peer.subscribe_ok(HINT)
        assert peer.next() == Received(HINT, b"repository v7", True)


# --------------------------------------------------------------------------------------------
# What a device may not read

# Filters device-1 tries, covering device-2's topics directly, by wildcard, and shared.
FOREIGN_FILTERS = (
    resp("device-2"),
    "edgeship/v1/resp/+",
    "edgeship/v1/+/device-2",
    "edgeship/v1/state/+",
    "edgeship/v1/#",
    "#",
    "$share/spy/edgeship/v1/resp/device-2",
    "$share/spy/edgeship/v1/req/+",
)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("client_id", ["device-1", "device-2"], ids=["own-client-id", "client-id-of-device-2"])
def test_device_cannot_read_another_devices_topics(
    connect: Connector, protocol: MQTTProtocolVersion, client_id: str
) -> None:
    """With client id "device-2" this is the %c attack: %c-keyed rules would let it in."""
    victim = connect("device-2", client_id="device-2-real")
    victim.publish_ok("edgeship/v1/state/device-2", b"secret retained state", retain=True)
    server = connect(SERVER)

    spy = connect("device-1", client_id=client_id, protocol=protocol)
    codes = spy.subscribe(*FOREIGN_FILTERS)
    # Mosquitto 2.0.11 grants these (it filters on delivery); a refusal would be fine too.
    assert len(codes) == len(FOREIGN_FILTERS)

    server.publish_ok(resp("device-2"), b"secret reply")
    victim.publish_ok(req("device-2"), b"secret request")
    for kind in ("state", "telemetry", "events"):
        victim.publish_ok(f"edgeship/v1/{kind}/device-2", f"secret {kind}".encode())
    server.publish_ok(resp("device-1"), b"control")

    got = spy.until(resp("device-1"), b"control")
    assert secrets_in(got) == []
    assert {m.topic for m in got} == {resp("device-1")}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_taking_over_another_devices_session_reads_nothing(connect: Connector, protocol: MQTTProtocolVersion) -> None:
    """device-1's certificate, client id "device-2", resuming device-2's persistent session
    (which Mosquitto allows: the session holds device-2's subscription and a queued reply)."""
    server = connect(SERVER)
    victim = connect("device-2", client_id="device-2", protocol=protocol, persistent=True)
    victim.subscribe_ok(resp("device-2"))
    server.publish_ok(resp("device-2"), b"while online")
    assert victim.next().payload == b"while online"  # the session's subscription works
    victim.close()
    server.publish_ok(resp("device-2"), b"secret queued while offline")

    spy = connect("device-1", client_id="device-2", protocol=protocol, persistent=True)
    spy.subscribe_ok(resp("device-1"))
    server.publish_ok(resp("device-2"), b"secret after takeover")
    server.publish_ok(resp("device-1"), b"control")
    got = spy.until(resp("device-1"), b"control")
    assert secrets_in(got) == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_username_in_connect_does_not_change_the_identity(
    connect: Connector, secure_broker: Broker, protocol: MQTTProtocolVersion
) -> None:
    server = connect(SERVER)
    server.publish_ok(HINT, b"hint v1", retain=True)
    victim = connect("device-2")

    spy = connect("device-1", client_id="spy", username=SERVER, protocol=protocol)
    log_shows(secure_broker, r" as spy \(p\d, c\d, k\d+, u'device-1'\)")  # the CN, not the username
    spy.subscribe(resp("device-1"), "edgeship/v1/req/+", SHARED_REQ)
    victim.publish_ok(req("device-2"), b"secret request")
    server.publish_ok(resp("device-1"), b"control")
    assert secrets_in(spy.until(resp("device-1"), b"control")) == []

    rc = spy.publish(HINT, b"forged hint", retain=True)
    if protocol == V5:
        assert rc is not None and rc.value == NOT_AUTHORIZED
    reader = connect("device-2")
    reader.subscribe_ok(HINT)
    assert reader.next() == Received(HINT, b"hint v1", True)


# --------------------------------------------------------------------------------------------
# What an identity may not write


@dataclass(frozen=True)
class Forgery:
    """`forger` publishes (retained) on `topic`, which `writer` owns and `reader` reads."""

    forger: str
    topic: str
    writer: str
    reader: str

    def __str__(self) -> str:
        return f"{self.forger}-to-{self.topic.removeprefix('edgeship/v1/').replace('/', '.')}"


DEVICE_FORGERIES = [
    Forgery("device-1", req("device-2"), writer="device-2", reader=SERVER),
    Forgery("device-1", HINT, writer=SERVER, reader="device-2"),
    Forgery("device-1", resp("device-1"), writer=SERVER, reader="device-1"),
    Forgery("device-1", resp("device-2"), writer=SERVER, reader="device-2"),
    Forgery("device-1", "edgeship/v1/state/device-2", writer="device-2", reader=FLEET),
    Forgery("device-1", "edgeship/v1/telemetry/device-2", writer="device-2", reader=FLEET),
    Forgery("device-1", "edgeship/v1/events/device-2", writer="device-2", reader=FLEET),
]
OPERATOR_FORGERIES = [
    Forgery(FLEET, HINT, writer=SERVER, reader="device-1"),
    Forgery(FLEET, resp("device-1"), writer=SERVER, reader="device-1"),
    Forgery(SERVER, req("device-1"), writer="device-1", reader=SERVER),
    Forgery(SERVER, "edgeship/v1/state/device-1", writer="device-1", reader=FLEET),
]
FORGERY_CASES = [
    pytest.param(f, p, id=f"{f}-{pid}") for f in DEVICE_FORGERIES for p, pid in ((V5, "mqtt5"), (V311, "mqtt311"))
] + [pytest.param(f, V5, id=f"{f}-mqtt5") for f in OPERATOR_FORGERIES]


@pytest.mark.parametrize(("forgery", "protocol"), FORGERY_CASES)
def test_identity_cannot_publish_outside_its_topics(
    connect: Connector, forgery: Forgery, protocol: MQTTProtocolVersion
) -> None:
    topic = forgery.topic
    writer = connect(forgery.writer)
    writer.publish_ok(topic, b"genuine v1", retain=True)
    reader = connect(forgery.reader)
    reader.subscribe_ok(topic)
    assert reader.next() == Received(topic, b"genuine v1", True)  # the subscription is live

    forger = connect(forgery.forger, protocol=protocol)
    rc = forger.publish(topic, b"forged", retain=True)
    if protocol == V5:  # MQTT 3.1.1 has no reason code: the PUBACK looks like success
        assert rc is not None and rc.value == NOT_AUTHORIZED, rc

    writer.publish_ok(topic, b"control")
    assert secrets_in(reader.until(topic, b"control")) == []
    late = connect(forgery.reader)  # the retained message is still the genuine one
    late.subscribe_ok(topic)
    assert late.next() == Received(topic, b"genuine v1", True)


# --------------------------------------------------------------------------------------------
# Who may connect


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_pki(tmp_path_factory.mktemp("foreign-pki"), devices=["device-1"], extra_users=())


# OpenSSL's reason, as Mosquitto logs it (OpenSSL 1.1.1 and 3.x use the same strings).
REFUSALS = {
    "no-client-certificate": "peer did not return a certificate",
    "certificate-from-another-ca": "certificate verify failed",
    "plain-tcp": "wrong version number",
}


@pytest.mark.parametrize("how", sorted(REFUSALS))
def test_connection_refused_without_a_certificate_from_the_ca(
    secure_broker: Broker, pki: TlsFiles, foreign_pki: TlsFiles, how: str
) -> None:
    context: ssl.SSLContext | None
    if how == "no-client-certificate":
        context = pki.client_context(None)
    elif how == "certificate-from-another-ca":
        context = foreign_pki.client_context("device-1")  # same CN, other CA
        context.load_verify_locations(cafile=str(pki.ca_cert))  # and it trusts the real broker
    else:
        context = None
    peer = Peer(secure_broker, context, client_id="device-1")
    try:
        with pytest.raises(ConnectRefused):
            peer.connect()
    finally:
        peer.close()
    log_shows(secure_broker, REFUSALS[how])  # refused in the TLS handshake
    assert "New client connected" not in secure_broker.log_text()  # no MQTT session ever existed


# --------------------------------------------------------------------------------------------
# The shipped files, as shipped: gen-certs.sh makes the PKI, mosquitto.conf runs it


def _one_sub(pattern: str, repl: str, text: str) -> str:
    new, n = re.subn(pattern, lambda _m: repl, text, flags=re.MULTILINE)
    assert n == 1, f"examples/mosquitto/mosquitto.conf: expected one line matching {pattern!r}, found {n}"
    return new


def test_shipped_config_and_certificate_script(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("openssl not found", pytrace=False)
        pytest.skip("openssl not found")
    pki_dir = tmp_path / "etc"
    script = EXAMPLE / "gen-certs.sh"
    env = {**os.environ, "PKI_DIR": str(pki_dir)}
    identities = ["device-1", "device-2", SERVER, FLEET]
    for args in (["ca"], ["server", "localhost", "127.0.0.1"], ["client", *identities]):
        subprocess.run(["bash", str(script), *args], env=env, check=True, capture_output=True)
    refused = subprocess.run(["bash", str(script), "client", "device/1"], env=env, capture_output=True)
    assert refused.returncode != 0  # not a valid device id
    shutil.copy(ACL, pki_dir / "acl.conf")
    tls = TlsFiles(
        ca_cert=pki_dir / "ca.crt",
        ca_key=pki_dir / "ca.key",
        server_cert=pki_dir / "server.crt",
        server_key=pki_dir / "server.key",
        clients={
            n: ClientCert(name=n, cert=pki_dir / f"{n}.crt", key=pki_dir / f"{n}.key") for n in identities
        },
    )

    shipped = (EXAMPLE / "mosquitto.conf").read_text()
    workdir = tmp_path / "broker"
    log_path = workdir / "mosquitto.log"

    def render(port: int) -> str:
        text = shipped.replace("/etc/mosquitto/edgeship/", f"{pki_dir}/")
        text = _one_sub(r"^listener 8883$", f"listener {port} 127.0.0.1", text)
        text = _one_sub(r"^persistence_location .*$", f"persistence_location {workdir}/", text)
        text = _one_sub(r"^log_dest file .*$", f"log_dest file {log_path}", text)
        return ("user root\n" if os.geteuid() == 0 else "") + text

    broker = start_broker_from(workdir, render, tls=tls, log_path=log_path)
    connect = Connector(broker, tls)
    try:
        request_and_reply(connect, V5)
        server = connect(SERVER)
        spy = connect("device-1", client_id="device-2")
        spy.subscribe("#")
        server.publish_ok(resp("device-2"), b"secret reply")
        server.publish_ok(resp("device-1"), b"control")
        assert secrets_in(spy.until(resp("device-1"), b"control")) == []
        with pytest.raises(ConnectRefused):
            connect(None)
    finally:
        connect.close()
        broker.stop()
    assert (workdir / "mosquitto.db").exists()  # persistence_location is honoured
