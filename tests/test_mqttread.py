"""agent.mqttread.PacketReader against paho's own reader: a real paho client reads the same byte
stream from an in-memory socket (cut into arrivals at random points) once through paho's reader
and once through PacketReader. Both must deliver the same messages, send the same bytes back
(PUBACKs) and fail the same way. Also: what a hostile length costs, and what paho the reader
refuses to sit under. The send side (agent.mqtt.lean_writes) likewise: the same bytes as
paho's own writer, from views instead of copies. End to end through Mosquitto, every device download in the suite reads
through it (agent.mqtt.route); test_a_download_reads_through_the_packet_reader_over_tls checks
TLS."""

from __future__ import annotations

import struct
import threading
import tracemalloc
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.mqtt import JOIN_MAX, UNSLICED_MIN, lean_writes
from agent.mqttread import PREALLOC_MAX, PacketReader, install
from tests.mosquitto import Broker, broker  # noqa: F401 - fixture

OURS, OTHER = "edgeship/v1/resp/dev-1", "edgeship/v1/hint"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: str, payload: bytes, *, qos: int = 1, mid: int = 7, v5: bool = True, props: bytes = b"") -> bytes:
    body = struct.pack("!H", len(topic)) + topic.encode()
    if qos:
        body += struct.pack("!H", mid)
    if v5:
        body += varint(len(props)) + props
    body += payload
    return bytes([0x30 | qos << 1]) + varint(len(body)) + body


def puback(mid: int, reason: int | None = None) -> bytes:
    if reason is None:
        return b"\x40\x02" + struct.pack("!H", mid)
    return b"\x40\x03" + struct.pack("!HB", mid, reason)  # MQTT 5: "no matching subscribers" etc.


PINGRESP = b"\xd0\x00"


@dataclass
class FakeSocket:
    """Bytes arrive in pieces (:meth:`arrive`); ``recv``/``recv_into`` take what has arrived and
    raise BlockingIOError when nothing has, as a non-blocking socket does."""

    inbox: bytearray = field(default_factory=bytearray)
    sent: bytearray = field(default_factory=bytearray)
    eof: bool = False
    closed: bool = False

    def arrive(self, data: bytes) -> None:
        self.inbox += data

    def _take(self, n: int) -> bytes:
        if not self.inbox:
            if self.eof:
                return b""
            raise BlockingIOError
        data = bytes(self.inbox[:n])
        del self.inbox[:n]
        return data

    def recv(self, n: int) -> bytes:
        return self._take(n)

    def recv_into(self, view: memoryview) -> int:
        data = self._take(len(view))
        view[:len(data)] = data
        return len(data)

    def send(self, data: Any) -> int:
        self.sent += bytes(data)
        return len(data)

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        self.closed = True

    def setblocking(self, flag: bool) -> None:
        pass


@dataclass
class Run:
    ours: list[bytes] = field(default_factory=list)
    routed: list[tuple[str, bytes, bool]] = field(default_factory=list)
    others: list[tuple[str, bytes, int]] = field(default_factory=list)
    published: list[tuple[int, int]] = field(default_factory=list)
    """(mid, reason code) of each on_publish: PUBACKs of this client's own QoS 1 publishes."""
    disconnects: int = 0


def client_on(sock: FakeSocket, *, fast: bool, v5: bool = True, topic_filter: str = OURS,
              outstanding: int = 0) -> tuple[paho.Client, Run, PacketReader | None]:
    """A paho client "connected" to ``sock``, with ``outstanding`` QoS 1 publishes (mids 1..n)
    awaiting their PUBACK; messages on ``topic_filter`` go to run.ours (OURS) or run.routed."""
    protocol = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=protocol)
    client._sock = sock  # as if connected  # noqa: SLF001
    client._state = paho._ConnectionState.MQTT_CS_CONNECTED  # noqa: SLF001
    run = Run()
    client.on_message = lambda _c, _u, m: run.others.append((m.topic, bytes(m.payload), m.qos))
    client.on_publish = lambda _c, _u, mid, rc, _p: run.published.append((mid, rc.value))

    def disconnected(*_a: Any) -> None:
        run.disconnects += 1

    client.on_disconnect = disconnected
    for _ in range(outstanding):
        client.publish("edgeship/v1/req/dev-1", b"request", qos=1)
    sock.sent.clear()
    del run.published[:]

    def got(topic: bytes, payload: Any, retain: bool) -> None:
        if topic_filter == OURS:
            run.ours.append(bytes(payload))
        else:
            run.routed.append((topic.decode(), bytes(payload), retain))

    reader = None
    if fast:
        reader = install(client, topic_filter, got)
        assert reader is not None
    else:
        client.message_callback_add(topic_filter, lambda _c, _u, m: got(m.topic.encode(), m.payload, m.retain))
    return client, run, reader


def feed(client: paho.Client, sock: FakeSocket, pieces: list[bytes]) -> list[int]:
    """Each piece arrives, then the client reads while the socket has data (level-triggered
    readiness, as aiomqtt's add_reader gives): a reader that keeps whole packets buffered with
    the socket empty would never be called for them."""
    codes = []
    for piece in pieces:
        sock.arrive(piece)
        while sock.inbox and client._sock is sock:  # noqa: SLF001
            codes.append(int(client.loop_read()))
    return codes


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p for p in points if 0 < p < len(stream)})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]


def both(stream: bytes, points: list[int], *, v5: bool = True, topic_filter: str = OURS,
         outstanding: int = 0) -> tuple[Run, Run, bytes, bytes]:
    results = []
    for fast in (False, True):
        sock = FakeSocket()
        client, run, _ = client_on(sock, fast=fast, v5=v5, topic_filter=topic_filter, outstanding=outstanding)
        feed(client, sock, cut(stream, points))
        results.append((run, bytes(sock.sent)))
    (slow, slow_sent), (fast_run, fast_sent) = results
    return slow, fast_run, slow_sent, fast_sent


packet_kinds = st.one_of(
    st.tuples(st.just("ours"), st.binary(max_size=3000), st.sampled_from([0, 1]), st.integers(1, 65535)),
    st.tuples(st.just("other"), st.binary(max_size=300), st.sampled_from([0, 1]), st.integers(1, 65535)),
    st.tuples(st.just("puback"), st.just(b""), st.just(1), st.integers(1, 12)),  # 1-8 are outstanding
    st.tuples(st.just("puback-rc"), st.just(b""), st.just(1), st.integers(1, 12)),
    st.tuples(st.just("ping"), st.just(b""), st.just(0), st.just(0)),
)


def build(packets: list[tuple[str, bytes, int, int]], *, v5: bool) -> bytes:
    out = bytearray()
    for kind, payload, qos, mid in packets:
        if kind == "ours":
            out += publish(OURS, payload, qos=qos, mid=mid, v5=v5, props=b"\x01\x01" if v5 and mid % 2 else b"")
        elif kind == "other":
            out += publish(OTHER, payload, qos=qos, mid=mid, v5=v5)
        elif kind == "puback":
            out += puback(mid)
        elif kind == "puback-rc":
            out += puback(mid, 0x10) if v5 else puback(mid)
        else:
            out += PINGRESP
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(packets=st.lists(packet_kinds, max_size=12), points=st.lists(st.integers(0, 40000), max_size=30),
       v5=st.booleans())
def test_the_reader_agrees_with_paho_on_any_stream_cut_anywhere(
        packets: list[tuple[str, bytes, int, int]], points: list[int], v5: bool) -> None:
    stream = build(packets, v5=v5)
    slow, fast, slow_sent, fast_sent = both(stream, points, v5=v5, outstanding=8)
    assert fast.ours == slow.ours == [p for k, p, _, _ in packets if k == "ours"]
    assert fast.others == slow.others
    assert fast_sent == slow_sent  # the same PUBACKs, in the same order
    assert fast.published == slow.published  # the same publishes acknowledged, the same reason codes
    assert fast.disconnects == slow.disconnects == 0


REQUESTS = "edgeship/v1/req/+"


@settings(max_examples=100, deadline=None)
@given(points=st.lists(st.integers(0, 2000), max_size=20), v5=st.booleans())
def test_a_single_level_wildcard_routes_as_paho_matches_it(points: list[int], v5: bool) -> None:
    """The server's route: every request topic, with its topic and retain flag; a deeper topic,
    another prefix or the bare prefix's parent is not routed, and paho gets it instead."""
    stream = b"".join([
        publish("edgeship/v1/req/device-1", b"a", v5=v5, mid=1),
        publish("edgeship/v1/req/device-2", b"b", v5=v5, mid=2, qos=0),
        publish("edgeship/v1/req/", b"empty level", v5=v5, mid=3),
        publish("edgeship/v1/req/x/y", b"deeper", v5=v5, mid=4),
        publish("edgeship/v1/reqx/z", b"other prefix", v5=v5, mid=5),
        publish("edgeship/v1/req", b"parent", v5=v5, mid=6),
        bytes([0x31]) + publish("edgeship/v1/req/device-3", b"retained", v5=v5, qos=0)[1:],
    ])
    slow, fast, slow_sent, fast_sent = both(stream, points, v5=v5, topic_filter=REQUESTS)
    assert fast.routed == slow.routed == [("edgeship/v1/req/device-1", b"a", False),
                                          ("edgeship/v1/req/device-2", b"b", False),
                                          ("edgeship/v1/req/", b"empty level", False),
                                          ("edgeship/v1/req/device-3", b"retained", True)]
    assert fast.others == slow.others and len(slow.others) == 3
    assert fast_sent == slow_sent


def test_only_a_trailing_single_level_wildcard_is_taken() -> None:
    sock = FakeSocket()
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client._sock = sock  # noqa: SLF001
    for bad in ("a/#", "a/+/b", "+"):
        with pytest.raises(ValueError, match="only a trailing single-level"):
            install(client, bad, lambda *_: None)


def test_a_byte_at_a_time_and_all_at_once() -> None:
    payloads = [bytes([i]) * n for i, n in enumerate((0, 1, 127, 128, 16383, 16384, 70000, 300000))]
    stream = b"".join(publish(OURS, p, mid=i + 1) for i, p in enumerate(payloads)) + publish(OTHER, b"hint")
    for points in ([], list(range(len(stream)))[:5000] + [len(stream) - 1]):
        slow, fast, slow_sent, fast_sent = both(stream, points)
        assert fast.ours == slow.ours == payloads
        assert fast.others == slow.others == [(OTHER, b"hint", 1)]
        assert fast_sent == slow_sent == b"".join(b"\x40\x02" + struct.pack("!H", i + 1) for i in range(len(payloads))) + b"\x40\x02\x00\x07"


def test_the_delivered_view_outlives_the_next_packet() -> None:
    """deliver gets a memoryview; each packet has its own buffer, so holding a view past deliver
    is safe (the download writes it later in the same call, a caller may keep it longer)."""
    sock = FakeSocket()
    views: list[memoryview] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client._sock = sock  # noqa: SLF001
    install(client, OURS, lambda _topic, view, _retain: views.append(view))
    feed(client, sock, [publish(OURS, b"a" * 20000, mid=1) + publish(OURS, b"b" * 20000, mid=2)])
    assert [bytes(v) for v in views] == [b"a" * 20000, b"b" * 20000]


def test_a_hostile_length_costs_no_more_than_the_preallocation() -> None:
    """A PUBLISH that claims 200 MiB: the reader holds at most PREALLOC_MAX before the data
    comes, and past that grows by at most PREALLOC_MAX beyond what arrived (paho's own reader
    grows with the data)."""
    sock = FakeSocket()
    client, run, _ = client_on(sock, fast=True)
    first = b"\x32" + varint(200 * 1024 * 1024) + b"x" * 100_000
    more = b"y" * (PREALLOC_MAX + 1000)
    tracemalloc.start()
    try:
        feed(client, sock, [first])
        held_first, _ = tracemalloc.get_traced_memory()
        feed(client, sock, [more])
        held_more, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert run.ours == []
    slack = 512 * 1024
    assert PREALLOC_MAX <= held_first < PREALLOC_MAX + slack
    assert held_more < len(first) + len(more) + PREALLOC_MAX + PREALLOC_MAX // 8 + slack


@pytest.mark.parametrize("fast", [False, True], ids=["paho", "reader"])
def test_a_remaining_length_over_four_bytes_drops_the_connection(fast: bool) -> None:
    sock = FakeSocket()
    client, run, _ = client_on(sock, fast=fast)
    feed(client, sock, [publish(OURS, b"fine", mid=1) + b"\x30\xff\xff\xff\xff\x01"])
    assert run.ours == [b"fine"]
    assert sock.closed and client._sock is None and run.disconnects == 1  # noqa: SLF001


@pytest.mark.parametrize("fast", [False, True], ids=["paho", "reader"])
def test_a_publish_whose_topic_runs_past_its_end_drops_the_connection(fast: bool) -> None:
    bad = b"\x32\x05\x00\x30abc"  # the topic claims 48 bytes of a 5-byte packet
    sock = FakeSocket()
    client, run, _ = client_on(sock, fast=fast)
    feed(client, sock, [bad + publish(OURS, b"after", mid=2)])
    assert run.ours == [] and run.others == []
    assert sock.closed and run.disconnects == 1


@pytest.mark.parametrize("fast", [False, True], ids=["paho", "reader"])
def test_the_broker_closing_mid_packet_is_a_lost_connection(fast: bool) -> None:
    sock = FakeSocket()
    client, run, _ = client_on(sock, fast=fast)
    feed(client, sock, [publish(OURS, b"z" * 50000, mid=3)[:30000]])
    sock.eof = True
    assert client.loop_read() == paho.MQTT_ERR_CONN_LOST
    assert run.ours == [] and sock.closed and run.disconnects == 1


def test_a_new_connection_starts_clean() -> None:
    """Half a packet read on one socket must not be completed by the next connection's bytes."""
    first, second = FakeSocket(), FakeSocket()
    client, run, _ = client_on(first, fast=True)
    feed(client, first, [publish(OURS, b"old" * 1000, mid=1)[:1500]])
    client._sock = second  # paho reconnected  # noqa: SLF001
    feed(client, second, [publish(OURS, b"new", mid=2)])
    assert run.ours == [b"new"]
    assert bytes(second.sent) == puback(2)


def test_installed_while_paho_was_mid_packet_paho_finishes_that_packet() -> None:
    sock = FakeSocket()
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client._sock = sock  # noqa: SLF001
    got: list[bytes] = []
    client.message_callback_add(OURS, lambda _c, _u, m: got.append(bytes(m.payload)))
    stream = publish(OURS, b"first" * 100, mid=1) + publish(OURS, b"second", mid=2)
    feed(client, sock, [stream[:40]])  # paho's reader holds part of the first packet
    install(client, OURS, lambda _topic, view, _retain: got.append(bytes(view)))
    feed(client, sock, [stream[40:]])
    assert got == [b"first" * 100, b"second"]
    assert bytes(sock.sent) == puback(1) + puback(2)


def test_manual_ack_is_left_to_the_application() -> None:
    sock = FakeSocket()
    client, run, _ = client_on(sock, fast=True)
    client.manual_ack_set(True)
    feed(client, sock, [publish(OURS, b"p", mid=9)])
    assert run.ours == [b"p"] and bytes(sock.sent) == b""


def test_install_leaves_an_unknown_client_alone() -> None:
    class NotPaho:
        def loop_read(self) -> int:
            return 0

    thing = NotPaho()
    original = thing.loop_read
    assert install(thing, OURS, lambda *_: None) is None
    assert thing.loop_read == original


def test_install_leaves_websockets_to_paho() -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, transport="websockets")
    assert install(client, OURS, lambda *_: None) is None


class SlowSocket(FakeSocket):
    """Takes at most 40,000 bytes per send, and every other send none at all."""

    calls = 0
    kinds: set[type]

    def send(self, data: Any) -> int:
        self.calls += 1
        self.kinds = getattr(self, "kinds", set()) | {type(data)}
        if self.calls % 2 == 0:
            raise BlockingIOError
        data = bytes(data[:40_000])
        self.sent += data
        return len(data)


def writing_client(sock: FakeSocket, lean: bool, *, event_loop: bool = True) -> tuple[paho.Client, list[int]]:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client._sock = sock  # noqa: SLF001
    client._state = paho._ConnectionState.MQTT_CS_CONNECTED  # noqa: SLF001
    if event_loop:  # writes wait for the event loop (as under aiomqtt), not done inside each publish
        client.on_socket_register_write = client.on_socket_unregister_write = lambda *_: None
    written: list[int] = []  # on_publish: a QoS 0 publish written out
    client.on_publish = lambda _c, _u, mid, _rc, _p: written.append(mid)
    if lean:
        lean_writes(client)
    return client, written


def drain(client: paho.Client) -> None:
    while client.want_write():
        client.loop_write()


@pytest.mark.parametrize("qos", [0, 1])
def test_lean_writes_send_the_same_bytes_from_views(qos: int) -> None:
    sent = []
    for lean in (False, True):
        sock = SlowSocket()
        client, _ = writing_client(sock, lean)
        client.publish(OURS, b"small", qos=qos)
        client.publish(OURS, bytes(range(256)) * 1200, qos=qos)  # 300 KiB
        drain(client)
        sent.append((bytes(sock.sent), sock.kinds))
    (plain, plain_kinds), (views, view_kinds) = sent
    assert views == plain and len(plain) > 300_000
    assert memoryview not in plain_kinds and memoryview in view_kinds  # paho sent copies; now views
    assert UNSLICED_MIN > len(b"small") + 64  # small packets go as they are


class BudgetSocket(FakeSocket):
    """Each send takes at most the next budget's bytes (cycling); a budget of 0 refuses the call."""

    def __init__(self, budgets: list[int]) -> None:
        super().__init__()
        self.budgets = budgets or [1 << 30]
        self.calls = 0

    def send(self, data: Any) -> int:
        budget = self.budgets[self.calls % len(self.budgets)]
        self.calls += 1
        if budget == 0:
            raise BlockingIOError
        return super().send(bytes(data[:budget]))


write_ops = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.sampled_from([0, 5, 300, 9000, 20_000, 70_000]), st.sampled_from([0, 1])),
    st.tuples(st.just("puback"), st.integers(1, 65535), st.just(0)),
    st.tuples(st.just("ping"), st.just(0), st.just(0)),
    st.tuples(st.just("write"), st.just(0), st.just(0)),
), max_size=40)


@settings(max_examples=200, deadline=None)
@given(ops=write_ops, budgets=st.lists(st.integers(0, 50_000), max_size=6).filter(lambda b: not b or any(b)),
       disconnect=st.booleans())
def test_lean_writes_send_the_same_stream_in_fewer_sends(ops: list[tuple[str, int, int]], budgets: list[int],
                                                         disconnect: bool) -> None:
    """Any mix of publishes (QoS 0 and 1, small and large), PUBACKs, PINGREQs and writes, then
    perhaps a DISCONNECT, through a socket that takes a few bytes or a lot per call and refuses
    some calls: the same bytes leave in the same order, the same QoS 0 publishes are reported
    written, the DISCONNECT closes the socket as it does under paho's own writer, in no more sends."""
    results = []
    for lean in (False, True):
        sock = BudgetSocket(budgets)
        client, written = writing_client(sock, lean)
        disconnects: list[int] = []
        client.on_disconnect = lambda *_a: disconnects.append(1)
        for op, size, qos in ops:
            if op == "publish":
                client.publish(OURS, bytes([size % 251]) * size, qos=qos)
            elif op == "puback":
                client._send_puback(size)  # noqa: SLF001
            elif op == "ping":
                client._send_pingreq()  # noqa: SLF001
            else:
                client.loop_write()
        if disconnect:
            client.disconnect()
        drain(client)
        results.append((bytes(sock.sent), written, sock.calls, sock.closed, disconnects))
    (plain, plain_written, plain_sends, plain_closed, plain_dis), (lean_sent, lean_written, lean_sends, lean_closed, lean_dis) = results
    assert lean_sent == plain
    assert lean_written == plain_written
    assert lean_sends <= plain_sends
    assert lean_closed == plain_closed == disconnect and lean_dis == plain_dis


class CountingSocket(FakeSocket):
    calls = 0

    def send(self, data: Any) -> int:
        self.calls += 1
        return super().send(data)


def test_a_puback_and_the_next_request_leave_in_one_send() -> None:
    """What the device does for each reply: acknowledge it and ask for the next block."""
    sent = []
    for lean in (False, True):
        sock = CountingSocket()
        client, _ = writing_client(sock, lean=lean)
        client._send_puback(41)  # noqa: SLF001
        client.publish("edgeship/v1/req/dev-1", b'{"v":1}', qos=1)
        client._send_puback(42)  # noqa: SLF001
        drain(client)
        sent.append((bytes(sock.sent), sock.calls))
    (plain, plain_sends), (lean_sent, lean_sends) = sent
    assert lean_sent == plain and plain_sends == 3 and lean_sends == 1


def test_joined_packets_stay_under_join_max() -> None:
    sock = CountingSocket()
    client, _ = writing_client(sock, lean=True)
    for mid in range(1, 6001):  # 24,000 bytes of PUBACKs
        client._send_puback(mid)  # noqa: SLF001
    queued = [p["to_process"] for p in client._out_packet]  # noqa: SLF001
    assert len(queued) == 2 and max(queued) <= JOIN_MAX and sum(queued) == 24_000
    drain(client)
    assert bytes(sock.sent) == b"".join(puback(mid) for mid in range(1, 6001))


def test_qos0_publishes_a_disconnect_and_a_packet_partly_sent_are_not_joined() -> None:
    sock = SlowSocket()
    client, written = writing_client(sock, lean=True)
    client.publish(OURS, b"a", qos=0)
    client.publish(OURS, b"b", qos=0)
    client._send_puback(3)  # noqa: SLF001
    client.disconnect()
    assert [p["command"] & 0xF0 for p in client._out_packet] == [0x30, 0x30, 0x40, 0xE0]  # noqa: SLF001
    drain(client)
    assert written == [1, 2] and sock.closed
    sock = SlowSocket()
    client, _ = writing_client(sock, lean=True)
    client.publish(OURS, b"x" * 15_000, qos=1)
    client._out_packet[0]["pos"] = 1  # noqa: SLF001  (its first byte is out)
    client._out_packet[0]["to_process"] -= 1  # noqa: SLF001
    client._send_puback(4)  # noqa: SLF001
    assert len(client._out_packet) == 2  # noqa: SLF001


def test_nothing_is_joined_unless_an_event_loop_writes() -> None:
    """Under paho's own loop thread its writer would race the append; with no loop at all paho
    writes inside each publish. Either way packets are queued as paho queues them."""
    # No loop: each publish is written at once, even after a refused send left one queued.
    sent = []
    for lean in (False, True):
        sock = BudgetSocket([0] + [1 << 20] * 9)
        client, _ = writing_client(sock, lean, event_loop=False)
        client.publish(OURS, b"first", qos=1)  # refused: stays queued
        client.publish(OURS, b"second", qos=1)  # paho writes the queue now
        sent.append(bytes(sock.sent))
    assert sent[1] == sent[0] and b"second" in sent[0]
    # paho's loop thread (loop_start) writes on its own thread: nothing is joined.
    sock = CountingSocket()
    client, _ = writing_client(sock, lean=True)
    client._thread = threading.current_thread()  # noqa: SLF001  (as loop_start sets it)
    client._send_puback(1)  # noqa: SLF001
    client._send_puback(2)  # noqa: SLF001
    assert len(client._out_packet) == 2  # noqa: SLF001


class HandlerFailed(Exception):
    pass


@settings(max_examples=150, deadline=None)
@given(points=st.lists(st.integers(0, 140_000), max_size=25),
       error=st.sampled_from([HandlerFailed, OSError]))
def test_a_handler_that_raises_loses_no_packet_after_it(points: list[int], error: type[Exception]) -> None:
    """deliver raising (a bug, or an OSError from a disk write) surfaces from loop_read, and
    every packet is still delivered exactly once, in order: the bytes read past the failing
    packet are handled in the same call, not left for a read that may never come. An OSError
    from a handler is the handler's, not a lost connection. (paho's own reader, given a raising
    callback, hands the same packet to it again on its next call, so this is not differential.)"""
    payloads = [b"ok-1", b"boom-2", b"ok-3" * 10_000, b"boom-4" * 20_000, b"ok-5", b"boom-6", b"ok-7"]
    stream = b"".join(publish(OURS, p, mid=i + 1) for i, p in enumerate(payloads)) + publish(OTHER, b"hint", mid=99)
    sock = FakeSocket()
    client, run, _ = client_on(sock, fast=True)
    got: list[bytes] = []

    def deliver(_topic: bytes, payload: memoryview, _retain: bool) -> None:
        got.append(bytes(payload))
        if got[-1].startswith(b"boom"):
            raise error("the handler failed")

    install(client, OURS, deliver)
    raised = 0
    for piece in cut(stream, points):
        sock.arrive(piece)
        while sock.inbox and client._sock is sock:  # noqa: SLF001
            try:
                client.loop_read()
            except error:
                raised += 1
    assert got == payloads
    assert 1 <= raised <= 3
    assert bytes(sock.sent) == puback(1) + puback(3) + puback(5) + puback(7) + puback(99)  # no ack for a failed one
    assert run.others == [(OTHER, b"hint", 1)]
    assert not sock.closed and run.disconnects == 0


def test_route_hands_what_the_reader_leaves_to_paho_to_deliver_not_the_message_queue() -> None:
    """A QoS 2 message (or an MQTT 5 topic alias) on the routed topic goes through paho; route's
    topic callback still gives it to deliver, and nothing reaches aiomqtt's message queue."""
    import asyncio

    import aiomqtt

    from agent.mqtt import paho_of, route

    async def run() -> tuple[list[tuple[bytes, bytes]], int, bytes]:
        client = aiomqtt.Client("127.0.0.1", protocol=aiomqtt.ProtocolVersion.V5)
        inner = paho_of(client)
        sock = FakeSocket()
        inner._sock = sock  # noqa: SLF001
        inner._state = paho._ConnectionState.MQTT_CS_CONNECTED  # noqa: SLF001
        inner.on_socket_register_write = inner.on_socket_unregister_write = None  # no real fd
        got: list[tuple[bytes, bytes]] = []
        route(client, OURS, lambda topic, payload, _retain: got.append((topic, bytes(payload))))
        qos2 = publish(OURS, b"exactly once", qos=2, mid=5)
        pubrel = b"\x62\x02\x00\x05"
        feed(inner, sock, [publish(OURS, b"qos1", mid=4), qos2, pubrel])
        return got, len(client.messages), bytes(sock.sent)

    got, queued, sent = asyncio.run(run())
    assert got == [(OURS.encode(), b"qos1"), (OURS.encode(), b"exactly once")]
    assert queued == 0
    assert sent.startswith(puback(4) + b"\x50")  # then PUBREC for the QoS 2 one


def test_a_lost_connection_leaves_no_unretrieved_error_behind(broker: Broker) -> None:  # noqa: F811
    """A client whose broker went away exits its ``async with`` quietly: aiomqtt 2.5 left the
    lost connection's error unretrieved, and asyncio logged "Future exception was never
    retrieved" for it (after every broker restart, in a device's log)."""
    import asyncio
    import contextlib
    import gc

    import aiomqtt

    from agent.mqtt import make_client, parse_broker_url

    logged: list[str] = []

    async def go() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: logged.append(ctx["message"]))
        client = make_client(parse_broker_url(broker.url), identifier="lost-link", protocol="3.1.1")
        with contextlib.suppress(aiomqtt.MqttError):  # an aiomqtt that raises the loss on exit may
            async with client:
                broker.stop()
                for _ in range(500):
                    if client._disconnected.done():  # noqa: SLF001
                        break
                    await asyncio.sleep(0.01)
                assert client._disconnected.done()  # noqa: SLF001 - paho saw the connection go
        del client
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(go())
    assert not [m for m in logged if "never retrieved" in m], logged
