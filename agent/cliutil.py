"""What both CLIs share: the one error handler and JSON output.

Only the entry points talk to users. Library code raises the typed errors of
:mod:`agent.errors`; here each becomes one line ``error: ...`` on stderr and
an exit code. Tracebacks are for bugs only (or ``EDGESHIP_DEBUG=1``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import click

from agent.errors import BadData, EdgeshipError, LinkError, UsageError

if TYPE_CHECKING:
    from agent.mqtt import BrokerSettings

EXIT_OK = 0
EXIT_BAD_DATA = 1
"""Verification or data check failed (tampered bundle, untrusted signer, failed gate)."""
EXIT_USAGE = 2
"""Bad command line or local input (click uses 2 for usage errors too)."""
EXIT_LINK = 3
"""Network or broker failure: retrying may help."""
EXIT_INTERRUPTED = 130


def exit_code_for(err: EdgeshipError) -> int:
    if isinstance(err, UsageError):
        return EXIT_USAGE
    if isinstance(err, LinkError):
        return EXIT_LINK
    if isinstance(err, BadData):
        return EXIT_BAD_DATA
    return EXIT_BAD_DATA


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_cli(group: click.Group, prog_name: str, args: list[str] | None = None) -> NoReturn:
    """Run a click group with edgeship's error handling and exit."""
    debug = os.environ.get("EDGESHIP_DEBUG") == "1"
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        rv = group.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:
        # usage errors: keep click's usage hint, one line for the message
        if isinstance(e, click.UsageError) and e.ctx is not None:
            click.echo(e.ctx.get_usage(), err=True)
        click.echo(f"error: {_one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except EdgeshipError as e:
        if debug:
            raise
        click.echo(f"error: {_one_line(str(e))}", err=True)
        sys.exit(exit_code_for(e))
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        sys.exit(EXIT_OK)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")(f)


def password_from_env(env: str | None, *, option: str = "--password-env") -> str | None:
    """The secret in environment variable ``env`` (never on the command line), or None without one."""
    if env is None:
        return None
    value = os.environ.get(env)
    if value is None:
        raise UsageError(f"environment variable {env} (from {option}) is not set")
    return value


@dataclass(frozen=True)
class BrokerArgs:
    """The broker options of a command, as given; :meth:`settings` checks and resolves them."""

    url: str
    ca: Path | None
    cert: Path | None
    key: Path | None
    username: str | None
    password_env: str | None

    def settings(self) -> BrokerSettings:
        from agent.mqtt import parse_broker_url

        return parse_broker_url(self.url, ca=self.ca, cert=self.cert, key=self.key, username=self.username,
                                password=password_from_env(self.password_env))


_BROKER_OPTIONS = (
    click.option("--broker", "broker_url", required=True, metavar="URL",
                 help="mqtt://host[:1883] or mqtts://host[:8883]."),
    click.option("--ca", type=click.Path(path_type=Path, dir_okay=False), help="CA certificate of the broker (mqtts)."),
    click.option("--cert", type=click.Path(path_type=Path, dir_okay=False), help="Client certificate (mqtts)."),
    click.option("--key", type=click.Path(path_type=Path, dir_okay=False), help="Client certificate's private key."),
    click.option("--username", help="Broker username."),
    click.option("--password-env", metavar="VAR", help="Environment variable holding the broker password."),
)


def broker_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--broker URL --ca --cert --key --username --password-env``, handed to the command as one
    ``broker: BrokerArgs`` argument."""

    @functools.wraps(f)
    def command(*args: Any, broker_url: str, ca: Path | None, cert: Path | None, key: Path | None,
                username: str | None, password_env: str | None, **kwargs: Any) -> Any:
        return f(*args, broker=BrokerArgs(broker_url, ca, cert, key, username, password_env), **kwargs)

    for option in reversed(_BROKER_OPTIONS):
        command = option(command)
    return command
