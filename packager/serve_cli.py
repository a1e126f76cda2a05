"""``edgeship serve``: run the MQTT update server for a repository directory.

The click command only turns options into :class:`~agent.mqtt.BrokerSettings` and
:class:`~packager.server.ServerLimits`, sets up logging and signals, and runs
:func:`packager.server.serve`; errors go through the shared handler (``agent.cliutil``):
a missing repository is a usage error (exit 2), a broker unreachable at start a link
error (exit 3). SIGINT and SIGTERM stop the server cleanly (exit 0).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import click

from agent.cliutil import BrokerArgs, broker_options
from agent.errors import UsageError
from agent.protocol import MAX_BLOCK

LOG_LEVELS = ("debug", "info", "warning", "error")



@click.command("serve")
@click.option("--repo", "repo_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Repository directory (its metadata/ and targets/ are served).")
@broker_options
@click.option("--protocol", type=click.Choice(["auto", "5", "3.1.1"]), default="auto", show_default=True,
              help="MQTT version; auto tries 5 (shared subscription) and falls back to 3.1.1.")
@click.option("--block-limit", type=click.IntRange(1, MAX_BLOCK), default=MAX_BLOCK, show_default=True,
              help="Largest block, in bytes, a device may ask for.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True,
              help="Log level of the server's lines on stderr.")
def serve(repo_dir: Path, broker: BrokerArgs, protocol: str, block_limit: int, log_level: str) -> None:
    """Serve a repository's metadata and target blocks to devices over MQTT."""
    from packager.server import ServerLimits
    from packager.server import serve as run_server

    if not repo_dir.is_dir():
        raise UsageError(f"repository directory {repo_dir} not found")
    if not (repo_dir / "metadata").is_dir():
        raise UsageError(f"{repo_dir} is not an edgeship repository (no metadata/ directory)")
    settings = broker.settings()
    limits = ServerLimits(max_block=block_limit)
    level = getattr(logging, log_level.upper())
    for name in ("packager", "agent"):
        logging.getLogger(name).setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await run_server(repo_dir, settings, protocol=protocol, limits=limits, stop=stop)  # type: ignore[arg-type]
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    asyncio.run(main())
