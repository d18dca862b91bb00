"""The watchdog protocol (systemd's sd_notify `WATCHDOG=1`) between a service and `baton up`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from services.cli.data_dir_processes import process_state
from services.runtime.watchdog import WatchdogListener, watchdog_interval_s
from tests.support.waiting import wait_for

FEEDER = "import asyncio; from services.runtime.watchdog import feed_watchdog; asyncio.run(feed_watchdog())"


@pytest.fixture
def listener() -> Iterator[WatchdogListener]:
    watchdog = WatchdogListener(0.4)
    try:
        yield watchdog
    finally:
        watchdog.close()


def test_a_process_is_watched_only_with_a_socket_and_an_interval_meant_for_it():
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"NOTIFY_SOCKET": "@x"}) is None
    assert watchdog_interval_s({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2500000"}) == 2.5
    # systemd names the process the interval is for: a child of it is not watched.
    assert watchdog_interval_s({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2500000",
                                "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval_s({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2500000",
                                "WATCHDOG_PID": str(os.getpid())}) == 2.5


def test_pings_are_told_apart_by_their_sender_and_stop_when_the_sender_is_stopped(listener: WatchdogListener):
    env = {**os.environ, **listener.env()}
    feeder = subprocess.Popen([sys.executable, "-c", FEEDER], env=env)
    try:
        heard: list[int] = []
        wait_for(lambda: heard.extend(listener.senders()) or feeder.pid in heard, timeout_s=30,
                 what="a ping from the feeder")
        assert set(heard) == {feeder.pid}  # The kernel's word for who sent it, not the message's.
        os.kill(feeder.pid, signal.SIGSTOP)
        wait_for(lambda: (process_state(feeder.pid) or ("",))[0] == "T", timeout_s=30, what="the feeder stopped")
        listener.senders()  # What it sent before it stopped.
        time.sleep(1.0)  # The window watched: 2.5 intervals, in which a running feeder pings ~10 times.
        assert listener.senders() == []
        os.kill(feeder.pid, signal.SIGCONT)
        wait_for(lambda: feeder.pid in listener.senders(), timeout_s=30, what="pings again once resumed")
    finally:
        feeder.kill()
        feeder.wait()


def test_the_socket_is_a_private_file_not_a_name_anyone_on_the_host_can_reach():
    watchdog = WatchdogListener(10.0)
    try:
        path = watchdog.env()["NOTIFY_SOCKET"]
        assert not path.startswith("@")  # The abstract namespace: listed and open to every process.
        assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    finally:
        watchdog.close()
    assert not os.path.exists(os.path.dirname(path))  # Closed: nothing left behind.
