"""What the demo checks on the broker itself: it accepts clients, the server's hint is there,
the fleet's retained view; and the retained documents it leaves on an external broker, cleared.

Each function opens its own short MQTT 3.1.1 connection (the embedded amqtt speaks nothing
newer) and is bounded by a timeout that becomes :class:`~packager.demo_procs.StepTimeout`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence

from agent.errors import LinkError
from agent.mqtt import BrokerSettings, make_client
from agent.protocol import HINT_TOPIC, ProtocolError, decode_hint, presence_topic, state_topic
from packager.demo_procs import StepTimeout

log = logging.getLogger(__name__)


def _client_id() -> str:
    return f"edgeship-demo-{secrets.token_hex(6)}"


async def _connect_once(settings: BrokerSettings) -> None:
    import aiomqtt

    try:
        async with make_client(settings, identifier=_client_id(), protocol="3.1.1"):
            pass
    except aiomqtt.MqttError as e:
        raise LinkError(f"cannot connect to broker {settings.url}: {e}") from None


def wait_broker(settings: BrokerSettings, *, timeout: float, alive: Callable[[], None] = lambda: None,
                retry: bool = True) -> float:
    """Connect until the broker accepts an MQTT 3.1.1 client; returns the seconds it took.

    ``alive()`` is called before each attempt (it raises when the broker process died). Without
    ``retry`` the first refusal is a :class:`LinkError` (a broker that should already be running)."""
    start = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - start < timeout:
        alive()
        try:
            asyncio.run(asyncio.wait_for(_connect_once(settings), max(0.5, timeout - (time.monotonic() - start))))
            return time.monotonic() - start
        except asyncio.TimeoutError as e:
            last = e
        except LinkError as e:
            if not retry:
                raise
            last = e
        time.sleep(0.1)
    raise StepTimeout(f"no MQTT connection within {timeout:g} s ({last or 'timed out'})")


def wait_hint(settings: BrokerSettings, version: int, *, timeout: float,
              alive: Callable[[], None] = lambda: None) -> int:
    """Wait for the retained hint on ``edgeship/v1/hint`` to announce timestamp ``version`` (or newer)."""

    async def main() -> int:
        import aiomqtt

        seen: int | None = None
        try:
            async with make_client(settings, identifier=_client_id(), protocol="3.1.1") as client:
                await client.subscribe(HINT_TOPIC, qos=1)
                deadline = time.monotonic() + timeout
                messages = client.messages.__aiter__()
                while True:
                    alive()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StepTimeout(f"no hint for timestamp v{version} on {HINT_TOPIC} within {timeout:g} s "
                                          f"(last seen: {'none' if seen is None else f'v{seen}'})")
                    try:
                        msg = await asyncio.wait_for(messages.__anext__(), min(left, 0.25))
                    except asyncio.TimeoutError:
                        continue
                    payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
                    try:
                        seen = decode_hint(bytes(payload)).timestamp_version
                    except ProtocolError as e:
                        log.debug("ignored a malformed hint: %s", e)
                        continue
                    if seen >= version:
                        return seen
        except aiomqtt.MqttError as e:
            raise LinkError(f"broker {settings.url}: {e}") from None

    return asyncio.run(main())


def clear_retained(settings: BrokerSettings, devices: Sequence[str], *, timeout: float = 5.0) -> int:
    """Remove the retained state and presence the demo's devices left on an external broker."""
    topics = [t for d in devices for t in (state_topic(d), presence_topic(d))]

    async def main() -> None:
        import aiomqtt

        try:
            async with make_client(settings, identifier=_client_id(), protocol="3.1.1") as client:
                for t in topics:
                    await client.publish(t, b"", qos=1, retain=True)
        except aiomqtt.MqttError as e:
            raise LinkError(f"broker {settings.url}: {e}") from None

    try:
        asyncio.run(asyncio.wait_for(main(), timeout))
    except asyncio.TimeoutError:
        raise LinkError(f"broker {settings.url}: clearing retained messages took more than {timeout:g} s") from None
    return len(topics)
