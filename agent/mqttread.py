"""A faster MQTT packet reader under paho, for the device's bulk replies.

paho-mqtt 2.x reads a packet a byte at a time for its fixed header, grows it by
``bytes +=`` as it arrives (a copy of all that came before on every ``recv``), and
``decode_publish`` then copies the payload three more times (``struct.unpack`` of
the rest after the topic length, the topic and the message id, and a slice after
the MQTT 5 properties). For a 256 KiB block that is several copies per message,
all on the event loop thread that also issues the next requests.

:class:`PacketReader` replaces the paho client's ``loop_read`` (the method aiomqtt
calls when the socket is readable). It reads the socket in large pieces and a
packet's remaining bytes straight into one buffer of the packet's size, so each
byte is copied once, from the kernel. A QoS 0 or 1 PUBLISH on the one topic it was
given goes to ``deliver`` as a memoryview of that buffer, and is acknowledged the
way paho would (its ``_send_puback``); every other packet (CONNACK, SUBACK, PUBACK,
PINGRESP, DISCONNECT, PUBLISH on other topics or at QoS 2) is handed to paho's own
handler unchanged, so paho still owns the session: keep-alive, in-flight windows,
callbacks, aiomqtt's message queue (``agent.mqtt.route`` also registers a topic callback, so a
message on the topic that paho handles still reaches ``deliver``).

It relies on paho's private reader interface (``_sock``, ``_in_packet``,
``_packet_handle``, ``_loop_rc_handle``, ``_send_puback``, ``_msgtime_mutex``,
``_last_bytes_received``); :func:`install` checks they are there and otherwise
leaves paho alone (pyproject pins paho-mqtt 2.x).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Deliver = Callable[[bytes, memoryview, bool], None]
"""``deliver(topic, payload, retain)``."""

PUBLISH, PUBACK = 0x30, 0x40
_SCRATCH = 16 * 1024
"""Bytes read at a time while between packets (fixed headers, small packets)."""
PREALLOC_MAX = 4 * 1024 * 1024
"""A packet up to this size gets its whole buffer at once; a larger one (paho accepts up to 256
MiB) grows as its bytes arrive, so a hostile length costs no memory before the data comes."""
_READS_PER_CALL = 8
"""``recv`` calls per ``loop_read``, so that a fast sender cannot hold the event loop."""

_PAHO_PRIVATE = ("_sock", "_in_packet", "_packet_handle", "_loop_rc_handle", "_send_puback",
                 "_msgtime_mutex", "_last_bytes_received", "_protocol", "_manual_ack",
                 "_out_message_mutex", "_out_messages", "_do_on_publish",
                 "_call_socket_register_write")

AGAIN, SUCCESS, CONN_LOST, PROTOCOL, NO_CONN = -1, 0, 7, 2, 4
"""paho's MQTTErrorCode values used here (checked against paho by :func:`install`)."""


class _WouldBlock(Exception):
    """The socket has nothing to read now."""


class _Lost(Exception):
    """The connection is gone (EOF or a socket error)."""


class PacketReader:
    """Reads MQTT packets from ``client._sock`` for one paho ``client``; see the module docstring.

    PUBLISH packets whose topic matches ``topic_filter`` (a topic, or one ending in a single-level
    ``/+``) go to ``deliver(topic, payload, retain)``; ``payload`` is a memoryview that stays valid
    after ``deliver`` returns (each packet has its own buffer). ``deliver`` runs on the thread
    that reads (the event loop's) and must not raise."""

    def __init__(self, client: Any, topic_filter: str, deliver: Deliver, *, v5: bool) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        from paho.mqtt.reasoncodes import ReasonCode

        self._now = paho.time_func  # what paho stamps _last_bytes_received with
        self._malformed = paho.MalformedPacket
        # What paho passes on_publish for a plain PUBACK, made once (paho makes a pair per PUBACK).
        self._puback_ok = ReasonCode(PacketTypes.PUBACK)
        self._puback_props = Properties(PacketTypes.PUBACK)
        self._client = client
        self._match = _matcher(topic_filter)
        self._deliver = deliver
        self._v5 = v5
        self._paho_loop_read = client.loop_read
        self._sock: Any = None
        self._scratch = bytearray(_SCRATCH)
        self._have = 0  # bytes in scratch not yet consumed, from _pos
        self._pos = 0
        self._reset_packet()
        self.delivered = 0
        self.handed_to_paho = 0

    def _reset_packet(self) -> None:
        self._header = bytearray()  # fixed header bytes so far (command + remaining length)
        self._length = -1  # remaining length, once the header is complete
        self._packet: bytearray | None = None
        self._filled = 0

    # --- the paho entry point -------------------------------------------------

    def loop_read(self, max_packets: int = 1) -> int:
        client = self._client
        sock = client._sock  # noqa: SLF001
        if sock is None:
            return NO_CONN
        if sock is not self._sock:  # a new connection: nothing read so far belongs to it
            self._sock = sock
            self._have = self._pos = 0
            self._reset_packet()
        if not self._header and client._in_packet["command"]:  # noqa: SLF001
            # paho's own reader was in the middle of a packet when this one was installed
            return int(self._paho_loop_read(max_packets))
        got_data = False
        rc = SUCCESS
        for _ in range(_READS_PER_CALL):
            try:
                rc = self._read_some(sock)
            except _WouldBlock:
                break
            except _Lost as e:
                log.debug("mqtt read failed: %s", e.__cause__ or e)
                rc = CONN_LOST
            got_data = True
            if rc != SUCCESS or client._sock is not sock:  # noqa: SLF001
                break
        if got_data:
            with client._msgtime_mutex:  # noqa: SLF001
                client._last_bytes_received = self._now()  # noqa: SLF001
        if rc > 0 and client._sock is sock:  # noqa: SLF001
            return int(client._loop_rc_handle(rc))  # noqa: SLF001
        return SUCCESS

    # --- reading ---------------------------------------------------------------

    def _recv_into(self, sock: Any, view: memoryview) -> int:
        """``sock.recv_into(view)``; :class:`_WouldBlock` or :class:`_Lost` instead of the socket's
        exceptions, so that ``loop_read`` tells them from exceptions raised by handlers."""
        try:
            n = int(sock.recv_into(view))
        except (BlockingIOError, ssl.SSLWantReadError):
            raise _WouldBlock from None
        except ssl.SSLWantWriteError:
            self._client._call_socket_register_write()  # noqa: SLF001
            raise _WouldBlock from None
        except OSError as e:
            raise _Lost(str(e)) from e
        if n == 0:
            raise _Lost("the broker closed the connection")
        return n

    def _read_some(self, sock: Any) -> int:
        """One ``recv`` (:class:`_WouldBlock` when there is nothing), then every packet it
        completed handled; returns paho's code for the first failure, else SUCCESS. Bytes left
        in scratch by a handler that raised are handled first, without reading."""
        if self._have:
            return self._consume_scratch()
        if self._length >= 0 and self._need() >= _SCRATCH:
            # In the body of a large packet: read straight into it.
            assert self._packet is not None
            if self._filled == len(self._packet):  # a very large packet: grow as its bytes come
                self._packet.extend(bytes(min(self._need(), PREALLOC_MAX)))
            self._filled += self._recv_into(sock, memoryview(self._packet)[self._filled:])
            return self._finish_if_complete()
        self._have = self._recv_into(sock, memoryview(self._scratch))
        self._pos = 0
        return self._consume_scratch()

    def _need(self) -> int:
        return self._length - self._filled

    def _consume_scratch(self) -> int:
        """Handle every packet completed by the bytes in scratch. If a handler raises, the rest
        are still handled (as they would be by paho, which reads one packet per ``recv``, on its
        next call; here nothing more may arrive to call this again), then the first exception
        is raised."""
        raised: BaseException | None = None
        scratch = self._scratch
        while self._have:
            if self._length < 0:
                byte = scratch[self._pos]
                self._pos += 1
                self._have -= 1
                self._header.append(byte)
                if len(self._header) == 1:
                    continue
                if len(self._header) > 5:
                    log.debug("mqtt packet's remaining length runs over 4 bytes")
                    return PROTOCOL
                if byte & 0x80:
                    continue
                self._length = _varint(self._header, 1)
                self._packet = bytearray(min(self._length, PREALLOC_MAX))
                self._filled = 0
            else:
                assert self._packet is not None
                take = min(self._have, self._need())
                if len(self._packet) < self._filled + take:
                    self._packet.extend(bytes(self._filled + take - len(self._packet)))
                self._packet[self._filled:self._filled + take] = scratch[self._pos:self._pos + take]
                self._filled += take
                self._pos += take
                self._have -= take
            try:
                rc = self._finish_if_complete()
            except Exception as e:  # noqa: BLE001  (raised below, once the scratch is consumed)
                raised = raised or e
                rc = SUCCESS
            if rc != SUCCESS:
                if raised is not None:
                    log.error("mqtt packet handler failed before the connection was dropped: %r", raised)
                return rc
            if self._client._sock is not self._sock:  # noqa: SLF001  (a handler closed it)
                self._have = 0
                break
        if raised is not None:
            raise raised
        return SUCCESS

    def _finish_if_complete(self) -> int:
        if self._filled < self._length:
            return SUCCESS
        command, packet = self._header[0], self._packet
        assert packet is not None
        self._reset_packet()
        return self._handle(command, packet)

    # --- handling ----------------------------------------------------------------

    def _handle(self, command: int, packet: bytearray) -> int:
        kind = command & 0xF0
        if kind == PUBACK and len(packet) == 2:
            return self._puback((packet[0] << 8) | packet[1])
        if kind == PUBLISH and not command & 0x04:  # QoS 0 or 1
            parsed = _publish_parts(packet, command, self._v5)
            if parsed is not None and self._match(parsed[0]):
                topic, offset, mid = parsed
                self.delivered += 1
                self._deliver(topic, memoryview(packet)[offset:], bool(command & 0x01))
                if mid is None or self._client._manual_ack:  # noqa: SLF001  (as paho: the app acks)
                    return SUCCESS
                return int(self._client._send_puback(mid))  # noqa: SLF001
        return self._to_paho(command, packet)

    def _puback(self, mid: int) -> int:
        """A plain PUBACK (success, no properties: all MQTT 3.1.1 has): what paho's
        ``_handle_pubackcomp`` does with it, without decoding a reason code and properties."""
        client = self._client
        with client._out_message_mutex:  # noqa: SLF001
            if mid in client._out_messages:  # noqa: SLF001
                return int(client._do_on_publish(mid, self._puback_ok, self._puback_props))  # noqa: SLF001
        return SUCCESS

    def _to_paho(self, command: int, packet: bytearray) -> int:
        """Let paho handle a whole packet as its own reader would have."""
        client = self._client
        self.handed_to_paho += 1
        client._in_packet = {  # noqa: SLF001
            "command": command, "have_remaining": 1, "remaining_count": [], "remaining_mult": 1,
            "remaining_length": len(packet), "packet": packet, "to_process": 0, "pos": 0,
        }
        try:
            rc = client._packet_handle()  # noqa: SLF001
        except self._malformed as e:
            log.debug("malformed mqtt packet: %s", e)
            rc = PROTOCOL
        finally:
            client._in_packet = {  # noqa: SLF001
                "command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
                "remaining_length": 0, "packet": bytearray(), "to_process": 0, "pos": 0,
            }
        return int(rc)


def _varint(data: bytes | bytearray, start: int) -> int:
    value, mult = 0, 1
    for byte in data[start:]:
        value += (byte & 0x7F) * mult
        mult *= 128
    return value


def _matcher(topic_filter: str) -> Callable[[bytes], bool]:
    if topic_filter.endswith("/+") and "+" not in topic_filter[:-1] and "#" not in topic_filter:
        prefix = topic_filter[:-1].encode()
        return lambda topic: topic.startswith(prefix) and b"/" not in topic[len(prefix):]
    if "+" in topic_filter or "#" in topic_filter:
        raise ValueError(f"topic filter {topic_filter!r}: only a trailing single-level /+ is supported")
    exact = topic_filter.encode()
    return exact.__eq__


def _publish_parts(packet: bytearray, command: int, v5: bool) -> tuple[bytes, int, int | None] | None:
    """(topic, payload offset, message id or None at QoS 0) of a well-formed PUBLISH with a
    topic; None for anything else (an MQTT 5 topic alias, a malformed packet), which then goes to
    paho and its error handling."""
    n = len(packet)
    if n < 2:
        return None
    pos = 2 + ((packet[0] << 8) | packet[1])
    if pos > n or pos == 2:
        return None
    topic = bytes(packet[2:pos])
    mid = None
    if command & 0x02:
        if pos + 2 > n:
            return None
        mid = (packet[pos] << 8) | packet[pos + 1]
        if mid == 0:
            return None
        pos += 2
    if v5:  # skip the properties: a varint length, then that many bytes
        plen, mult = 0, 1
        for i in range(4):
            if pos >= n:
                return None
            byte = packet[pos]
            pos += 1
            plen += (byte & 0x7F) * mult
            mult *= 128
            if not byte & 0x80:
                break
            if i == 3:
                return None
        pos += plen
        if pos > n:
            return None
    return topic, pos, mid


def install(paho_client: Any, topic_filter: str, deliver: Deliver) -> PacketReader | None:
    """Make ``paho_client`` read through a :class:`PacketReader` delivering ``topic_filter``; None
    (and paho left as it is) if this paho does not have the private interface the reader needs."""
    import paho.mqtt.client as paho

    codes_match = (paho.MQTT_ERR_AGAIN, paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_CONN_LOST,
                   paho.MQTT_ERR_PROTOCOL, paho.MQTT_ERR_NO_CONN) == (AGAIN, SUCCESS, CONN_LOST, PROTOCOL, NO_CONN)
    if not codes_match or not all(hasattr(paho_client, name) for name in _PAHO_PRIVATE) \
            or getattr(paho_client, "_transport", "tcp") != "tcp":
        log.debug("paho-mqtt %s: keeping its own packet reader", getattr(paho, "__version__", "?"))
        return None
    reader = PacketReader(paho_client, topic_filter, deliver, v5=paho_client._protocol == paho.MQTTv5)  # noqa: SLF001
    paho_client.loop_read = reader.loop_read
    return reader

