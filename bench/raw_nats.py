"""The ceilings: what plain nats-py does against the same nats-server, in the same run.

- `publish_and_consume`: N messages of a given size published to a scratch stream while a
  consumer reads them; rate = N / (first publish → last message consumed). Each message carries
  a unique `Nats-Msg-Id` header, as Baton's relay does, so the server does the same dedup work.
  Several client styles are tried and the best is the ceiling.
- `replay`: a task's subjects on BATON_EVENTS read back with an ordered consumer (and, for
  comparison, with a pull consumer fetching 256 at a time, the way the gateway reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import nats
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    StorageType,
    StreamConfig,
)

RAW_STREAM = "BENCH_RAW"
RAW_SUBJECT = "bench.raw"


async def _scratch_stream(js: Any) -> None:
    with contextlib.suppress(Exception):  # Not there yet.
        await js.delete_stream(RAW_STREAM)
    await js.add_stream(StreamConfig(
        name=RAW_STREAM, subjects=[f"{RAW_SUBJECT}.>"], storage=StorageType.FILE,
        duplicate_window=30 * 60,  # The same as BATON_EVENTS.
    ))


async def _one_run(url: str, n: int, payload: bytes, *, publish: str, consumer: str,
                   timeout_s: float) -> float:
    """Messages/second from the first publish to the last message consumed."""
    pub_nc = await nats.connect(url, name="bench-raw-pub")
    sub_nc = await nats.connect(url, name="bench-raw-sub")
    try:
        pub_js, sub_js = pub_nc.jetstream(), sub_nc.jetstream()
        await _scratch_stream(pub_js)
        subject = f"{RAW_SUBJECT}.t0.AgentOutput"
        done = asyncio.Event()
        count = 0
        last_at = 0.0
        reader: asyncio.Task[None] | None = None

        if consumer == "ordered":
            async def on_message(_msg: Any) -> None:
                nonlocal count, last_at
                count += 1
                if count >= n:
                    last_at = time.perf_counter()
                    done.set()

            await sub_js.subscribe(f"{RAW_SUBJECT}.>", stream=RAW_STREAM, ordered_consumer=True,
                                   cb=on_message, pending_msgs_limit=10 * n + 1000,
                                   pending_bytes_limit=(len(payload) + 512) * n * 4)
        else:
            pull = await sub_js.pull_subscribe(
                f"{RAW_SUBJECT}.>", stream=RAW_STREAM,
                config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
            )

            async def fetch_all() -> None:
                nonlocal count, last_at
                deadline = time.monotonic() + timeout_s
                while count < n and time.monotonic() < deadline:
                    try:
                        count += len(await pull.fetch(1000, timeout=1.0))
                    except (nats.errors.TimeoutError, TimeoutError):
                        continue
                last_at = time.perf_counter()
                done.set()

            reader = asyncio.create_task(fetch_all())

        headers = [{"Nats-Msg-Id": uuid.uuid4().hex} for _ in range(n)]
        started = time.perf_counter()
        if publish == "async":
            futures = [await pub_js.publish_async(subject, payload, headers=h) for h in headers]
            await asyncio.gather(*futures)
        else:
            for h in headers:
                await pub_js.publish(subject, payload, headers=h)
        await asyncio.wait_for(done.wait(), timeout_s)
        if reader is not None:
            await reader
        if count < n:
            raise RuntimeError(f"raw {publish}/{consumer}: consumed {count} of {n}")
        return n / (last_at - started)
    finally:
        with contextlib.suppress(Exception):  # Cleanup only.
            await pub_nc.jetstream().delete_stream(RAW_STREAM)
        await pub_nc.close()
        await sub_nc.close()


async def publish_and_consume(url: str, n: int, size: int, *, rounds: int = 2,
                              timeout_s: float = 120) -> dict[str, Any]:
    """The best plain-client publish-and-consume rate for N messages of `size` bytes."""
    payload = (b'{"raw":"' + b"x" * max(size - 10, 1) + b'"}')[:size]
    variants: dict[str, float] = {}
    for publish, consumer, count in (
        ("async", "ordered", n),
        ("async", "pull1000", n),
        # Awaiting each publish's ack is one round trip per message: a smaller N gives its rate.
        ("awaited", "ordered", min(n, 5_000)),
    ):
        # Best of `rounds`: the ceiling should not be lowered by a moment of noise.
        variants[f"publish_{publish}+{consumer}"] = max([
            await _one_run(url, count, payload, publish=publish, consumer=consumer, timeout_s=timeout_s)
            for _ in range(rounds)
        ])
    best = max(variants, key=variants.__getitem__)
    return {"rate": variants[best], "best": best, "variants": variants, "n": n, "size": size}


async def replay(url: str, subject: str, expected: int, *, timeout_s: float = 120) -> dict[str, float]:
    """Events/second replaying `subject` from BATON_EVENTS with plain nats-py consumers."""
    nc = await nats.connect(url, name="bench-raw-replay")
    try:
        js = nc.jetstream()
        rates: dict[str, float] = {}

        # An ordered (push, flow-controlled) consumer: the nats-py way to read history fast.
        done = asyncio.Event()
        count = 0
        last_at = 0.0

        async def on_message(_msg: Any) -> None:
            nonlocal count, last_at
            count += 1
            if count >= expected:
                last_at = time.perf_counter()
                done.set()

        started = time.perf_counter()
        subscription = await js.subscribe(subject, stream="BATON_EVENTS", ordered_consumer=True,
                                          cb=on_message, pending_msgs_limit=10 * expected + 1000,
                                          pending_bytes_limit=4096 * expected + 2**20)
        await asyncio.wait_for(done.wait(), timeout_s)
        rates["ordered"] = expected / (last_at - started)
        await subscription.unsubscribe()

        # An ephemeral pull consumer fetching 256 at a time (how the gateway's viewers read).
        started = time.perf_counter()
        pull = await js.pull_subscribe(subject, stream="BATON_EVENTS", config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=60.0))
        got = 0
        deadline = time.monotonic() + timeout_s
        while got < expected and time.monotonic() < deadline:
            try:
                got += len(await pull.fetch(256, timeout=1.0))
            except (nats.errors.TimeoutError, TimeoutError):
                continue
        rates["pull256"] = got / (time.perf_counter() - started)
        await pull.unsubscribe()
        return rates
    finally:
        await nc.close()
