"""``edgeship-agent``: the device CLI."""

from __future__ import annotations

from pathlib import Path

import click

from agent import __version__
from agent.bundle import describe, opened_bundle
from agent.cliutil import echo_json, json_option, run_cli
from agent.keys import load_public_key

path_in = click.Path(path_type=Path, dir_okay=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeship-agent")
def cli() -> None:
    """edgeship-agent: verify, install and serve model bundles on a device."""


@cli.command()
@click.argument("bundle", type=path_in)
@click.option("--key", "keys_", multiple=True, required=True, type=path_in, help="Trusted public key (repeatable).")
@click.option("--selftest/--no-selftest", default=False, help="Also run the bundle's golden self-test on this device's runtime.")
@json_option
def verify(bundle: Path, keys_: tuple[Path, ...], selftest: bool, as_json: bool) -> None:
    """Exit 0 only if BUNDLE is intact and signed by a trusted key (and, with --selftest, runs correctly here)."""
    trusted = [load_public_key(k) for k in keys_]
    with opened_bundle(bundle, trusted_keys=trusted) as vb:
        d = describe(vb, bundle_file=bundle)
        if selftest:
            from agent.preflight import selftest_bundle

            res = selftest_bundle(vb)
            d["selftest_result"] = res
    if as_json:
        echo_json(d)
        return
    click.echo(f"OK: {bundle.name}: {d['name']} {d['version']} intact, signed by {d['signer']}")
    if selftest:
        r = d["selftest_result"]
        click.echo(f"OK: self-test passed on {r['backend']}: {r['cases']} case(s), max abs error {r['max_abs_error']:.3g}")


def main(args: list[str] | None = None) -> None:
    run_cli(cli, "edgeship-agent", args)


if __name__ == "__main__":
    main()
