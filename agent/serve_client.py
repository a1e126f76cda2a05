"""The client side of the local inference API: :class:`Client` (stdlib ``http.client``, TCP or
a Unix socket, JSON tensors) and the ``edgeship-agent infer`` command."""

from __future__ import annotations

import http.client
import json
import logging
import socket
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote, urlsplit

import click
import numpy as np

from agent.cliutil import echo_json, json_option
from agent.errors import BadData, LinkError, ModelError, UsageError
from agent.oip import ADDRESS_FILE, DATATYPES, NUMPY_TYPES

log = logging.getLogger(__name__)

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
