"""How much one gateway takes in: tasks per client (a token bucket), live viewers at once."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_STREAM_SEQ = 2**63 - 1
"""JetStream's sequences are unsigned 64-bit; a `from_seq` past this is refused, never sent to NATS."""
BUS_HEADER_HEADROOM = 4096
"""Bytes of a NATS message kept for its headers (Nats-Msg-Id, Nats-Expected-Stream, …)."""


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class SubmitRateLimit:
    """A token bucket per client: `burst` tasks at once, then `rate_per_s` sustained.

    `take(client)` spends one token and returns 0, or, when the client's bucket is empty,
    spends nothing and returns the seconds until a token is back (for `Retry-After`).
    """

    rate_per_s: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    max_clients: int = 10_000
    _buckets: dict[str, _Bucket] = field(default_factory=dict, repr=False)

    def take(self, client: str) -> float:
        now = self.clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            self._forget_full_buckets(now)
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate_per_s)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate_per_s

    def _forget_full_buckets(self, now: float) -> None:
        # A bucket refilled to `burst` is the same as no bucket: dropping it bounds the memory.
        if len(self._buckets) < self.max_clients:
            return
        refill_s = self.burst / self.rate_per_s
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.updated < refill_s}

    def refusal(self, wait_s: float) -> tuple[str, dict[str, str]]:
        """The 429's message and headers for a client that must wait `wait_s`."""
        retry_after = max(1, math.ceil(wait_s))
        message = (f"too many tasks from this client: at most {self.burst} at once and "
                   f"{self.rate_per_s:g} per second after that (BATON_SUBMIT_BURST, "
                   f"BATON_SUBMIT_RATE_PER_S); submit again in {retry_after} s")
        return message, {"Retry-After": str(retry_after)}


@dataclass
class ViewerSlots:
    """At most `cap` live viewers at once; `take` says whether one more may watch."""

    cap: int
    in_use: int = 0

    def take(self) -> bool:
        if self.in_use >= self.cap:
            return False
        self.in_use += 1
        return True

    def give_back(self) -> None:
        self.in_use -= 1

    @property
    def refusal(self) -> str:
        """The close reason past the cap (a WebSocket close reason holds at most 123 bytes)."""
        return f"this gateway serves at most {self.cap} live viewers (BATON_MAX_VIEWERS); retry later"
