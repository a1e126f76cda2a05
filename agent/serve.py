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

The wire format lives in :mod:`agent.oip`; the client side (:class:`Client` and the
``edgeship-agent infer`` command) in :mod:`agent.serve_client`, both re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import stat
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote


from agent import __version__
from agent.config import MiB
from agent.errors import ModelError, UsageError
from agent.fsutil import write_atomic
from agent.host import BadRequest, ModelHost, UnknownModel
from agent.oip import (
    ADDRESS_FILE, EXTENSIONS, SERVER_NAME, ServeLimits, _HttpError, decode_request, encode_response, model_metadata,
)

log = logging.getLogger(__name__)

__all__ = ["ADDRESS_FILE", "Client", "InferenceServer", "ServeLimits", "decode_request", "encode_response",
           "infer", "write_address"]

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



from agent.serve_client import Client, infer  # noqa: E402 - re-exported for callers of agent.serve
