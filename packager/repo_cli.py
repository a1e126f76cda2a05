"""``edgeship repo ...`` and ``edgeship publish``: the TUF repository commands.

The lead wires them into :mod:`packager.cli` (``cli.add_command(repo)``, ``cli.add_command(publish)``);
errors are typed exceptions that :func:`agent.cliutil.run_cli` turns into one line and an exit code.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click

from agent.cliutil import echo_json, json_option
from packager import repo as lib
from packager.repo_publish import transfer_signature_path
from packager.repo_store import ROLES, Expiry

_DURATION = re.compile(r"^(\d+)([smhdw])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``"90s"``, ``"30m"``, ``"12h"``, ``"7d"``, ``"2w"`` -> timedelta (ValueError otherwise)."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"invalid duration {text!r}: use a number and one of s m h d w, e.g. 12h or 7d")
    return timedelta(seconds=int(m[1]) * _UNITS[m[2]])


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic only in recent click
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


DURATION = Duration()
_file_in = click.Path(path_type=Path, dir_okay=False)
_dir = click.Path(path_type=Path, file_okay=False)
repo_option = click.option("--repo", "repo_dir", required=True, type=_dir, help="Repository directory.")
keys_option = click.option("--keys", "keys_dir", type=_dir,
                           help="Directory holding the offline root/targets keys (default REPO/keys/offline).")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _plain(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else obj


def _left(seconds: int) -> str:
    if seconds <= 0:
        return f"EXPIRED {_span(-seconds)} ago"
    return _span(seconds)


def _span(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    return f"{days}d {rest // 3600}h" if days else f"{rest // 3600}h {rest % 3600 // 60}m"


@click.group()
def repo() -> None:
    """The TUF repository devices update from: create it, inspect it, rotate keys, re-sign."""


@repo.command("init")
@click.argument("directory", type=_dir)
@click.option("--release-key", "release_keys", multiple=True, required=True, type=_file_in,
              help="Public key (PEM, from 'keys generate') allowed to sign bundles; repeatable.")
@click.option("--root-threshold", default=1, show_default=True, type=click.IntRange(1, 16),
              help="Root keys needed to sign a new root.")
@click.option("--root-keys", type=click.IntRange(1, 16), help="Root keys to generate (default: the threshold).")
@click.option("--timestamp-expiry", type=DURATION, default="1d", show_default=True)
@click.option("--snapshot-expiry", type=DURATION, default="7d", show_default=True)
@click.option("--targets-expiry", type=DURATION, default="90d", show_default=True)
@click.option("--root-expiry", type=DURATION, default="365d", show_default=True)
@json_option
def init_cmd(directory: Path, release_keys: tuple[Path, ...], root_threshold: int, root_keys: int | None,
             timestamp_expiry: timedelta, snapshot_expiry: timedelta, targets_expiry: timedelta,
             root_expiry: timedelta, as_json: bool) -> None:
    """Create a repository in DIRECTORY (new or empty) with fresh TUF keys."""
    expiry = Expiry(root=root_expiry, targets=targets_expiry, snapshot=snapshot_expiry, timestamp=timestamp_expiry)
    info = lib.init_repo(directory, release_keys=list(release_keys), root_threshold=root_threshold,
                         root_keys=root_keys or root_threshold, expiry=expiry, now=_now())
    if as_json:
        echo_json(_plain(info))
        return
    click.echo(f"created repository {info.path}")
    click.echo(f"  device trust anchor: {info.trust_anchor}  (provision every device with this file)")
    click.echo(f"  offline keys:        {info.offline_keys}  (root, targets: move them off this machine; "
               "pass --keys DIR to publish/rotate)")
    click.echo(f"  online keys:         {info.online_keys}  (snapshot, timestamp: the server needs only these)")
    click.echo(f"  root threshold:      {info.thresholds['root']} of {len(info.key_ids['root'])}")
    for kid in info.release_key_ids:
        click.echo(f"  release key:         {kid}")


@repo.command("status")
@click.argument("directory", type=_dir)
@json_option
def status_cmd(directory: Path, as_json: bool) -> None:
    """Role versions and expiries, published targets and release keys."""
    st = lib.status(directory, _now())
    if as_json:
        echo_json(_plain(st))
        return
    click.echo(f"repository {st.path}  (device trust anchor {st.trust_anchor})")
    click.echo(f"  {'role':<10} {'version':>7}  {'expires':<20}  {'left':<18} keys")
    for r in st.roles:
        click.echo(f"  {r.role:<10} {r.version:>7}  {r.expires:<20}  {_left(r.seconds_left):<18} "
                   f"{r.threshold} of {len(r.key_ids)}")
    click.echo("targets:")
    for t in st.targets:
        if t.kind == "bundle":
            click.echo(f"  {t.path:<40} {t.length:>10} B  sha256 {t.sha256[:16]}  "
                       f"groups {','.join(t.groups) or '(all)'}  published {t.published}"
                       + ("" if t.transfer_signer else "  (no transfer signature)"))
        else:
            click.echo(f"  {t.path:<40} {t.length:>10} B  sha256 {t.sha256[:16]}  ({t.kind})")
    for kid in st.release_key_ids:
        click.echo(f"release key {kid}")


@repo.command("rotate")
@click.argument("role", type=click.Choice(ROLES))
@repo_option
@keys_option
@click.option("--threshold", type=click.IntRange(1, 16), help="New threshold (default: unchanged).")
@click.option("--count", type=click.IntRange(1, 16), help="Number of new keys (default: as many as now).")
@json_option
def rotate_cmd(role: str, repo_dir: Path, keys_dir: Path | None, threshold: int | None, count: int | None,
               as_json: bool) -> None:
    """Replace ROLE's keys and publish a new root signed by the old and new root keys."""
    res = lib.rotate(repo_dir, role, keys_dir=keys_dir, now=_now(), threshold=threshold,  # type: ignore[arg-type]
                     count=count)
    if as_json:
        echo_json(_plain(res))
        return
    click.echo(f"rotated {res.role}: root is now version {res.root_version} (threshold {res.threshold})")
    for p in res.new_key_files:
        click.echo(f"  new key:     {p}")
    for p in res.retired_key_files:
        click.echo(f"  retired key: {p}")


@repo.group("release-keys")
def release_keys() -> None:
    """The keys allowed to sign bundles (devices learn them through TUF)."""


def _release_result(res: lib.ReleaseKeysResult, as_json: bool) -> None:
    if as_json:
        echo_json(_plain(res))
        return
    click.echo(res.message)
    for kid in res.key_ids:
        click.echo(f"  release key {kid}")


@release_keys.command("add")
@click.argument("pub", type=_file_in)
@repo_option
@keys_option
@json_option
def release_keys_add(pub: Path, repo_dir: Path, keys_dir: Path | None, as_json: bool) -> None:
    """Trust bundles signed by the public key PUB."""
    _release_result(lib.release_keys_add(repo_dir, pub, keys_dir=keys_dir, now=_now()), as_json)


@release_keys.command("remove")
@click.argument("key_id")
@repo_option
@keys_option
@json_option
def release_keys_remove(key_id: str, repo_dir: Path, keys_dir: Path | None, as_json: bool) -> None:
    """Stop trusting the release key KEY_ID (full id or a unique prefix of 8+ characters)."""
    _release_result(lib.release_keys_remove(repo_dir, key_id, keys_dir=keys_dir, now=_now()), as_json)


@repo.command("resign")
@repo_option
@click.option("--margin", type=DURATION, help="Re-sign what expires within this (default 6h; 30d with --offline).")
@click.option("--offline", is_flag=True, help="Re-sign root and targets instead (needs the offline keys).")
@keys_option
@json_option
def resign_cmd(repo_dir: Path, margin: timedelta | None, offline: bool, keys_dir: Path | None,
               as_json: bool) -> None:
    """Re-sign metadata about to expire: timestamp/snapshot with the online keys (for cron), or root/targets."""
    def versions() -> dict[str, int]:
        return {r.role: r.version for r in lib.status(repo_dir, _now()).roles}

    before = versions()
    if offline:
        lib.refresh_offline(repo_dir, keys_dir=keys_dir, now=_now(), margin=margin or timedelta(days=30))
    else:
        lib.refresh_online(repo_dir, now=_now(), margin=margin or timedelta(hours=6))
    after = versions()
    resigned = [role for role in ROLES if after[role] != before[role]]
    if as_json:
        echo_json({"changed": bool(resigned), "resigned": resigned, "versions": after})
    elif resigned:
        click.echo("re-signed " + ", ".join(f"{role} (now version {after[role]})" for role in resigned))
    else:
        click.echo(f"nothing expires within the margin; timestamp stays version {after['timestamp']}")


@click.command("publish")
@click.argument("bundle", type=_file_in)
@repo_option
@click.option("--group", "groups", multiple=True, help="Device group to offer it to (repeatable; none = every device).")
@keys_option
@json_option
def publish(bundle: Path, repo_dir: Path, groups: tuple[str, ...], keys_dir: Path | None, as_json: bool) -> None:
    """Publish BUNDLE (signed by a current release key) into the repository."""
    res = lib.publish(repo_dir, bundle, groups=list(groups), keys_dir=keys_dir, now=_now())
    if as_json:
        echo_json(_plain(res))
        return
    click.echo(res.message)
    click.echo(f"  target {res.target_path}  {res.length} bytes  sha256 {res.sha256}")
    if res.transfer_signer:
        click.echo(f"  transfer signature by {res.transfer_signer[:16]}: devices check each block once")
    elif res.changed:
        click.echo(f"  no transfer signature ({transfer_signature_path(bundle).name}) beside the bundle: "
                   "devices hash its files a second time while downloading")


__all__ = ["repo", "publish", "parse_duration", "DURATION"]
