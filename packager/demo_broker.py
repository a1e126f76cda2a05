"""The demo's embedded MQTT broker: amqtt on 127.0.0.1 only, anonymous, no persistence.

Run as ``python -m packager.demo_broker --port N``; it prints ``ready`` once it listens and runs
until SIGTERM or SIGINT. amqtt speaks MQTT 3.1.1 only: the server falls back to it (``--protocol
auto``) and the agents use it by default. This is for the demo and tests; production fleets use
Mosquitto (see docs/protocol.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

HOST = "127.0.0.1"


def broker_config(port: int) -> dict[str, object]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def run(port: int) -> None:
    from amqtt.broker import Broker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    broker = Broker(broker_config(port))
    await broker.start()
    print(f"ready {HOST}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m packager.demo_broker", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(run(args.port))


if __name__ == "__main__":
    main()
