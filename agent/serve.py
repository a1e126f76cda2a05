"""The local inference API: the Open Inference Protocol (KServe v2 REST, as Triton speaks it) over HTTP/1.1.

:class:`InferenceServer` serves a :class:`~agent.host.ModelHost` on 127.0.0.1 (or a Unix
socket) from its own threads, so the agent's asyncio loop is never blocked:

* ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready`` - server metadata and health;
* ``GET /v2/models/{name}[/versions/{v}]`` - model metadata (datatypes FP32, INT8, ...;
  ``-1`` for a dynamic dimension) and ``.../ready``;
* ``POST /v2/models/{name}[/versions/{v}]/infer`` - tensors as JSON, or with Triton's binary
  tensor data extension (``Inference-Header-Content-Length``, ``binary_data_size``,
  ``binary_data``, what ``tritonclient`` sends by default), and Triton's classification
  extension (top-k ``"score:index:label"`` strings, labels from the bundle);
* ``POST /v2/repository/index`` - the models served (Triton's repository index).

Errors are ``{"error": "..."}``: 400 for a request that does not fit, 404 for an unknown
model or path, 413 for an oversize body, 500 when the runtime fails. Every limit is a field
of :class:`ServeLimits`. The wire format (:func:`decode_request`, :func:`encode_response`) is
pure; the HTTP layer is the stdlib's ``http.server`` with one write per response.

The second half is the client side: :class:`Client` (stdlib ``http.client``, TCP or Unix
socket, JSON tensors) and the ``edgeship-agent infer`` command (:func:`infer`).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import socket
import socketserver
import stat
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote, unquote, urlsplit

import click
import numpy as np

from agent import __version__
from agent.cliutil import echo_json, json_option
from agent.config import MiB
from agent.errors import BadData, LinkError, ModelError, UsageError
from agent.fsutil import write_atomic
from agent.host import BadRequest, ModelHost, ModelInfo, UnknownModel
from agent.manifest import TensorSpec

log = logging.getLogger(__name__)

__all__ = ["ADDRESS_FILE", "Client", "InferenceServer", "ServeLimits", "decode_request", "encode_response",
           "infer", "write_address"]

SERVER_NAME = "edgeship-agent"
EXTENSIONS = ("binary_tensor_data", "classification")
PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tflite"}
DATATYPES = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
             "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
             "float32": "FP32", "float64": "FP64"}
NUMPY_TYPES = {v: np.dtype(k) for k, v in DATATYPES.items()}
ADDRESS_FILE = "serve.json"
"""Written by the agent in its state directory when it serves on a port it picked (port = 0)."""


@dataclass(frozen=True, kw_only=True)
class ServeLimits:
    """What one client may make the server hold. Header lines (64 KiB) and count (100) are http.server's."""

    max_body_bytes: int = 64 * MiB
    """Request body as received (and after gzip/deflate decoding)."""
    max_json_bytes: int = 16 * MiB
    """The JSON part of a request (JSON tensor data becomes Python lists: ~10x its size in memory)."""
    max_connections: int = 64
    """Open client connections (one thread each); more are answered 503 and closed."""
    idle_timeout: float = 30.0
    """Seconds a connection may sit idle, or stall mid-request, before it is closed."""

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UsageError(f"ServeLimits.{name} must be positive, got {value!r}")


class _HttpError(Exception):
    """An HTTP-level refusal. ``close``: the body was left unread, so the connection must end."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.close = close


# --- the wire format (pure) -----------------------------------------------------------------


def model_metadata(info: ModelInfo) -> dict[str, Any]:
    def tensors(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": DATATYPES[s.dtype], "shape": list(s.shape)} for s in specs]

    return {"name": info.name, "versions": [info.version], "platform": PLATFORMS[info.runtime],
            "inputs": tensors(info.inputs), "outputs": tensors(info.outputs)}


@dataclass(frozen=True, kw_only=True)
class Requested:
    """One output the client asked for: as binary data or JSON, raw or as top-k classes."""

    name: str
    binary: bool
    classes: int = 0


@dataclass(frozen=True, kw_only=True)
class Request:
    inputs: dict[str, np.ndarray]
    outputs: tuple[Requested, ...]
    id: str | None


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _json_tensor(data: Any, dtype: np.dtype[Any], shape: list[int], name: str) -> np.ndarray:
    try:
        arr = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise BadRequest(f"input {name!r}: 'data' is not a regular array of numbers") from None
    kind = arr.dtype.kind
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if arr.size != math.prod(shape):
        raise BadRequest(f"input {name!r}: {arr.size} value(s) in 'data' for shape {shape}")
    if arr.size and kind not in allowed:
        raise BadRequest(f"input {name!r}: 'data' holds {arr.dtype} values, not {DATATYPES[dtype.name]}")
    if arr.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise BadRequest(f"input {name!r}: a value is out of range for {DATATYPES[dtype.name]}")
    return arr.astype(dtype).reshape(shape)


def decode_request(body: bytes, header_length: int | None, info: ModelInfo, *,
                   max_json_bytes: int = ServeLimits.max_json_bytes) -> Request:
    """Parse an infer request (JSON, or JSON + binary tensors) for model ``info``. Raises BadRequest."""
    json_end = len(body) if header_length is None else header_length
    if not 0 <= json_end <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length {header_length} exceeds the body ({len(body)} bytes)")
    if json_end > max_json_bytes:
        raise BadRequest(f"the JSON part of the request is larger than {max_json_bytes} bytes")
    try:
        doc = json.loads(body[:json_end])
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request is not valid JSON: {exc}") from None
    doc = _obj(doc, "the request")
    binary = memoryview(body)[json_end:]
    specs = {s.name: s for s in info.inputs}
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, raw in enumerate(raw_inputs):
        item = _obj(raw, f"inputs[{i}]")
        name = item.get("name")
        if not isinstance(name, str):
            raise BadRequest(f"inputs[{i}].name must be a string")
        spec = specs.get(name)
        if spec is None:
            raise BadRequest(f"unknown input {name!r}; the model takes {list(specs)}")
        if name in inputs:
            raise BadRequest(f"input {name!r} is given twice")
        datatype = item.get("datatype")
        if datatype != DATATYPES[spec.dtype]:
            raise BadRequest(f"input {name!r}: datatype {datatype!r} does not match the model's "
                             f"{DATATYPES[spec.dtype]}")
        shape = item.get("shape")
        if not isinstance(shape, list) or len(shape) > 16:
            raise BadRequest(f"input {name!r}: 'shape' must be a list of at most 16 sizes")
        shape = [_count(d, f"input {name!r}: a shape dimension") for d in shape]
        dtype = NUMPY_TYPES[datatype]
        params = _obj(item.get("parameters", {}), f"input {name!r}: 'parameters'")
        if "binary_data_size" in params:
            size = _count(params["binary_data_size"], f"input {name!r}: binary_data_size")
            if "data" in item:
                raise BadRequest(f"input {name!r} has both 'data' and binary_data_size")
            if size != math.prod(shape) * dtype.itemsize:
                raise BadRequest(f"input {name!r}: binary_data_size {size} does not fit shape {shape} of "
                                 f"{datatype} ({math.prod(shape) * dtype.itemsize} bytes)")
            if offset + size > len(binary):
                raise BadRequest(f"input {name!r}: binary data ends {offset + size - len(binary)} byte(s) "
                                 "past the request body")
            if size == 0:
                arr = np.empty(shape, dtype=dtype)
            else:
                arr = np.frombuffer(binary, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
            offset += size
            inputs[name] = arr if arr.flags.aligned else arr.copy()
        elif "data" in item:
            inputs[name] = _json_tensor(item["data"], dtype, shape, name)
        else:
            raise BadRequest(f"input {name!r} has neither 'data' nor binary_data_size")
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} byte(s) of binary data after the last input")
    params = _obj(doc.get("parameters", {}), "'parameters'")
    binary_default = params.get("binary_data_output", False) is True
    raw_outputs = doc.get("outputs")
    names = [s.name for s in info.outputs]
    if raw_outputs is None:
        outputs = tuple(Requested(name=n, binary=binary_default) for n in names)
    else:
        if not isinstance(raw_outputs, list):
            raise BadRequest("'outputs' must be a list")
        wanted: list[Requested] = []
        for i, raw in enumerate(raw_outputs):
            item = _obj(raw, f"outputs[{i}]")
            name = item.get("name")
            if name not in names:
                raise BadRequest(f"unknown output {name!r}; the model gives {names}")
            if any(r.name == name for r in wanted):
                raise BadRequest(f"output {name!r} is requested twice")
            oparams = _obj(item.get("parameters", {}), f"output {name!r}: 'parameters'")
            binary_flag = oparams.get("binary_data", binary_default)
            if not isinstance(binary_flag, bool):
                raise BadRequest(f"output {name!r}: binary_data must be true or false")
            classes = _count(oparams.get("classification", 0), f"output {name!r}: classification")
            wanted.append(Requested(name=name, binary=binary_flag, classes=classes))
        outputs = tuple(wanted)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    return Request(inputs=inputs, outputs=outputs, id=request_id)


def _classify(value: np.ndarray, k: int, labels: Sequence[str] | None) -> np.ndarray:
    """Triton's classification: the top ``k`` of each row as ``"score:index[:label]"``."""
    rows = value.reshape(1, -1) if value.ndim < 2 else value.reshape(value.shape[0], -1)
    k = min(k, rows.shape[1])
    out = np.empty((rows.shape[0], k), dtype=object)
    for r, row in enumerate(rows):
        for j, idx in enumerate(np.argsort(-row.astype(np.float64), kind="stable")[:k]):
            label = f":{labels[idx]}" if labels is not None and idx < len(labels) else ""
            out[r, j] = f"{float(row[idx]):f}:{int(idx)}{label}".encode()
    return out if value.ndim >= 2 else out.reshape(k)


def encode_response(info: ModelInfo, outputs: Mapping[str, np.ndarray], requested: Sequence[Requested],
                    request_id: str | None) -> tuple[list[bytes], int | None]:
    """The response body as parts, and the JSON length when binary tensors follow it (else None)."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for want in requested:
        value = outputs[want.name]
        if want.classes:
            strings = _classify(value, want.classes, info.labels)
            entry: dict[str, Any] = {"name": want.name, "datatype": "BYTES", "shape": list(strings.shape)}
            if want.binary:
                blob = b"".join(len(s).to_bytes(4, "little") + s for s in strings.ravel())
            else:
                entry["data"] = [s.decode() for s in strings.ravel()]
        else:
            entry = {"name": want.name, "datatype": DATATYPES[value.dtype.name], "shape": list(value.shape)}
            if want.binary:
                blob = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
            else:
                entry["data"] = value.ravel().tolist()
        if want.binary:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": info.name, "model_version": info.version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = entries
    head = json.dumps(doc, separators=(",", ":")).encode()
    return [head, *blobs], (len(head) if blobs else None)


# --- the HTTP server ----------------------------------------------------------------------------


_LINGER_BYTES = 256 * MiB
_LINGER_SECONDS = 5.0


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = SERVER_NAME
    server: _ServerMixin  # type: ignore[assignment]

    def setup(self) -> None:
        self.timeout = self.server.limits.idle_timeout  # type: ignore[misc]  # per server, not per class
        self.disable_nagle_algorithm = self.server.tcp  # type: ignore[misc]  # TCP_NODELAY (not on Unix sockets)
        super().setup()
        self.refused = not self.server.register(self.connection)
        self.linger = False

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.unregister(self.connection)

    def handle(self) -> None:
        if self.refused:
            self.close_connection = True
            self._send(503, [_error_body("too many connections")], close=True)
            return
        try:
            super().handle()
            if self.linger:
                self._drain()
        except OSError as exc:  # the client reset the connection, or stop() shut it down
            log.debug("inference API connection closed: %s", exc)

    def _drain(self) -> None:
        """Lingering close after refusing a body unread: a client still sending it reads our answer
        instead of a connection reset. Bounded by _LINGER_BYTES and _LINGER_SECONDS."""
        self.connection.shutdown(socket.SHUT_WR)
        self.connection.settimeout(1.0)
        deadline = time.monotonic() + _LINGER_SECONDS
        drained = 0
        while drained < _LINGER_BYTES and time.monotonic() < deadline:
            chunk = self.connection.recv(1 << 16)
            if not chunk:
                break
            drained += len(chunk)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("%s: " + format, getattr(self, "requestline", ""), *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (bad request line, header lines too long or too many, unknown method)
        self._send(code, [_error_body(message or self.responses.get(code, ("error",))[0])], close=True)

    # --- plumbing ----------------------------------------------------------------------

    def _send(self, status: int, parts: list[bytes], *, content_type: str = "application/json",
              extra: str = "", close: bool = False) -> None:
        length = sum(len(p) for p in parts)
        if close:
            self.close_connection = True
        if self.close_connection:
            extra += "Connection: close\r\n"
        reason = self.responses.get(status, ("",))[0]
        head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n{extra}\r\n"
        try:  # one write per response: no Nagle / delayed-ACK stall between headers and body
            self.wfile.write(b"".join([head.encode("latin-1"), *parts]))
        except OSError as exc:
            log.debug("inference API: client gone before the reply: %s", exc)
            self.close_connection = True

    def _body(self) -> bytes:
        """The request body, bounded and decoded; raises _HttpError (closing the connection when unread)."""
        limits = self.server.limits
        if "Transfer-Encoding" in self.headers:
            raise _HttpError(501, "Transfer-Encoding is not supported: send Content-Length", close=True)
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return b""
        if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
            raise _HttpError(400, "invalid Content-Length", close=True)
        length = int(lengths[0])
        if length > limits.max_body_bytes:
            raise _HttpError(413, f"request body of {length} bytes exceeds the limit of {limits.max_body_bytes}",
                             close=True)
        body = self.rfile.read(length)
        if len(body) != length:
            raise _HttpError(400, "the request body ended early", close=True)
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding in ("gzip", "deflate"):
            inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
            try:
                body = inflater.decompress(body, limits.max_body_bytes + 1)
            except zlib.error as exc:
                raise _HttpError(400, f"cannot decode the {encoding} body: {exc}") from None
            if len(body) > limits.max_body_bytes or inflater.unconsumed_tail:
                raise _HttpError(413, f"the decoded request body exceeds the limit of {limits.max_body_bytes} bytes")
            if not inflater.eof or inflater.unused_data:
                raise _HttpError(400, f"the {encoding} body is truncated or has trailing data")
        elif encoding != "identity":
            raise _HttpError(415, f"Content-Encoding {encoding!r} is not supported")
        return body

    def _dispatch(self, method: str) -> None:
        try:
            body = self._body()
            path = [unquote(p) for p in self.path.split("?", 1)[0].strip("/").split("/")]
            self._route(method, path, body)
        except _HttpError as exc:
            self.linger = exc.close
            self._send(exc.status, [_error_body(str(exc))], close=exc.close)
        except UnknownModel as exc:
            self._send(404, [_error_body(str(exc))])
        except (BadRequest, UsageError) as exc:
            self._send(400, [_error_body(str(exc))])
        except ModelError as exc:
            self._send(500, [_error_body(str(exc))])
        except OSError as exc:  # the client went away or stalled past idle_timeout mid-request
            log.debug("inference API: %s %s: %s", method, self.path[:200], exc)
            self.close_connection = True
        except Exception:
            log.exception("internal error serving %s %s", method, self.path[:200])
            self._send(500, [_error_body("internal server error")], close=True)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # --- the protocol ------------------------------------------------------------------

    def _json(self, doc: Any, status: int = 200) -> None:
        self._send(status, [json.dumps(doc, separators=(",", ":")).encode()])

    def _route(self, method: str, path: list[str], body: bytes) -> None:
        host = self.server.host
        if path[:1] != ["v2"]:
            raise _HttpError(404, f"no such path: {self.path[:200]}")
        rest = path[1:]
        if rest[:1] == ["models"] and len(rest) >= 2:
            name, tail, version = rest[1], rest[2:], None
            if tail[:1] == ["versions"] and len(tail) >= 2:
                version, tail = tail[1], tail[2:]
            if tail == ["infer"]:
                self._need(method, "POST")
                return self._infer(name, version, body)
            info = host.info(name)
            if version is not None and version != info.version:
                raise UnknownModel(f"model {name!r} version {version!r} is not active here (serving {info.version})")
            if tail == []:
                self._need(method, "GET")
                return self._json(model_metadata(info))
            if tail == ["ready"]:
                self._need(method, "GET")
                return self._json({"name": name, "ready": info.ready})
        elif rest == []:
            self._need(method, "GET")
            return self._json({"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)})
        elif rest == ["health", "live"]:
            self._need(method, "GET")
            return self._json({"live": True})
        elif rest == ["health", "ready"]:
            self._need(method, "GET")
            models = host.models()
            ready = bool(models) and all(m.ready for m in models)
            return self._json({"ready": ready}, 200 if ready else 503)
        elif rest == ["repository", "index"]:
            self._need(method, "POST")
            return self._json([{"name": m.name, "version": m.version, "state": "READY" if m.ready else "UNAVAILABLE"}
                               for m in host.models()])
        raise _HttpError(404, f"no such path: {self.path[:200]}")

    @staticmethod
    def _need(method: str, allowed: str) -> None:
        if method != allowed:
            raise _HttpError(405, f"use {allowed} here")

    def _infer(self, name: str, version: str | None, body: bytes) -> None:
        host = self.server.host
        info = host.info(name)
        header = self.headers.get("Inference-Header-Content-Length")
        if header is not None and not header.strip().isdigit():
            raise BadRequest(f"invalid Inference-Header-Content-Length {header[:40]!r}")
        request = decode_request(body, None if header is None else int(header), info,
                                 max_json_bytes=self.server.limits.max_json_bytes)
        outputs, ran = host.call(name, request.inputs, version=version)
        if ran is not info and {o.name for o in ran.outputs} != {o.name for o in info.outputs}:
            raise ModelError(f"model {name!r} changed its outputs while this request ran; send it again")
        parts, json_length = encode_response(ran, outputs, request.outputs, request.id)
        extra = ""
        if json_length is not None:
            extra = f"Inference-Header-Content-Length: {json_length}\r\n"
        encoding = _accepted_encoding(self.headers.get("Accept-Encoding"))
        if encoding is not None:
            packer = zlib.compressobj(1, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
            parts = [packer.compress(b"".join(parts)) + packer.flush()]
            extra += f"Content-Encoding: {encoding}\r\n"
        self._send(200, parts, extra=extra,
                   content_type="application/json" if json_length is None else "application/octet-stream")


def _accepted_encoding(header: str | None) -> str | None:
    """gzip or deflate when the client asks for it by name (tritonclient's response_compression_algorithm)."""
    if not header:
        return None
    offered = {p.split(";")[0].strip().lower() for p in header.split(",")}
    return next((e for e in ("gzip", "deflate") if e in offered), None)


class _ServerMixin(socketserver.ThreadingMixIn):
    daemon_threads = True
    host: ModelHost
    limits: ServeLimits
    tcp: bool

    def setup_mixin(self, host: ModelHost, limits: ServeLimits, tcp: bool) -> None:
        self.host, self.limits, self.tcp = host, limits, tcp
        self._conns: set[socket.socket] = set()
        self._conns_cv = threading.Condition()

    def register(self, conn: socket.socket) -> bool:
        with self._conns_cv:
            self._conns.add(conn)
            return len(self._conns) <= self.limits.max_connections

    def unregister(self, conn: socket.socket) -> None:
        with self._conns_cv:
            self._conns.discard(conn)
            self._conns_cv.notify_all()

    def close_connections(self, timeout: float) -> bool:
        with self._conns_cv:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return self._conns_cv.wait_for(lambda: not self._conns, timeout)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("error on an inference API connection")


class _TcpServer(_ServerMixin, ThreadingHTTPServer):
    def server_bind(self) -> None:  # HTTPServer.server_bind would resolve the host name (getfqdn): slow
        socketserver.TCPServer.server_bind(self)


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class _UnixServer(_ServerMixin, socketserver.UnixStreamServer):
    pass


class InferenceServer:
    """The inference API over ``model_host``: TCP on ``host:port`` (port 0 = pick a free one), or ``unix_socket``.

    Serves from its own threads (one accepting, one per connection) from :meth:`start` to :meth:`stop`.
    """

    def __init__(self, model_host: ModelHost, *, host: str = "127.0.0.1", port: int = 0,
                 unix_socket: Path | None = None, limits: ServeLimits = ServeLimits()) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise UsageError(f"invalid port {port!r}")
        self._host = model_host
        self._bind, self._port = host, port
        self._unix = Path(unix_socket) if unix_socket else None
        self._limits = limits
        self._server: _TcpServer | _UnixServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int] | Path:
        if self._server is None:
            raise UsageError("the inference server is not started")
        if self._unix is not None:
            return self._unix
        host, port = self._server.server_address[:2]  # type: ignore[index, str-unpack]
        return str(host), int(port)

    @property
    def url(self) -> str:
        address = self.address
        if isinstance(address, Path):
            return f"unix:{address}"
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        return f"http://{host}:{address[1]}"

    def start(self) -> InferenceServer:
        if self._server is not None:
            return self
        try:
            if self._unix is not None:
                _clear_stale_socket(self._unix)
                server: _TcpServer | _UnixServer = _UnixServer(str(self._unix), _Handler)
                os.chmod(self._unix, 0o660)
            else:
                server = (_Tcp6Server if ":" in self._bind else _TcpServer)((self._bind, self._port), _Handler)
        except OSError as exc:
            where = self._unix or f"{self._bind}:{self._port}"
            raise UsageError(f"cannot serve the inference API on {where}: {exc.strerror or exc}") from None
        server.setup_mixin(self._host, self._limits, tcp=self._unix is None)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="edgeship-serve", daemon=True)
        self._thread.start()
        log.info("inference API on %s", self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every client connection, wait for their threads (up to ``timeout`` s)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if not server.close_connections(timeout):
            log.warning("inference API: connections still open after %.1f s", timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._unix is not None:
            self._unix.unlink(missing_ok=True)
        log.info("inference API stopped")

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _clear_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: left over from a crash
        return
    finally:
        probe.close()
    raise UsageError(f"another process serves on {path}")


def write_address(state_dir: Path, server: InferenceServer) -> None:
    """Record where ``server`` listens (``state_dir/serve.json``) for ``edgeship-agent infer --config``."""
    write_atomic(Path(state_dir) / ADDRESS_FILE, json.dumps({"url": server.url}).encode())


# --- the client ---------------------------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    """A keep-alive client of the inference API: ``http://HOST:PORT`` or ``unix:/PATH``; JSON tensors."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url = url
        if url.startswith("unix:"):
            path = url[len("unix:"):]
            path = path[2:] if path.startswith("//") else path
            self._conn: http.client.HTTPConnection = _UnixConnection(path, timeout)
        else:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise UsageError(f"invalid inference API URL {url!r}: expected http://HOST:PORT or unix:/PATH")
            self._conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)

    def close(self) -> None:
        self._conn.close()

    def request(self, method: str, path: str, doc: Any = None) -> Any:
        body = None if doc is None else json.dumps(doc).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        for attempt in (1, 2):
            reused = self._conn.sock is not None
            try:
                self._conn.request(method, path, body=body, headers=headers)
                response = self._conn.getresponse()
                data = response.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                self._conn.close()
                # a kept-alive connection the server closed meanwhile (idle timeout): ask once more
                if not (reused and attempt == 1 and isinstance(exc, (ConnectionError, http.client.RemoteDisconnected))):
                    raise LinkError(f"cannot reach the agent's inference API at {self.url}: {exc}") from None
        try:
            reply = json.loads(data) if data else None
        except ValueError:
            raise BadData(f"the agent answered {response.status} with a body that is not JSON") from None
        if response.status >= 400:
            message = reply.get("error") if isinstance(reply, dict) else None
            text = f"{message or response.reason} (HTTP {response.status})"
            raise (UsageError if response.status < 500 else ModelError)(text)
        return reply

    def metadata(self, model: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v2/models/{quote(model)}"))

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], *, version: str | None = None,
              classes: Mapping[str, int] | None = None) -> dict[str, Any]:
        """The server's JSON reply; ``classes`` asks for the top-k classes of the named outputs."""
        for name, value in inputs.items():
            if value.dtype.name not in DATATYPES:
                raise UsageError(f"input {name!r}: arrays of {value.dtype} cannot be sent")
        doc: dict[str, Any] = {"inputs": [
            {"name": n, "datatype": DATATYPES[a.dtype.name], "shape": list(a.shape), "data": a.ravel().tolist()}
            for n, a in inputs.items()]}
        if classes:
            doc["outputs"] = [{"name": n, "parameters": {"classification": k}} for n, k in classes.items()]
        path = f"/v2/models/{quote(model)}" + (f"/versions/{quote(version)}" if version else "") + "/infer"
        return dict(self.request("POST", path, doc))


def _config_url(config_path: Path) -> str:
    from agent.settings import load_config

    config = load_config(config_path)
    serve = getattr(config, "serve", None)
    if serve is None:
        raise UsageError("this agent's configuration has no [serve] section: use --url")
    if getattr(serve, "unix_socket", None):
        return f"unix:{serve.unix_socket}"
    if serve.port:
        bind = "127.0.0.1" if serve.host in ("", "0.0.0.0") else ("::1" if serve.host == "::" else serve.host)
        return f"http://{'[' + bind + ']' if ':' in bind else bind}:{serve.port}"
    recorded = Path(config.state_dir) / ADDRESS_FILE
    try:
        return str(json.loads(recorded.read_text(encoding="utf-8"))["url"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"the agent serves on a port it picks (port = 0) and {recorded} does not say which: "
                         "is the agent running? or use --url") from None


def _load_inputs(specs: Sequence[str], metadata: Mapping[str, Any]) -> dict[str, np.ndarray]:
    model_inputs = {t["name"]: t for t in metadata.get("inputs", [])}
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep:
            name, file = "", spec
        try:
            loaded = np.load(Path(file), allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    found: dict[str, np.ndarray] | None = {k: loaded[k] for k in loaded.files}
            else:
                found, value = None, np.asarray(loaded)
        except (OSError, ValueError, EOFError) as exc:
            raise UsageError(f"cannot read input {file}: {exc}") from None
        if found is None:
            if not name:
                if len(model_inputs) != 1:
                    raise UsageError(f"the model takes inputs {list(model_inputs)}: use --input NAME={file}")
                name = next(iter(model_inputs))
            found = {name: value}
        elif name:
            raise UsageError(f"{file} is an .npz archive: pass it without NAME= (its arrays are named)")
        arrays.update(found)
    for name, value in arrays.items():
        want = model_inputs.get(name)
        if want is not None and want["datatype"] in NUMPY_TYPES:
            dtype = NUMPY_TYPES[want["datatype"]]
            if value.dtype != dtype and np.can_cast(value.dtype, dtype, casting="same_kind") and dtype.kind == "f":
                arrays[name] = value.astype(dtype)
    return arrays


@click.command("infer")
@click.argument("model")
@click.option("--url", default=None, help="The agent's inference API: http://HOST:PORT or unix:/PATH.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Agent configuration (TOML): use its [serve] section.")
@click.option("--input", "-i", "inputs", multiple=True, required=True, metavar="NAME=FILE.npy|FILE.npz",
              help="An input array (.npy); an .npz holds arrays by input name; NAME may be left out for a "
                   "one-input model. Repeatable.")
@click.option("--version", "model_version", default=None, help="Fail unless this version of MODEL serves.")
@click.option("--top", type=click.IntRange(0, 1000), default=0, show_default=True,
              help="Show the top K classes of each float output (with the bundle's labels).")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for the agent.")
@json_option
def infer(model: str, url: str | None, config_path: Path | None, inputs: tuple[str, ...], model_version: str | None,
          top: int, timeout: float, as_json: bool) -> None:
    """Run MODEL once on the running agent and print its outputs."""
    if (url is None) == (config_path is None):
        raise UsageError("give exactly one of --url and --config")
    client = Client(url if url is not None else _config_url(config_path), timeout=timeout)  # type: ignore[arg-type]
    try:
        metadata = client.metadata(model)
        arrays = _load_inputs(inputs, metadata)
        floats = [t["name"] for t in metadata.get("outputs", []) if str(t.get("datatype", "")).startswith("FP")]
        reply = client.infer(model, arrays, version=model_version,
                             classes={n: top for n in floats} if top else None)
    finally:
        client.close()
    if as_json:
        echo_json(reply)
        return
    click.echo(f"{reply.get('model_name')} {reply.get('model_version')}")
    for out in reply.get("outputs", []):
        shape, datatype = out.get("shape", []), out.get("datatype", "")
        click.echo(f"{out.get('name')}: {datatype} {shape}")
        if datatype == "BYTES":  # classification: "score:index[:label]"
            for text in out.get("data", []):
                score, _, rest = str(text).partition(":")
                index, _, label = rest.partition(":")
                click.echo(f"  {index:>5}  {score}  {label}")
            continue
        value = np.array(out.get("data", []), dtype=NUMPY_TYPES.get(datatype, np.float64)).reshape(shape)
        click.echo("  " + np.array2string(value, precision=4, threshold=64).replace("\n", "\n  "))
        if datatype.startswith("FP") and 1 <= value.ndim <= 2 and value.shape[-1] > 1:
            click.echo(f"  argmax: {np.argmax(value, axis=-1).tolist()}")
