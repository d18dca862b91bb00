"""Creating the event stream on a cluster whose JetStream servers are not all there yet (one still
joining, or down): tried again while the cluster may still form, then a clear error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from nats.js.api import StreamConfig
from nats.js.errors import APIError, NotFoundError

from services.runtime import bus
from services.runtime.bus import StreamLimits, StreamSetupError, ensure_stream


class FormingCluster:
    """The JetStream API of a single server that cannot place copies `refusals` times at first."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.streams: dict[str, StreamConfig] = {}

    async def stream_info(self, name: str):
        if name not in self.streams:
            raise NotFoundError(code=404, err_code=10059, description="stream not found")
        return SimpleNamespace(config=self.streams[name], cluster=None)

    async def add_stream(self, config: StreamConfig):
        if self.refusals:
            self.refusals -= 1
            raise APIError(code=400, err_code=10005, description="no suitable peers for placement")
        self.streams[config.name] = config
        return SimpleNamespace(config=config)

    update_stream = add_stream


async def test_a_stream_is_created_once_the_cluster_can_place_it():
    js = FormingCluster(refusals=3)
    await ensure_stream(js, limits=StreamLimits(replicas=1))
    assert set(js.streams) == {bus.STREAM, bus.DEAD_LETTER_STREAM} and js.refusals == 0


async def test_a_stream_that_cannot_be_placed_in_time_says_to_bring_the_servers_up(monkeypatch):
    monkeypatch.setattr(bus, "ELECTION_WAIT_S", 0.0)
    with pytest.raises(StreamSetupError) as refused:
        await ensure_stream(FormingCluster(refusals=10**6), limits=StreamLimits(replicas=1))
    assert "no suitable peers for placement" in str(refused.value)
    assert "are all of the cluster's JetStream servers up?" in str(refused.value)
