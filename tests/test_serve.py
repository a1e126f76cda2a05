"""agent.serve: the Open Inference Protocol over real HTTP, spoken to by tritonclient, http.client and raw sockets."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from agent.errors import UsageError
from agent.host import ModelHost
from agent.serve import ADDRESS_FILE, Client, InferenceServer, ServeLimits, write_address
from tests import modelfactory as mf
from tests.test_host import X, activate, reference

LABELS = ["cat", "dog", "bird", "fish"]
LIMITS = ServeLimits(max_body_bytes=1 << 20, max_json_bytes=512 << 10, idle_timeout=10.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("serve-models")
    return {
        "onnx0": mf.onnx_mlp(d / "m0.onnx", seed=0),
        "onnx1": mf.onnx_mlp(d / "m1.onnx", seed=1),
        "tflite0": mf.tflite_mlp(d / "m0.tflite", seed=0),
        "nan": mf.onnx_nan_model(d / "nan.onnx"),
        "two_io": mf.onnx_two_io(d / "two.onnx"),
    }


@pytest.fixture(scope="module")
def host(models: dict[str, Path]) -> Iterator[ModelHost]:
    h = ModelHost()
    activate(h, models["onnx0"], "onnx", labels=LABELS)
    activate(h, models["tflite0"], "tflite", name="mlpt", version="2.0.0")
    activate(h, models["two_io"], "onnx", name="two")
    activate(h, models["nan"], "onnx", name="nan")
    yield h
    h.close(timeout=10)


@pytest.fixture(scope="module")
def server(host: ModelHost) -> Iterator[InferenceServer]:
    with InferenceServer(host, limits=LIMITS) as s:
        yield s


@pytest.fixture
def client(server: InferenceServer) -> Iterator[triton.InferenceServerClient]:
    host, port = server.address  # type: ignore[misc]
    c = triton.InferenceServerClient(f"{host}:{port}")
    yield c
    c.close()


def tensor(name: str, value: np.ndarray, binary: bool = True) -> triton.InferInput:
    datatype = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}[value.dtype.name]
    return triton.InferInput(name, list(value.shape), datatype).set_data_from_numpy(value, binary_data=binary)


def post(server: InferenceServer, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
         method: str = "POST") -> tuple[int, Any, http.client.HTTPResponse]:
    host, port = server.address  # type: ignore[misc]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    return response.status, (json.loads(data) if data else None), response


def good_request_works(server: InferenceServer) -> None:
    status, reply, _ = post(server, "/v2/models/mlp/infer", json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [5, 8], "data": X.ravel().tolist()}]}).encode())
    assert status == 200, reply
    np.testing.assert_allclose(np.array(reply["outputs"][0]["data"]).reshape(5, 4), reference(0), rtol=1e-5, atol=1e-6)


# --- tritonclient, unchanged ---------------------------------------------------------------------


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "edgeship-agent" and "binary_tensor_data" in meta["extensions"]
    assert client.get_model_metadata("mlp") == {
        "name": "mlp", "versions": ["1.0.0"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 4]}]}
    assert client.get_model_metadata("mlpt", model_version="2.0.0")["platform"] == "tflite"
    two = client.get_model_metadata("two")
    assert [(t["name"], t["datatype"], t["shape"]) for t in two["inputs"]] == [("a", "FP32", [-1, 3]), ("b", "INT64", [3])]
    assert client.is_model_ready("mlp") and client.is_model_ready("mlpt", "2.0.0")
    assert not client.is_model_ready("nope") and not client.is_model_ready("mlp", "9.9.9")
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("nope")
    assert missing.value.status() == "404" and "'nope' is not active" in missing.value.message()
    index = client.get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} == {
        ("mlp", "1.0.0", "READY"), ("mlpt", "2.0.0", "READY"), ("two", "1.0.0", "READY"), ("nan", "1.0.0", "READY")}


@pytest.mark.parametrize("model", ["mlp", "mlpt"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_onnx_and_tflite(client: triton.InferenceServerClient, model: str, binary: bool) -> None:
    outputs = None if binary else [triton.InferRequestedOutput("probs", binary_data=False)]
    result = client.infer(model, [tensor("x", X, binary)], outputs=outputs, request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("probs"), reference(0), rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response["model_name"] == model and response["id"] == "r-1"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary


def test_infer_mixed_dtypes_and_versions(client: triton.InferenceServerClient) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([10, 0, -10], dtype=np.int64)
    for binary in (True, False):
        result = client.infer("two", [tensor("a", a, binary), tensor("b", b, not binary)], model_version="1.0.0",
                              outputs=[triton.InferRequestedOutput("argmax", binary_data=binary)])
        assert result.as_numpy("argmax").tolist() == [0, 0] and result.as_numpy("sum") is None
    with pytest.raises(InferenceServerException) as stale:
        client.infer("two", [tensor("a", a), tensor("b", b)], model_version="0.9.0")
    assert stale.value.status() == "404"


def test_classification_with_labels(client: triton.InferenceServerClient) -> None:
    for binary in (True, False):
        result = client.infer("mlp", [tensor("x", X[:2])],
                              outputs=[triton.InferRequestedOutput("probs", binary_data=binary, class_count=2)])
        top = result.as_numpy("probs")
        assert top.shape == (2, 2)
        expected = reference(0, X[:2])
        for row, probs in zip(top, expected):
            order = np.argsort(-probs)[:2]
            cells = [(c.decode() if isinstance(c, bytes) else c).split(":") for c in row]
            assert [int(c[1]) for c in cells] == order.tolist()
            assert [c[2] for c in cells] == [LABELS[i] for i in order]
            np.testing.assert_allclose([float(c[0]) for c in cells], probs[order], atol=1e-5)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_responses(client: triton.InferenceServerClient, algorithm: str) -> None:
    result = client.infer("mlp", [tensor("x", X)], request_compression_algorithm=algorithm,
                          response_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("probs"), reference(0), rtol=1e-5, atol=1e-6)


def test_request_errors_through_tritonclient(client: triton.InferenceServerClient) -> None:
    cases = [
        ("nope", [tensor("x", X)], None, "404", "'nope' is not active"),
        ("mlp", [tensor("x", X[:, :7].copy())], None, "400", "shape [5, 7] does not match"),
        ("mlp", [tensor("x", X.astype(np.float64))], None, "400", "datatype 'FP64' does not match the model's FP32"),
        ("mlp", [tensor("y", X)], None, "400", "unknown input 'y'"),
        ("mlp", [tensor("x", X)], [triton.InferRequestedOutput("nope")], "400", "unknown output 'nope'"),
        ("mlp", [tensor("x", np.zeros((40000, 8), np.float32))], None, "413", "exceeds the limit of 1048576"),
    ]
    for model, inputs, outputs, status, message in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer(model, inputs, outputs=outputs)
        assert err.value.status() == status and message in err.value.message(), err.value
    assert client.infer("mlp", [tensor("x", X)]).as_numpy("probs").shape == (5, 4)


def test_nonfinite_outputs_are_served_and_counted(client: triton.InferenceServerClient, host: ModelHost) -> None:
    before = host.watch_counters("nan").nonfinite
    x = np.ones((2, 4), np.float32)
    assert np.isnan(client.infer("nan", [tensor("x", x)]).as_numpy("y")).all()
    as_json = client.infer("nan", [tensor("x", x, False)], outputs=[triton.InferRequestedOutput("y", binary_data=False)])
    assert np.isnan(as_json.as_numpy("y")).all()
    assert host.watch_counters("nan").nonfinite == before + 2


# --- bad input, raw ------------------------------------------------------------------------------


def _binary_request(header: dict[str, Any], blob: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


def _x(**params: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [5, 8], "parameters": params}]}


BAD_REQUESTS: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("not json", b"{nope", {}, 400, "not valid JSON"),
    ("not utf-8", b"\xff\xfe\x00{", {}, 400, "not valid JSON"),
    ("json array", b"[1, 2]", {}, 400, "must be a JSON object"),
    ("no inputs", b"{}", {}, 400, "'inputs' must be a non-empty list"),
    ("deep nesting", b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ' + b"[" * 100000
     + b"]" * 100000 + b"}]}", {}, 400, ""),
    ("ragged data", json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 8],
                                            "data": [[1] * 8, [1] * 7]}]}).encode(), {}, 400, "not a regular array"),
    ("strings as data", json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8],
                                                "data": ["1"] * 8}]}).encode(), {}, 400, "holds <U1 values"),
    ("too few values", json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [5, 8],
                                               "data": [1.0] * 39}]}).encode(), {}, 400, "39 value(s)"),
    ("negative dim", json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-5, 8],
                                             "data": []}]}).encode(), {}, 400, "non-negative integer"),
    ("no data", json.dumps(_x()).encode(), {}, 400, "neither 'data' nor binary_data_size"),
    ("header longer than body", *_binary_request(_x(binary_data_size=160), b"\0" * 160)[:1],
     {"Inference-Header-Content-Length": "100000"}, 400, "exceeds the body"),
    ("header length not a number", b"{}", {"Inference-Header-Content-Length": "12abc"}, 400,
     "invalid Inference-Header-Content-Length"),
    ("negative binary size", *_binary_request(_x(binary_data_size=-160), b"\0" * 160), 400, "non-negative integer"),
    ("binary size a string", *_binary_request(_x(binary_data_size="160"), b"\0" * 160), 400, "non-negative integer"),
    ("binary size a bool", *_binary_request(_x(binary_data_size=True), b"\0" * 160), 400, "non-negative integer"),
    ("binary size huge", *_binary_request(_x(binary_data_size=2**80), b"\0" * 160), 400, "does not fit shape"),
    ("binary size != shape", *_binary_request(_x(binary_data_size=156), b"\0" * 156), 400, "does not fit shape"),
    ("binary past the body", *_binary_request(_x(binary_data_size=160), b"\0" * 100), 400, "past the request body"),
    ("bytes after the last input", *_binary_request(_x(binary_data_size=160), b"\0" * 170), 400, "10 byte(s)"),
    ("unsupported encoding", b"{}", {"Content-Encoding": "br"}, 415, "not supported"),
    ("corrupt gzip", b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}, 400, "cannot decode"),
    ("truncated gzip", gzip.compress(b"{}" * 1000)[:-12], {"Content-Encoding": "gzip"}, 400, "truncated"),
    ("gzip with trailing data", gzip.compress(b"{}") + b"junk", {"Content-Encoding": "gzip"}, 400, "trailing data"),
    ("gzip bomb", gzip.compress(b" " * (4 << 20)), {"Content-Encoding": "gzip"}, 413, "exceeds the limit"),
]


@pytest.mark.parametrize("name,body,headers,status,message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_an_error_and_the_server_keeps_serving(server: InferenceServer, name: str, body: bytes,
                                                                headers: dict[str, str], status: int,
                                                                message: str) -> None:
    got, reply, response = post(server, "/v2/models/mlp/infer", body, headers)
    assert got == status, reply
    assert response.getheader("Content-Type") == "application/json"
    assert isinstance(reply, dict) and list(reply) == ["error"] and message in reply["error"]
    good_request_works(server)


def test_http_level_errors(server: InferenceServer) -> None:
    assert post(server, "/v2/models/mlp/nothing", method="GET")[:1] == (404,)
    assert post(server, "/v3", method="GET")[:1] == (404,)
    assert post(server, "/v2/models/mlp/infer", method="GET")[:1] == (405,)
    assert post(server, "/v2/models/mlp", method="POST")[:1] == (405,)
    status, reply, response = post(server, "/v2/models/mlp", method="PUT")
    assert status == 501 and "error" in reply and response.getheader("Connection") == "close"
    status, reply, response = post(server, "/v2/models/mlp/infer", b"x" * ((1 << 20) + 1))
    assert status == 413 and "exceeds the limit" in reply["error"] and response.getheader("Connection") == "close"
    host, port = server.address  # type: ignore[misc]
    raw_cases = [
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET /v2 HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"GET /v2 HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n", 431),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS hello
    ]
    for raw, status in raw_cases:
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(raw)
            reply = b""
            while chunk := sock.recv(65536):  # the server closes the connection after each of these
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), (raw[:60], head)
        assert "error" in json.loads(body)
    good_request_works(server)


def test_keep_alive_serves_many_requests_on_one_connection(server: InferenceServer) -> None:
    host, port = server.address  # type: ignore[misc]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    head = json.dumps(_x(binary_data_size=160)).encode()
    try:
        for i in range(50):
            conn.request("POST", "/v2/models/mlp/infer", body=head + X.tobytes(),
                         headers={"Inference-Header-Content-Length": str(len(head))})
            if i == 0:
                sock = conn.sock
            response = conn.getresponse()
            assert response.status == 200
            data = response.read()
            assert conn.sock is sock  # the same TCP connection throughout
        reply = json.loads(data)
        np.testing.assert_allclose(np.array(reply["outputs"][0]["data"]).reshape(5, 4), reference(0), rtol=1e-5,
                                   atol=1e-6)
        conn.request("GET", "/v2/models/nope")  # an error does not close a keep-alive connection
        assert conn.getresponse().status == 404 and conn.sock is sock
    finally:
        conn.close()


def test_swaps_under_http_load(models: dict[str, Path]) -> None:
    """Keep-alive clients hammer infer while the model is swapped: no failed request, no mixed reply."""
    host = ModelHost()
    refs = {"1.0.0": reference(0), "1.1.0": reference(1)}
    activate(host, models["onnx0"], "onnx")
    failures: list[Any] = []
    seen = {"1.0.0": 0, "1.1.0": 0}
    stop = threading.Event()
    with InferenceServer(host) as server:
        url = server.url

        def hammer() -> None:
            client = Client(url)
            try:
                while not stop.is_set():
                    reply = client.infer("mlp", {"x": X})
                    got = np.array(reply["outputs"][0]["data"]).reshape(5, 4)
                    np.testing.assert_allclose(got, refs[reply["model_version"]], rtol=1e-5, atol=1e-6)
                    seen[reply["model_version"]] += 1
            except BaseException as exc:  # noqa: BLE001
                failures.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        for i in range(20):
            version = "1.1.0" if i % 2 == 0 else "1.0.0"
            activate(host, models["onnx1" if version == "1.1.0" else "onnx0"], "onnx", version=version)
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    host.close(timeout=10)
    assert failures == [] and seen["1.0.0"] > 0 and seen["1.1.0"] > 0


def test_connection_limit_and_stop_closes_idle_connections(host: ModelHost) -> None:
    server = InferenceServer(host, limits=ServeLimits(max_connections=2)).start()
    address = server.address
    held = [socket.create_connection(address, timeout=10) for _ in range(2)]  # type: ignore[arg-type]
    for sock in held:  # make sure both are registered before the third
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    with socket.create_connection(address, timeout=10) as third:  # type: ignore[arg-type]
        assert third.recv(65536).startswith(b"HTTP/1.1 503 ")
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3
    for sock in held:  # the idle keep-alive connections were closed by stop()
        assert sock.recv(65536) == b""
        sock.close()
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=2)  # type: ignore[arg-type]


def test_ready_only_with_a_model(models: dict[str, Path]) -> None:
    empty = ModelHost()
    with InferenceServer(empty) as server:
        assert post(server, "/v2/health/ready", method="GET")[:2] == (503, {"ready": False})
        assert post(server, "/v2/health/live", method="GET")[:2] == (200, {"live": True})
        activate(empty, models["onnx0"], "onnx")
        assert post(server, "/v2/health/ready", method="GET")[:2] == (200, {"ready": True})
    empty.close()


# --- Unix socket ---------------------------------------------------------------------------------


def test_unix_socket(tmp_path: Path, host: ModelHost) -> None:
    path = tmp_path / "agent.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # left behind by a crashed agent: nobody listens
    stale.close()
    with InferenceServer(host, unix_socket=path) as server:
        assert server.url == f"unix:{path}" and path.is_socket()
        with pytest.raises(UsageError, match="another process serves"):
            InferenceServer(host, unix_socket=path).start()
        client = Client(server.url)
        try:
            assert client.metadata("mlpt")["versions"] == ["2.0.0"]
            reply = client.infer("mlpt", {"x": X})
            np.testing.assert_allclose(np.array(reply["outputs"][0]["data"]).reshape(5, 4), reference(0),
                                       rtol=1e-5, atol=1e-6)
        finally:
            client.close()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(UsageError, match="is not a socket"):
        InferenceServer(host, unix_socket=path).start()


def test_address_file(tmp_path: Path, server: InferenceServer) -> None:
    write_address(tmp_path, server)
    assert json.loads((tmp_path / ADDRESS_FILE).read_text()) == {"url": server.url}


# --- the CLI -------------------------------------------------------------------------------------

CLI = ("import click, sys; from agent.cliutil import run_cli; from agent.serve import infer; "
       "group = click.Group('edgeship-agent'); group.add_command(infer); run_cli(group, 'edgeship-agent')")


def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``edgeship-agent infer ...`` as the lead will register it: a real process, the real error handler."""
    return subprocess.run([sys.executable, "-c", CLI, "infer", *args], capture_output=True, text=True, timeout=120)


def test_infer_cli(tmp_path: Path, server: InferenceServer) -> None:
    np.save(tmp_path / "x.npy", X.astype(np.float64))  # float64 on disk: cast to the model's FP32
    np.savez(tmp_path / "ab.npz", a=np.ones((1, 3), np.float32), b=np.array([0, 5, 0], np.int64))
    proc = agent_cli("mlp", "--url", server.url, "--input", f"x={tmp_path / 'x.npy'}", "--json")
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    np.testing.assert_allclose(np.array(reply["outputs"][0]["data"]).reshape(5, 4), reference(0), rtol=1e-5, atol=1e-6)
    proc = agent_cli("mlp", "--url", server.url, "-i", str(tmp_path / "x.npy"))  # NAME= left out: one input
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("mlp 1.0.0\nprobs: FP32 [5, 4]\n")
    assert f"argmax: {np.argmax(reference(0), axis=-1).tolist()}" in proc.stdout
    proc = agent_cli("mlp", "--url", server.url, "-i", str(tmp_path / "x.npy"), "--top", "1")
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[-1] for line in proc.stdout.splitlines()[2:]] == [
        LABELS[i] for i in np.argmax(reference(0), axis=-1)]
    proc = agent_cli("two", "--url", server.url, "-i", str(tmp_path / "ab.npz"), "--version", "1.0.0")
    assert proc.returncode == 0, proc.stderr
    assert "argmax: INT64 [1]\n  [1]" in proc.stdout


@pytest.mark.parametrize("args,code,phrase", [
    (["nope", "-i", "x.npy"], 2, "'nope' is not active here (HTTP 404)"),
    (["mlp", "-i", "x=missing.npy"], 2, "cannot read input"),
    (["two", "-i", "x.npy"], 2, "the model takes inputs ['a', 'b']: use --input NAME="),
    (["mlp", "-i", "x=x7.npy"], 2, "shape [5, 7] does not match"),
    (["mlp", "-i", "x.npy", "--version", "3.0.0"], 2, "HTTP 404"),
])
def test_infer_cli_errors(tmp_path: Path, server: InferenceServer, args: list[str], code: int, phrase: str) -> None:
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "x7.npy", X[:, :7].copy())
    args = [a.replace("x.npy", str(tmp_path / "x.npy")).replace("x7.npy", str(tmp_path / "x7.npy"))
            .replace("missing.npy", str(tmp_path / "missing.npy")) for a in args]
    proc = agent_cli(*args, "--url", server.url)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and phrase in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_infer_cli_unreachable_and_unix(tmp_path: Path, host: ModelHost) -> None:
    np.save(tmp_path / "x.npy", X)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    proc = agent_cli("mlp", "--url", f"http://127.0.0.1:{port}", "-i", str(tmp_path / "x.npy"))
    assert proc.returncode == 3 and "cannot reach the agent's inference API" in proc.stderr
    proc = agent_cli("mlp", "-i", str(tmp_path / "x.npy"))
    assert proc.returncode == 2 and "exactly one of --url and --config" in proc.stderr
    with InferenceServer(host, unix_socket=tmp_path / "a.sock") as server:
        proc = agent_cli("mlpt", "--url", server.url, "-i", f"x={tmp_path / 'x.npy'}")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("mlpt 2.0.0\n")


def test_gzip_request_by_hand(server: InferenceServer) -> None:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [5, 8], "data": X.ravel().tolist()}]})
    status, reply, _ = post(server, "/v2/models/mlp/infer", zlib.compress(body.encode()),
                            {"Content-Encoding": "deflate"})
    assert status == 200 and reply["model_version"] == "1.0.0"


def test_idle_connections_time_out_and_the_client_reconnects(host: ModelHost) -> None:
    with InferenceServer(host, limits=ServeLimits(idle_timeout=0.3)) as server:
        client = Client(server.url)
        try:
            assert client.metadata("mlp")["name"] == "mlp"
            time.sleep(0.8)  # the server closes the idle keep-alive connection
            assert client.infer("mlp", {"x": X})["model_version"] == "1.0.0"
        finally:
            client.close()


def test_infer_cli_finds_the_agent_through_its_config(tmp_path: Path, server: InferenceServer,
                                                      host: ModelHost) -> None:
    np.save(tmp_path / "x.npy", X)
    base = ('device_id = "dev1"\nstate_dir = "state"\nroot = "root.json"\nmodels = ["mlp"]\n'
            '[broker]\nurl = "mqtt://127.0.0.1:1883"\n')
    (tmp_path / "state").mkdir()
    picked = tmp_path / "picked.toml"
    picked.write_text(base + "[serve]\nport = 0\n")
    proc = agent_cli("mlp", "--config", str(picked), "-i", str(tmp_path / "x.npy"))
    assert proc.returncode == 2 and "is the agent running?" in proc.stderr
    write_address(tmp_path / "state", server)  # what the agent does once it listens
    proc = agent_cli("mlp", "--config", str(picked), "-i", str(tmp_path / "x.npy"))
    assert proc.returncode == 0 and proc.stdout.startswith("mlp 1.0.0\n"), proc.stderr
    fixed = tmp_path / "fixed.toml"
    fixed.write_text(base + f'[serve]\nhost = "0.0.0.0"\nport = {server.address[1]}\n')  # type: ignore[index]
    proc = agent_cli("mlp", "--config", str(fixed), "-i", str(tmp_path / "x.npy"))
    assert proc.returncode == 0 and proc.stdout.startswith("mlp 1.0.0\n"), proc.stderr
    with InferenceServer(host, unix_socket=tmp_path / "agent.sock"):
        unix = tmp_path / "unix.toml"
        unix.write_text(base + '[serve]\nunix_socket = "agent.sock"\n')  # relative to the config file
        proc = agent_cli("mlp", "--config", str(unix), "-i", str(tmp_path / "x.npy"))
        assert proc.returncode == 0 and proc.stdout.startswith("mlp 1.0.0\n"), proc.stderr
