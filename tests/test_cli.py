"""The CLIs as users run them: real processes, exit codes, one-line errors, --json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import KeyPair

BIN = Path(sys.executable).parent


def run(prog: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(prog, path=str(BIN)) or prog
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, phrase: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    assert phrase in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_versions() -> None:
    assert run("edgeship", "--version").stdout.strip().endswith("0.1.0")
    assert run("edgeship-agent", "--version").stdout.strip().endswith("0.1.0")


def test_keys_generate_build_verify_inspect(tmp_path: Path, mlp_onnx: Path) -> None:
    gen = run("edgeship", "keys", "generate", "--out", str(tmp_path / "k"), "--json")
    assert gen.returncode == 0, gen.stderr
    key = json.loads(gen.stdout)
    assert (os.stat(key["private_key"]).st_mode & 0o777) == 0o600
    out = tmp_path / "mlp-2.0.0.edge"
    b = run("edgeship", "build", str(mlp_onnx), "--name", "mlp", "--version", "2.0.0", "--key", key["private_key"],
            "-o", str(out), "--json")
    assert b.returncode == 0, b.stderr
    built = json.loads(b.stdout)
    assert built["signer"] == key["key_id"] and out.is_file()
    assert {f["name"] for f in built["signed_files"]} == {"manifest.json", "model.onnx", "selftest.npz"}
    v = run("edgeship", "verify", str(out), "--key", key["public_key"])
    assert v.returncode == 0 and "OK" in v.stdout, v.stderr
    i = run("edgeship", "inspect", str(out), "--json")
    desc = json.loads(i.stdout)
    assert desc["verified"] is False and desc["signer"] == key["key_id"] and desc["version"] == "2.0.0"
    a = run("edgeship-agent", "verify", str(out), "--key", key["public_key"], "--selftest", "--json")
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["selftest_result"]["passed"] is True
    # a released version is never silently replaced
    again = run("edgeship", "build", str(mlp_onnx), "--name", "mlp", "--version", "2.0.0", "--key", key["private_key"], "-o", str(out))
    assert_one_line_error(again, 2, "already exists")


def test_verify_with_wrong_key_fails(mlp_bundle: Path, other_key: KeyPair) -> None:
    p = run("edgeship", "verify", str(mlp_bundle), "--key", str(other_key.public))
    assert_one_line_error(p, 1, "signed by key")
    p = run("edgeship-agent", "verify", str(mlp_bundle), "--key", str(other_key.public))
    assert_one_line_error(p, 1, "signed by key")


def test_tampered_bundle_fails_verify(mlp_bundle: Path, release_key: KeyPair, tmp_path: Path) -> None:
    data = bytearray(mlp_bundle.read_bytes())
    data[len(data) // 2] ^= 1
    bad = tmp_path / "bad.edge"
    bad.write_bytes(bytes(data))
    p = run("edgeship", "verify", str(bad), "--key", str(release_key.public))
    assert p.returncode == 1 and p.stderr.startswith("error: "), p.stderr


@pytest.mark.parametrize(
    "args, code, phrase",
    [
        (["verify", "nope.edge", "--key", "nope.pub"], 2, "nope.pub"),
        (["build", "missing.onnx", "--name", "m", "--version", "1.0.0", "--key", "k.key"], 2, "missing.onnx"),
        (["keys", "generate"], 2, "--out"),
        (["build", "--frobnicate"], 2, "frobnicate"),
    ],
)
def test_bad_input_one_line_errors(args: list[str], code: int, phrase: str, tmp_path: Path) -> None:
    assert_one_line_error(run("edgeship", *args, cwd=tmp_path), code, phrase)


def test_build_bad_version_and_wrong_passphrase(tmp_path: Path, mlp_onnx: Path) -> None:
    gen = run("edgeship", "keys", "generate", "--out", str(tmp_path / "k"), "--passphrase-env", "PW", "--json",
              env={"PW": "correct horse"})
    assert gen.returncode == 0, gen.stderr
    key = json.loads(gen.stdout)["private_key"]
    p = run("edgeship", "build", str(mlp_onnx), "--name", "m", "--version", "one", "--key", key,
            "--passphrase-env", "PW", "-o", str(tmp_path / "o.edge"), env={"PW": "correct horse"})
    assert_one_line_error(p, 2, "semantic version")
    p = run("edgeship", "build", str(mlp_onnx), "--name", "m", "--version", "1.0.0", "--key", key,
            "--passphrase-env", "PW", "-o", str(tmp_path / "o.edge"), env={"PW": "wrong"})
    assert_one_line_error(p, 2, "passphrase")
    assert "wrong" not in p.stderr.replace("wrong passphrase", "")  # the secret never leaks
    assert not (tmp_path / "o.edge").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_build_leaves_nothing(tmp_path: Path, release_key: KeyPair) -> None:
    from tests.modelfactory import onnx_nan_model

    model = onnx_nan_model(tmp_path / "nan.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    p = run("edgeship", "build", str(model), "--name", "nan", "--version", "1.0.0", "--key", str(release_key.private),
            "-o", str(out_dir / "nan-1.0.0.edge"))
    assert_one_line_error(p, 1, "NaN")
    assert list(out_dir.iterdir()) == []


def test_an_agent_still_running_after_a_stop_signal_writes_its_threads_stacks() -> None:
    """The agent's signal handler sets ``stop`` and, the first time, arms a dump of every thread's
    stack to stderr (the agent's log) if the process is still running ``stacks_after`` seconds
    later: where it waits, when stopping takes too long. A second signal does not re-arm it."""
    code = ("import asyncio, time\n"
            "from agent.cli import stop_requested\n"
            "stop = asyncio.Event()\n"
            "stop_requested(stop, stacks_after=0.3)\n"
            "stop_requested(stop, stacks_after=30)\n"
            "assert stop.is_set()\n"
            "def stuck_in_shutdown():\n"
            "    time.sleep(3)\n"
            "stuck_in_shutdown()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "Timeout (0:00:00.300000)!" in proc.stderr and "most recent call first" in proc.stderr
    assert "stuck_in_shutdown" in proc.stderr
