"""Nothing jams the pipeline: an agent's 2 MiB line travels in pieces and its task completes; the
event stream keeps only what its configured limits allow."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from events import STREAM
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.processes import BatonStack, running_stack

pytestmark = pytest.mark.capability

STREAM_MAX_BYTES = 512 * 1024**2
STREAM_MAX_AGE_S = 7 * 24 * 3600.0
OUTPUT_PIECE_BYTES = 64 * 1024
LINE_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def limited_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    """A stack whose event stream is configured smaller and shorter-lived than the defaults."""
    env = {"BATON_STREAM_MAX_BYTES": str(STREAM_MAX_BYTES), "BATON_STREAM_MAX_AGE_S": str(STREAM_MAX_AGE_S)}
    with running_stack(tmp_path_factory.mktemp("limited"), env=env) as running:
        yield running


@pytest.fixture(scope="module")
def limited_api(limited_stack: BatonStack) -> Api:
    return Api(limited_stack.api, limited_stack.token)


def lines_of(outputs: list[dict], stream: str) -> list[str]:
    """A stream's lines as a viewer shows them: pieces marked `continues` joined to the next."""
    lines, pending = [], ""
    for output in outputs:
        if output["data"]["stream"] == stream:
            pending += output["data"]["text"]
            if not output["data"]["continues"]:
                lines.append(pending)
                pending = ""
    return lines + ([pending] if pending else [])


def test_an_agent_printing_a_2_mib_line_completes_with_the_line_intact_across_its_pieces(
    limited_api: Api, origin: Path
):
    nonce = secrets.token_hex(8)
    # One line of 2 MiB, far over NATS's 1 MB payload limit, then a line after it.
    prompt = f"head -c {LINE_BYTES} /dev/zero | tr '\\0' x; echo\necho after {nonce}"
    task = limited_api.submit(repo=origin.as_uri(), prompt=prompt, agent="shell")

    events = assert_flow_completes(limited_api, task["task_id"], timeout_s=120)

    outputs = [e for e in events if e["type"] == "AgentOutput"]
    assert [o["data"]["seq"] for o in outputs] == list(range(1, len(outputs) + 1))
    # Each piece fits the bus; joined by `continues`, the line is whole, then the next line.
    assert all(len(o["data"]["text"].encode()) <= OUTPUT_PIECE_BYTES for o in outputs)
    assert lines_of(outputs, "stdout") == ["x" * LINE_BYTES + "\n", f"after {nonce}\n"]
    assert len(outputs) > LINE_BYTES // OUTPUT_PIECE_BYTES


async def read_stream_config(url: str, credentials: str):
    nc = await nats.connect(url, user_credentials=credentials)
    try:
        return (await nc.jetstream().stream_info(STREAM)).config, nc.max_payload
    finally:
        await nc.close()


def test_the_event_stream_has_the_configured_size_and_age_limits_and_the_bus_message_cap(
    limited_stack: BatonStack, limited_api: Api
):
    assert limited_api.http.get("/api/health").status_code == 200
    config, max_payload = asyncio.run(read_stream_config(limited_stack.nats.url, limited_stack.nats_credentials()))
    assert config.max_bytes == STREAM_MAX_BYTES
    assert config.max_age == STREAM_MAX_AGE_S
    assert config.max_msg_size == max_payload
