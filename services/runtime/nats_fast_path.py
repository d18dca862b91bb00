"""The only place Baton reaches into nats-py's private internals, for speed.

- `send_commands`: hands many pre-built protocol commands (PUBs) to nats-py's writer in one
  write, as `Client.publish` does for one (the relay's batches, a batch of acks).
- `ack_all`: acks many JetStream messages in one such write, marking each acked as `Msg.ack` does.
- `connection_of`: the connection a JetStream context runs on (nats-py keeps it private).
- `flush`: `Client.flush` as its name promises. nats-py 2.16 writes flush's PING straight to the
  socket, ahead of the commands still waiting for its writer task (the SUB that `subscribe` just
  queued, a PUB), so the PONG can come back before the server has seen them: a subscription
  "flushed" that way may miss the next message another connection publishes (seen here 5 times
  in 100 on a busy machine, and in CI as "no responders" to a vm_agent that had subscribed).

Each falls back to nats-py's public API where the private one is missing, and
`tests/integration/test_nats_fast_path.py` holds them to the pinned nats-py and nats-server
(pyproject pins nats-py's minor version): a nats-py upgrade that moves these fails that test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

_WRITER = ("_send_command", "_flush_queue", "_flush_pending")


def has_writer_api(nc: Client) -> bool:
    """Whether this nats-py has the private writer `send_commands` uses (2.16 has); callers
    fall back to its public API without it."""
    return all(hasattr(nc, name) for name in _WRITER)


async def send_commands(nc: Client, commands: bytes) -> None:
    """Hand pre-built protocol commands to nats-py's writer, as `nc.publish` does for one."""
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    await nc._send_command(commands)  # noqa: SLF001
    if nc._flush_queue is not None and nc._flush_queue.empty():  # noqa: SLF001
        await nc._flush_pending()  # noqa: SLF001


async def ack_all(messages: Sequence[Msg]) -> None:
    """Ack messages (each one: the consumers' ack policy is explicit) in one write to NATS."""
    if not messages:
        return
    client = getattr(messages[0], "_client", None)
    if client is None or not has_writer_api(client) or len(messages) == 1:
        for message in messages:
            await message.ack()
        return
    commands = []
    for message in messages:
        if not message.reply or message._ackd:  # noqa: SLF001
            await message.ack()  # Raises as nats-py would.
        commands.append(b"PUB %s 0\r\n\r\n" % message.reply.encode())
    await send_commands(client, b"".join(commands))
    for message in messages:
        message._ackd = True  # noqa: SLF001


async def flush(nc: Client, timeout_s: float = 10.0) -> None:
    """Every command given to `nc` before this call has reached the server and been processed (a
    subscription is in place, a publish delivered to the subscribers there were): the writer task
    first writes what is queued, then `Client.flush`'s PING/PONG round trip comes after it."""
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_connected and has_writer_api(nc) and nc._flush_queue is not None:  # noqa: SLF001
        written = asyncio.get_running_loop().create_future()
        await nc._flush_queue.put(written)  # noqa: SLF001 - the writer resolves it once it has written
        try:
            await asyncio.wait_for(written, timeout_s)
        except TimeoutError as error:
            raise nats.errors.FlushTimeoutError from error
    await nc.flush(timeout_s)


def connection_of(js: JetStreamContext) -> Client:
    """The client a JetStream context was made from."""
    return js._nc  # noqa: SLF001
