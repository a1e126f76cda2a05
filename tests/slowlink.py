"""A slow link between a device and the broker: a TCP proxy on 127.0.0.1 that passes what the
broker sends at ``rate`` bytes per second (the device's downlink, as on a cellular modem) and what
the device sends as it comes. It reads from the broker only as fast as it passes bytes on, so the
backlog stays out of the proxy: it fills the loopback socket buffers (a few MiB at most) and then
waits in the broker, as it would behind a real slow link."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

CHUNK = 16 * 1024


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, rate: float | None) -> None:
    loop = asyncio.get_running_loop()
    free_at = loop.time()
    try:
        while data := await src.read(CHUNK):
            if rate is not None:  # this chunk leaves once the link has carried the ones before it
                free_at = max(free_at, loop.time()) + len(data) / rate
                if (wait := free_at - loop.time()) > 0.002:
                    await asyncio.sleep(wait)
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        dst.close()


@contextlib.asynccontextmanager
async def slow_link(broker_host: str, broker_port: int, *, rate: float) -> AsyncIterator[int]:
    """Yields the port to connect to instead of the broker's."""
    pipes: set[asyncio.Task[None]] = set()

    async def accept(down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(broker_host, broker_port)
        except OSError:  # the broker is gone: the device sees its connection closed
            down_w.close()
            return
        for t in (asyncio.ensure_future(_pipe(down_r, up_w, None)), asyncio.ensure_future(_pipe(up_r, down_w, rate))):
            pipes.add(t)
            t.add_done_callback(pipes.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in list(pipes):
            t.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        await server.wait_closed()
