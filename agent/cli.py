"""``edgeship-agent``: the device CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from agent import __version__
from agent.bundle import describe, opened_bundle
from agent.cliutil import EXIT_INTERRUPTED, echo_json, json_option, run_cli
from agent.errors import UsageError
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
        r: Any = d["selftest_result"]
        click.echo(f"OK: self-test passed on {r['backend']}: {r['cases']} case(s), max abs error {r['max_abs_error']:.3g}")


@cli.command()
@click.option("--config", "config_path", required=True, type=path_in, help="Agent configuration (TOML).")
@click.option("--once", is_flag=True, help="Run one update cycle and exit (0 when it succeeded).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info", show_default=True)
@json_option
def run(config_path: Path, once: bool, log_level: str, as_json: bool) -> None:
    """Connect to the broker and keep this device's models up to date."""
    import asyncio
    import logging
    import signal

    from agent.daemon import Agent
    from agent.settings import load_config

    logging.getLogger().setLevel(log_level.upper())
    logging.getLogger("agent").setLevel(log_level.upper())
    config = load_config(config_path)
    agent = Agent(config)

    async def main_loop() -> int | None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_requested, stop)
        if once:
            return await _unless_stopped(agent.run_once(), stop)
        await agent.run(stop)
        return 0

    import faulthandler

    try:
        rc = asyncio.run(main_loop())
    finally:
        faulthandler.cancel_dump_traceback_later()
    if rc is None:
        click.echo("error: interrupted: the update cycle stopped (a partial download resumes on the next run)",
                   err=True)
        raise SystemExit(EXIT_INTERRUPTED)
    if once:
        _print_status(config, agent.store, as_json, timestamp_version=agent.status.timestamp_version)
    if rc:
        raise SystemExit(rc)


STOP_STACKS_AFTER = 5.0
"""Seconds after SIGTERM/SIGINT past which a still-running agent writes every thread's stack to
stderr (its log): where it waits, if stopping ever takes longer than it should."""


def stop_requested(stop: Any, *, stacks_after: float = STOP_STACKS_AFTER) -> None:
    """The signal handler: set ``stop``; the first time, arm the stack dump."""
    import faulthandler

    if not stop.is_set():
        faulthandler.dump_traceback_later(stacks_after, exit=False)
    stop.set()


async def _unless_stopped(cycle: Any, stop: Any) -> int | None:
    """Await ``cycle`` (a coroutine), or cancel it once ``stop`` is set and return None: what it
    downloaded is kept, as after a power cut."""
    import asyncio

    task = asyncio.ensure_future(cycle)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return int(task.result())
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


def _model_summary(st: Any) -> dict[str, Any]:
    def held(h: Any) -> dict[str, Any] | None:
        return None if h is None else {"version": h.version, "sha256": h.sha256, "since": h.at}

    return {"status": st.status, "active": held(st.active), "previous": held(st.previous), "staged": held(st.staged),
            "watch": None if st.watch is None else {"inferences": st.watch.inferences, "seconds": st.watch.seconds,
                                                    "started": st.watch.started},
            "last_error": st.last_error, "refused": dict(st.refused)}


def _print_status(config: Any, store: Any, as_json: bool, *, timestamp_version: int) -> None:
    models = {m: _model_summary(store.load(m)) for m in config.models}
    if as_json:
        echo_json({"device_id": config.device_id, "state_dir": str(config.state_dir),
                   "timestamp_version": timestamp_version, "models": models})
        return
    click.echo(f"device {config.device_id}  (state {config.state_dir}, trusted timestamp v{timestamp_version})")
    for name, m in models.items():
        active = m["active"]
        line = f"  {name:<16} {m['status']:<12} " + (f"{active['version']} ({active['sha256'][:12]})" if active
                                                     else "no model installed")
        if m["previous"]:
            line += f"  previous {m['previous']['version']}"
        if m["staged"]:
            line += f"  staged {m['staged']['version']}"
        click.echo(line)
        if m["last_error"]:
            click.echo(f"  {'':<16} last error: {m['last_error']}")


@cli.command()
@click.option("--config", "config_path", required=True, type=path_in, help="Agent configuration (TOML).")
@json_option
def status(config_path: Path, as_json: bool) -> None:
    """Show this device's models: what serves, what is staged, the last error (reads the state directory)."""
    from agent.settings import load_config
    from agent.store import Store
    from agent.trust import TufClient

    config = load_config(config_path)
    if not config.state_dir.is_dir():
        raise UsageError(f"state directory {config.state_dir} does not exist: the agent has not run yet")
    store = Store(config.state_dir)
    ts = TufClient(config.state_dir, config.root, config.limits).trusted_timestamp_version()
    _print_status(config, store, as_json, timestamp_version=ts)


def _register() -> None:
    from agent.serve import infer

    cli.add_command(infer)


_register()


def main(args: list[str] | None = None) -> None:
    run_cli(cli, "edgeship-agent", args)


if __name__ == "__main__":
    main()
