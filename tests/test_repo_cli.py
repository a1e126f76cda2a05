"""``edgeship repo ...`` and ``edgeship publish`` as a user runs them (in-process, through run_cli)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from agent.cliutil import EXIT_BAD_DATA, EXIT_USAGE, run_cli
from packager.repo_cli import parse_duration, publish, repo
from tests.conftest import KeyPair, build
from tests.test_repo import client, target


def _cli() -> click.Group:
    try:  # once the lead has wired the commands in, test the real entry point
        from packager.cli import cli

        if "repo" in cli.commands and "publish" in cli.commands:
            return cli
    except ImportError:  # pragma: no cover
        pass
    group = click.Group("edgeship")
    group.add_command(repo)
    group.add_command(publish)
    return group


CLI = _cli()


def ok(*args: str | Path) -> click.testing.Result:
    res = CliRunner().invoke(CLI, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def as_json(*args: str | Path) -> dict:  # type: ignore[type-arg]
    return json.loads(ok(*args, "--json").stdout)  # type: ignore[no-any-return]


def fails(capsys: pytest.CaptureFixture[str], code: int, phrase: str, *args: str | Path) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli(CLI, "edgeship", [str(a) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and phrase in lines[0], err
    assert "Traceback" not in err


def test_parse_duration() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("2w") == timedelta(days=14)
    for bad in ("", "1", "1y", "-1d", "1.5d", "d"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_repo_commands_end_to_end(tmp_path: Path, mlp_bundle: Path, release_key: KeyPair, other_key: KeyPair) -> None:
    r = tmp_path / "repo"
    info = as_json("repo", "init", r, "--release-key", release_key.public, "--root-threshold", "2",
                   "--timestamp-expiry", "12h")
    assert info["trust_anchor"] == str(r / "metadata" / "1.root.json") and info["thresholds"]["root"] == 2
    assert len(info["key_ids"]["root"]) == 2 and info["release_key_ids"] == [release_key.key_id]
    human = ok("repo", "init", tmp_path / "other", "--release-key", release_key.public).stdout
    assert "device trust anchor" in human and "keys/offline" in human and "keys/online" in human

    pub = as_json("publish", mlp_bundle, "--repo", r, "--group", "canary")
    assert pub["changed"] is True and pub["target_path"] == "mlp/mlp-1.0.0.edge" and pub["groups"] == ["canary"]
    assert pub["transfer_signer"] == release_key.key_id  # build wrote mlp_bundle's .sig beside it
    assert "already published" in ok("publish", mlp_bundle, "--repo", r).stdout

    st = as_json("repo", "status", r)
    assert [x["role"] for x in st["roles"]] == ["root", "targets", "snapshot", "timestamp"]
    assert st["roles"][3]["version"] == 2 and st["roles"][3]["seconds_left"] <= 12 * 3600
    table = ok("repo", "status", r).stdout
    assert "mlp/mlp-1.0.0.edge" in table and "canary" in table and "release key " + release_key.key_id in table
    signers = {t["path"]: t["transfer_signer"] for t in st["targets"]}
    assert signers["mlp/mlp-1.0.0.edge"] == release_key.key_id and "no transfer signature" not in table

    rot = as_json("repo", "rotate", "timestamp", "--repo", r)
    assert rot["root_version"] == 2 and rot["role"] == "timestamp"
    assert "root is now version 3" in ok("repo", "rotate", "root", "--repo", r).stdout

    added = as_json("repo", "release-keys", "add", other_key.public, "--repo", r)
    assert added["key_ids"] == [release_key.key_id, other_key.key_id]
    assert "removed release key" in ok("repo", "release-keys", "remove", release_key.key_id, "--repo", r).stdout

    assert as_json("repo", "resign", "--repo", r)["changed"] is False
    resigned = as_json("repo", "resign", "--repo", r, "--margin", "1d")  # the timestamp lives 12h here
    assert resigned["changed"] is True and resigned["resigned"] == ["timestamp"]
    assert as_json("repo", "resign", "--repo", r, "--offline", "--margin", "100d")["resigned"] == [
        "targets", "snapshot", "timestamp"]

    up = client(r, tmp_path / "device")
    up.refresh()
    assert target(up, "mlp/mlp-1.0.0.edge").custom["edgeship"]["groups"] == ["canary"]


def test_errors_are_one_line(tmp_path: Path, mlp_onnx: Path, mlp_bundle: Path, release_key: KeyPair,
                             other_key: KeyPair, capsys: pytest.CaptureFixture[str]) -> None:
    r = tmp_path / "repo"
    ok("repo", "init", r, "--release-key", release_key.public)
    ok("publish", mlp_bundle, "--repo", r)
    conflict = build(mlp_onnx, release_key, tmp_path / "c.edge", selftest_cases=3).path
    fails(capsys, EXIT_BAD_DATA, "already published with different bytes", "publish", conflict, "--repo", r)
    foreign = build(mlp_onnx, other_key, tmp_path / "f.edge", version="9.0.0").path
    fails(capsys, EXIT_BAD_DATA, "not trusted", "publish", foreign, "--repo", r)
    fails(capsys, EXIT_USAGE, "not an edgeship repository", "repo", "status", tmp_path)
    v2 = build(mlp_onnx, release_key, tmp_path / "mlp-2.0.0.edge", version="2.0.0").path
    sidecar = v2.with_name(v2.name + ".sig")
    sidecar.write_bytes(sidecar.read_bytes().replace(b'"sig":"', b'"sig":"A', 1))
    fails(capsys, EXIT_BAD_DATA, f"transfer signature {sidecar}: malformed signature", "publish", v2, "--repo", r)
    sidecar.unlink()
    out = ok("publish", v2, "--repo", r).stdout
    assert "no transfer signature (mlp-2.0.0.edge.sig) beside the bundle" in out
    assert "mlp/mlp-2.0.0.edge" in ok("repo", "status", r).stdout.split("(no transfer signature)")[0].splitlines()[-1]
    fails(capsys, EXIT_USAGE, "invalid group", "publish", mlp_bundle, "--repo", r, "--group", "A B")
    fails(capsys, EXIT_USAGE, "not an empty directory", "repo", "init", r, "--release-key", release_key.public)
    fails(capsys, EXIT_USAGE, "invalid duration", "repo", "init", tmp_path / "x", "--release-key",
          release_key.public, "--root-expiry", "1y")
    fails(capsys, EXIT_USAGE, "last release key", "repo", "release-keys", "remove", release_key.key_id, "--repo", r)
    fails(capsys, EXIT_USAGE, "needs 1 of its 1 key", "repo", "rotate", "targets", "--repo", r,
          "--keys", tmp_path)
