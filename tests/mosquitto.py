"""Real Mosquitto brokers for tests: a generated config on a free loopback port, started and
stopped by pid, and a throwaway PKI (CA, server, one client certificate per identity).

Nothing here talks to anything but 127.0.0.1.

    from tests.mosquitto import broker, broker_module, make_pki, start_broker  # fixtures too

    def test_x(broker: Broker) -> None:
        client.connect(broker.host, broker.port)

Fixtures must be imported into the test module (or into tests/conftest.py) to be found.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "127.0.0.1"

# Broker limits written into every generated config.
# Blocks are at most 1 MiB of payload plus a small header, so 2 MiB leaves room for the
# MQTT fixed header, topic and properties. max_packet_size disconnects an oversized sender
# (and MQTT 5 clients are told the limit in CONNACK); message_size_limit is deliberately not
# used: it drops oversized messages silently for MQTT 3.1.1 publishers.
MAX_PACKET_SIZE = 2 * 1024 * 1024
# max_queued_messages 0 = unlimited: the default (1000) silently drops queued QoS 1/2
# messages past the limit (it truncated a 2048-chunk retained set). memory_limit bounds the
# broker instead; past it, the broker drops the message and disconnects the client.
MEMORY_LIMIT = 512 * 1024 * 1024
MAX_INFLIGHT_MESSAGES = 64

START_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0
LOG_TAIL_LINES = 30

MOSQUITTO_FALLBACK = Path("/usr/sbin/mosquitto")


class BrokerStartError(RuntimeError):
    """Mosquitto did not start accepting connections in time (the message has the log tail)."""


# --------------------------------------------------------------------------------------------
# PKI


@dataclass(frozen=True, kw_only=True)
class ClientCert:
    name: str
    cert: Path
    key: Path


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost, and client certificates by CN."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: Mapping[str, ClientCert]

    def client(self, name: str) -> ClientCert:
        try:
            return self.clients[name]
        except KeyError:
            raise KeyError(f"no client certificate for {name!r}; have {sorted(self.clients)}") from None

    def client_context(self, name: str | None) -> ssl.SSLContext:
        """A client-side context that trusts this CA and checks the server name; with `name`,
        it presents that identity's certificate (None: no client certificate)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_cert))
        if name is not None:
            c = self.client(name)
            ctx.load_cert_chain(certfile=str(c.cert), keyfile=str(c.key))
        return ctx


def make_pki(
    directory: Path,
    *,
    devices: Sequence[str],
    extra_users: Sequence[str] = ("edgeship-server", "edgeship-fleet"),
    ca_name: str = "edgeship-test-ca",
    validity: dt.timedelta = dt.timedelta(days=1),
) -> TlsFiles:
    """Generate a CA, a server certificate and one client certificate per identity (its CN),
    all EC P-256, valid from 5 minutes ago for `validity`. Takes a few milliseconds."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - dt.timedelta(minutes=5), now + validity

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)

    def leaf(cn: str, *, server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(aki, critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
                ),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256()), key

    ca_cert_path = _write_cert(directory / "ca.crt", ca_cert)
    ca_key_path = _write_key(directory / "ca.key", ca_key)
    server_cert, server_key = leaf("localhost", server=True)
    server_cert_path = _write_cert(directory / "server.crt", server_cert)
    server_key_path = _write_key(directory / "server.key", server_key)

    clients: dict[str, ClientCert] = {}
    for name in (*devices, *extra_users):
        if name in clients:
            raise ValueError(f"duplicate identity {name!r}")
        cert, key = leaf(name, server=False)
        clients[name] = ClientCert(
            name=name,
            cert=_write_cert(directory / f"{name}.crt", cert),
            key=_write_key(directory / f"{name}.key", key),
        )
    return TlsFiles(
        ca_cert=ca_cert_path,
        ca_key=ca_key_path,
        server_cert=server_cert_path,
        server_key=server_key_path,
        clients=clients,
    )


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return path


# --------------------------------------------------------------------------------------------
# Broker


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (start_broker retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def mosquitto_path() -> str:
    """The mosquitto binary; skips the test when it is missing, unless CI is set (then fails)."""
    found = shutil.which("mosquitto") or (str(MOSQUITTO_FALLBACK) if MOSQUITTO_FALLBACK.exists() else None)
    if found is None:
        msg = "mosquitto not found (install the Debian/Ubuntu package 'mosquitto')"
        if os.environ.get("CI"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return found


@dataclass(kw_only=True)
class Broker:
    """A running Mosquitto on 127.0.0.1. Not frozen: restart() changes the pid."""

    host: str
    port: int
    pid: int
    config_path: Path
    log_path: Path
    tls: TlsFiles | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    _out_path: Path | None = field(default=None, repr=False, compare=False)

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls is not None else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if it does not exit. Idempotent."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL (a crash: no persistence snapshot is written). Idempotent."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(self.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop if running, start again on the same port with the same config, wait until it
        accepts connections."""
        self.stop()
        assert self._out_path is not None
        proc = _launch(self.config_path, self._out_path)
        try:
            _wait_ready(proc, self.port, self.log_path, self._out_path)
        except BrokerStartError:
            _reap(proc)
            raise
        self._proc, self.pid = proc, proc.pid

    def log_text(self) -> str:
        """The broker log so far (for assertions about why a client was refused)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def start_broker(
    workdir: Path,
    *,
    tls: TlsFiles | None = None,
    acl: Path | None = None,
    extra: str = "",
    persistence: bool = False,
) -> Broker:
    """Write a config into `workdir`, start Mosquitto on a free port of 127.0.0.1, return when
    it accepts TCP connections (or raise BrokerStartError with the log tail).

    With `tls`, the only listener is TLS with a required client certificate whose CN becomes
    the username (`use_identity_as_username`). Anonymous clients are allowed unless both `tls`
    and `acl` are given. `extra` is appended verbatim; for a repeated option the last value
    wins, so `extra` can override the defaults (e.g. "set_tcp_nodelay false").
    `persistence=True` keeps mosquitto.db in `workdir` across restart()."""
    log_path = workdir / "mosquitto.log"
    return start_broker_from(
        workdir,
        lambda port: _config_text(
            port, log_path, workdir, tls=tls, acl=acl, extra=extra, persistence=persistence
        ),
        tls=tls,
        log_path=log_path,
    )


def start_broker_from(
    workdir: Path,
    render: Callable[[int], str],
    *,
    tls: TlsFiles | None = None,
    log_path: Path | None = None,
) -> Broker:
    """Start Mosquitto with the config `render(port)` (written to workdir/mosquitto.conf) for a
    free port; for configs that start_broker() does not write (e.g. the shipped example).
    The config must listen on 127.0.0.1:port and should log to `log_path` (default
    workdir/mosquitto.log) so that failures can show the log."""
    binary = mosquitto_path()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "mosquitto.conf"
    log_path = log_path or workdir / "mosquitto.log"
    out_path = workdir / "mosquitto.out"
    last_error: BrokerStartError | None = None
    for _attempt in range(3):
        port = free_port()
        config_path.write_text(render(port))
        proc = _launch(config_path, out_path, binary)
        try:
            _wait_ready(proc, port, log_path, out_path)
        except BrokerStartError as exc:
            _reap(proc)
            last_error = exc
            if "Address already in use" in str(exc):
                continue  # another process took the port between free_port() and bind()
            raise
        return Broker(
            host=HOST, port=port, pid=proc.pid, config_path=config_path, log_path=log_path,
            tls=tls, _proc=proc, _out_path=out_path,
        )
    assert last_error is not None
    raise last_error


def _config_text(
    port: int,
    log_path: Path,
    workdir: Path,
    *,
    tls: TlsFiles | None,
    acl: Path | None,
    extra: str,
    persistence: bool,
) -> str:
    lines = ["# generated by tests/mosquitto.py"]
    if os.geteuid() == 0:
        lines.append("user root")  # otherwise Mosquitto drops to 'mosquitto' and cannot read tmp files
    lines += [
        f"listener {port} {HOST}",
    ]
    if tls is not None:  # listener options: must follow the listener line
        lines += [
            f"cafile {tls.ca_cert}",
            f"certfile {tls.server_cert}",
            f"keyfile {tls.server_key}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
    lines += [
        f"allow_anonymous {'false' if tls is not None and acl is not None else 'true'}",
        f"persistence {'true' if persistence else 'false'}",
    ]
    if persistence:
        lines.append(f"persistence_location {workdir}/")
    if acl is not None:
        lines.append(f"acl_file {acl}")
    lines += [
        "set_tcp_nodelay true",
        "max_queued_messages 0",
        f"memory_limit {MEMORY_LIMIT}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        f"max_packet_size {MAX_PACKET_SIZE}",
        f"log_dest file {log_path}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %H:%M:%S",
    ]
    if extra:
        lines += ["# extra", extra]
    return "\n".join(lines) + "\n"


def _launch(config_path: Path, out_path: Path, binary: str | None = None) -> subprocess.Popen[bytes]:
    with open(out_path, "ab") as out:
        return subprocess.Popen(
            [binary or mosquitto_path(), "-c", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log_path: Path, out_path: Path) -> None:
    # A bare TCP connect is the readiness probe; on a TLS listener Mosquitto logs it as
    # "Client connection from 127.0.0.1 failed: ... unexpected eof while reading" (harmless).
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise BrokerStartError(
                f"mosquitto exited with {proc.returncode} before listening on {HOST}:{port}\n"
                + _tail(log_path, out_path)
            )
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                pass
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    f"mosquitto did not accept connections on {HOST}:{port} within {START_TIMEOUT} s\n"
                    + _tail(log_path, out_path)
                ) from None
            time.sleep(0.005)
            continue
        if proc.poll() is None:  # the listener is ours, not a process that raced us to the port
            return


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=STOP_TIMEOUT)


def _tail(*paths: Path) -> str:
    parts = []
    for p in paths:
        try:
            lines = p.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except FileNotFoundError:
            continue
        parts.append(f"--- {p.name}\n" + "\n".join(lines))
    return "\n".join(parts) or "(no log output)"


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A plain (no TLS, anonymous) broker for one test."""
    b = start_broker(tmp_path / "mosquitto")
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def broker_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A plain (no TLS, anonymous) broker shared by the tests of one module."""
    b = start_broker(tmp_path_factory.mktemp("mosquitto"))
    try:
        yield b
    finally:
        b.stop()


@contextlib.contextmanager
def amqtt_broker() -> Iterator[str]:
    """The demo's embedded broker (amqtt, MQTT 3.1.1 only) on a free 127.0.0.1 port; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "packager.demo_broker", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(b"ready"), line + proc.stdout.read(2000)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    """Signal a process we started, wait for it; SIGKILL it if it does not exit. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode
