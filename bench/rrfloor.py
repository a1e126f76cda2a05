"""The floor under edgeship's download: bare paho request/response plus the same per-byte work.

No edgeship code on either end. A server process (a plain paho client, its own loop thread)
answers "offset,length" requests with ``offset,`` followed by the bytes, read with ``pread`` from
the bundle; the device (a plain paho client in the bench's process) keeps ``in_flight`` requests
of ``request`` bytes outstanding, writes each reply in place into a part file, and a second thread
does what edgeship's verifier does to every byte of a bundle published with its transfer
signature: read the part file back as it grows, SHA-256 each block (TUF's per-block hashes, which
the release key signed too) and inflate the gzip stream (the tar members are not hashed again).
Both QoS 1, TCP_NODELAY, one Mosquitto.

What it leaves out, and edgeship does: TUF metadata, request ids and validation, the JSON reply
header, the block record, the tar parser, the signature, staging. So the ratio of edgeship's
download to this row is what edgeship's own code costs; this row's ratio to the raw stream is
what request/response and the verification cost on this machine, whoever implements them.

    python bench/rrfloor.py serve HOST PORT BUNDLE      (started by bench/transfer.py)
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REQ_TOPIC, RESP_TOPIC = "bench/floor/req", "bench/floor/resp"
BLOCK = 256 * 1024
_GZIP_HEADER = 10
"""edgeship bundles carry the bare 10-byte gzip header (no optional fields)."""


IN_FLIGHT = 64
"""paho's QoS 1 window: agent.mqtt.MAX_INFLIGHT, which this file does not import (no edgeship code)."""


def paho_client(name: str) -> Any:
    """A plain paho client (MQTT 3.1.1, a window of ``IN_FLIGHT``): the floor's, and the raw stream's."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=MQTTProtocolVersion.MQTTv311)
    c.max_inflight_messages_set(IN_FLIGHT)
    c.max_queued_messages_set(0)
    return c


def _connect(client: Any, host: str, port: int, topic: str) -> None:
    subscribed = threading.Event()
    client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect(host, port, keepalive=30)
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    if not subscribed.wait(10):
        raise RuntimeError(f"{client._client_id!r}: not subscribed to {topic} within 10 s")  # noqa: SLF001


def serve(host: str, port: int, bundle: Path) -> None:
    """Answer requests until stdin closes."""
    fd = os.open(bundle, os.O_RDONLY)
    c = paho_client("bench-floor-server")

    def on_message(cl: Any, _u: Any, msg: Any) -> None:
        offset, length = map(int, msg.payload.split(b","))
        cl.publish(RESP_TOPIC, b"%d," % offset + os.pread(fd, length, offset), qos=1)

    c.on_message = on_message
    _connect(c, host, port, REQ_TOPIC)
    print("ready", flush=True)
    sys.stdin.read()
    c.disconnect()
    c.loop_stop()


@contextmanager
def floor_server(host: str, port: int, bundle: Path) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, __file__, "serve", host, str(port), str(bundle)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the floor server did not start")
        yield
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


class _Verifier(threading.Thread):
    """Reads the part file as its prefix grows: SHA-256 per block, inflate (counting what comes out)."""

    def __init__(self, path: Path, size: int, hash_output: bool) -> None:
        super().__init__(name="floor-verifier", daemon=True)
        self._path, self._size, self._hash_output = path, size, hash_output
        self.inflated = -1
        self._cond = threading.Condition()
        self._have: set[int] = set()
        self._whole = 0
        self.error: BaseException | None = None
        self.done_at = 0.0

    def arrived(self, offset: int) -> None:
        with self._cond:
            self._have.add(offset)
            while self._whole in self._have:
                self._whole += BLOCK
            self._cond.notify_all()

    def run(self) -> None:
        try:
            fd = os.open(self._path, os.O_RDONLY)
            inflater, inflated, pos = zlib.decompressobj(-zlib.MAX_WBITS), 0, 0
            try:
                while pos < self._size:
                    with self._cond:
                        while self._whole <= pos:
                            self._cond.wait()
                    block = os.pread(fd, min(BLOCK, self._size - pos), pos)
                    hashlib.sha256(block).digest()
                    data = block[_GZIP_HEADER:] if pos == 0 else block
                    while data and not inflater.eof:
                        out = inflater.decompress(data, BLOCK)
                        if self._hash_output:
                            hashlib.sha256(out).digest()
                        inflated += len(out)
                        data = inflater.unconsumed_tail
                    pos += len(block)
                self.inflated = inflated
            finally:
                os.close(fd)
            self.done_at = time.perf_counter()
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            self.error = e


def inflated_size(bundle: Path) -> int:
    """What the floor's verifier must arrive at: the size of the bundle's gzip stream, inflated."""
    inflater, size = zlib.decompressobj(-zlib.MAX_WBITS), 0
    with open(bundle, "rb") as fh:
        data = fh.read(BLOCK)[_GZIP_HEADER:]
        while data and not inflater.eof:
            size += len(inflater.decompress(data, BLOCK))
            data = inflater.unconsumed_tail or fh.read(BLOCK)
    return size


def download(host: str, port: int, size: int, part: Path, *, in_flight: int, request: int, expect: int,
             hash_output: bool = False) -> float:
    """Seconds from the first request to the last byte verified; ``expect`` is :func:`inflated_size`
    of the bundle (so the floor is known to have done all its work). ``hash_output`` also hashes what
    inflates, as edgeship does for a bundle published without its transfer signature."""
    part.unlink(missing_ok=True)
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    verifier = _Verifier(part, size, hash_output)
    lock, state = threading.Lock(), {"next": 0}
    c = paho_client("bench-floor-device")

    def ask() -> None:
        with lock:
            offset = state["next"]
            state["next"] += request
        if offset < size:
            c.publish(REQ_TOPIC, b"%d,%d" % (offset, min(request, size - offset)), qos=1)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        payload = msg.payload
        comma = payload.index(b",")
        offset, body = int(payload[:comma]), memoryview(payload)[comma + 1:]
        ask()
        os.pwrite(fd, body, offset)
        for block in range(offset, offset + len(body), BLOCK):
            verifier.arrived(block)

    c.on_message = on_message
    try:
        _connect(c, host, port, RESP_TOPIC)
        verifier.start()
        start = time.perf_counter()
        for _ in range(in_flight):
            ask()
        verifier.join(120)
        if verifier.is_alive() or verifier.error is not None:
            raise RuntimeError(f"floor download did not finish: {verifier.error!r}")
        if verifier.inflated != expect:
            raise RuntimeError(f"floor download: the bundle inflated to {verifier.inflated} bytes, not {expect}")
        return verifier.done_at - start
    finally:
        c.disconnect()
        c.loop_stop()
        os.close(fd)
        part.unlink(missing_ok=True)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "serve":
        sys.exit(__doc__)
    serve(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
