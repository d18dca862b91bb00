"""A durable pull consumer shared by a service's replicas, one replica pinned at a time.

JetStream's priority groups (nats-server 2.11+, ADR-42) do the coordination: the consumer is
created with the group `baton` and the `pinned_client` policy, every replica pulls as a member
of the group, and the server serves only the pinned replica's pulls (its messages carry the
`Nats-Pin-Id` it must send back). A pinned replica that stops pulling for `PIN_TIMEOUT_S` is
unpinned and the next puller is pinned: a dead replica's partition moves without any consensus
of ours.

This module speaks the JetStream API's JSON directly (nats-py 2.16 knows no priority groups):
consumer create/info and `CONSUMER.MSG.NEXT` requests with `group` and `id`, and the pull's
status messages. `tests/integration/test_pinned_pull.py` holds it to the pinned nats-server.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

log = logging.getLogger(__name__)

GROUP = "baton"
PIN_TIMEOUT_S = 6.0
"""A pinned replica silent this long (no pull) loses its partition to another."""
_API_TIMEOUT_S = 5.0
_ENDS_REQUEST = frozenset({"404", "408", "409"})
_PIN_MISMATCH = "423"  # This client's pin id is no longer the pinned one.


class ConsumerSetupError(RuntimeError):
    pass


class PinnedPull:
    """One replica's end of a durable consumer in the `baton` priority group."""

    def __init__(self, nc: Client, stream: str, durable: str) -> None:
        self.nc = nc
        self.stream = stream
        self.durable = durable
        self.pin_id = ""
        self.pin_changed = False  # Set when this client was (re)pinned; the reader clears it.
        self.pin_lost = False  # Set when the server said another client is pinned; the reader clears it.
        self.buffered: list[Msg] = []
        self._arrived = asyncio.Event()
        self._requesting = False
        self._owed = 0  # Messages the open request may still bring.
        self._open_until = 0.0  # When the open request ends at the latest (a lost one: a NATS restart).
        self._inbox = ""
        self._sub: Any = None

    async def bind(self, filter_subjects: list[str], *, ack_wait_s: float) -> dict[str, Any]:
        """Create (or update) the consumer and listen on this replica's inbox; returns its config."""
        config = {
            "durable_name": self.durable,
            "filter_subjects": filter_subjects,
            "ack_policy": "explicit",
            "deliver_policy": "all",
            "max_deliver": -1,  # Baton counts deliveries itself and dead-letters; the server never drops.
            "ack_wait": int(ack_wait_s * 1e9),
            "priority_groups": [GROUP],
            "priority_policy": "pinned_client",
            "priority_timeout": int(PIN_TIMEOUT_S * 1e9),
        }
        got = (await self._api(f"$JS.API.CONSUMER.CREATE.{self.stream}.{self.durable}",
                               {"stream_name": self.stream, "config": config}))["config"]
        kept = got.get("filter_subjects") or ([got["filter_subject"]] if got.get("filter_subject") else [])
        if sorted(kept) != sorted(filter_subjects) or got.get("priority_policy") != "pinned_client":
            # An older nats-server drops settings it does not know: check what it kept.
            raise ConsumerSetupError(f"consumer {self.durable} was created as {got}; Baton needs nats-server 2.11+")
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_message,
                                            pending_msgs_limit=0, pending_bytes_limit=0)
        return got

    async def pending_acks(self) -> int:
        """How many delivered messages of this consumer no replica has acknowledged yet."""
        return int((await self._info()).get("num_ack_pending", 0))

    async def pinned_here(self) -> bool | None:
        """Whether this client is the group's pinned one (True), another is (False), or none is
        (None: nothing was delivered since the last pin timed out)."""
        groups = [g for g in (await self._info()).get("priority_groups") or [] if g.get("group") == GROUP]
        pinned = groups[0].get("pinned_client_id") if groups else None
        if not pinned:
            return None
        return pinned == self.pin_id

    async def request(self, batch: int, *, expires_s: float) -> None:
        """Ask for up to `batch` messages: what the consumer has now, else the first one within
        `expires_s`. Does nothing while an earlier request is still open."""
        loop = asyncio.get_running_loop()
        if self._requesting and loop.time() < self._open_until:
            return
        body: dict[str, Any] = {"batch": batch, "expires": int(expires_s * 1e9), "no_wait": True, "group": GROUP}
        if self.pin_id:
            body["id"] = self.pin_id
        self._requesting, self._owed = True, batch
        self._open_until = loop.time() + expires_s + 1.0
        await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}",
                              json.dumps(body).encode(), reply=self._inbox)

    async def fetch(self, batch: int, *, timeout_s: float) -> list[Msg]:
        """What was delivered (asking for more if nothing is), within `timeout_s`; may be empty."""
        if not self.buffered:
            await self.request(batch, expires_s=max(timeout_s - 0.05, timeout_s / 2))
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout_s)
            except TimeoutError:
                pass
        messages, self.buffered = self.buffered[:batch], self.buffered[batch:]
        return messages

    async def _on_message(self, message: Msg) -> None:
        status = message.headers.get("Status") if message.headers else None
        if not status:
            pin = message.headers.get("Nats-Pin-Id") if message.headers else None
            if pin and pin != self.pin_id:
                self.pin_id, self.pin_changed = pin, True
            self.buffered.append(message)
            self._owed -= 1
            if self._owed <= 0:  # A request that got its whole batch ends without a status.
                self._requesting = False
        elif status == _PIN_MISMATCH:
            log.info("consumer %s: no longer pinned here", self.durable)
            self.pin_id, self.pin_lost = "", True
            self._requesting = False
        elif status in _ENDS_REQUEST:
            self._requesting = False
        elif status != "100":  # 100: flow control / heartbeat, nothing to do.
            log.warning("consumer %s: pull ended with %s %s", self.durable, status,
                        message.headers.get("Description"))
            self._requesting = False
        self._arrived.set()

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - closing: the connection may be gone already
                pass

    async def _info(self) -> dict[str, Any]:
        return await self._api(f"$JS.API.CONSUMER.INFO.{self.stream}.{self.durable}", None)

    async def _api(self, subject: str, body: dict[str, Any] | None) -> dict[str, Any]:
        reply = await self.nc.request(subject, json.dumps(body).encode() if body is not None else b"",
                                      timeout=_API_TIMEOUT_S)
        answer = json.loads(reply.data)
        if "error" in answer:
            nats.js.errors.APIError.from_error(answer["error"])  # Raises its kind (503: ServiceUnavailableError).
        return answer
