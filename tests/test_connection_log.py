"""Logging of a lost NATS connection, on a real nats-server stopped and started."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import nats.aio.client
import pytest

from cluster.connection_log import redact_url
from cluster.job import connect_nats
from cluster.nats_server import EmbeddedNatsServer

LOGGER = "cluster.connection_log"

OUTAGE_S = 3.0
"""Seconds each test keeps the server stopped, long enough for about six reconnect
attempts."""


async def _wait_connected(client: nats.aio.client.Client) -> None:
    deadline = time.monotonic() + 10
    while not client.is_connected:
        if time.monotonic() > deadline:
            raise TimeoutError("the NATS client did not reconnect within 10 s")
        await asyncio.sleep(0.05)


def _outage(server: EmbeddedNatsServer, summary_interval_s: float) -> float:
    """Connect, stop the server for OUTAGE_S, start it and return the outage in s."""

    async def run() -> float:
        client = await connect_nats(server.url, summary_interval_s=summary_interval_s)
        try:
            started = time.monotonic()
            server.stop()
            await asyncio.sleep(OUTAGE_S)
            server.start()
            await _wait_connected(client)
            return time.monotonic() - started
        finally:
            await client.close()

    return asyncio.run(run())


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == LOGGER and record.levelno == level
    ]


def test_outage_logs_loss_once(
    nats_server: EmbeddedNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    _outage(nats_server, summary_interval_s=30)

    warnings = _messages(caplog, logging.WARNING)
    infos = _messages(caplog, logging.INFO)
    attempts = [m for m in _messages(caplog, logging.DEBUG) if "attempt" in m]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"lost connection to NATS at {nats_server.url}")
    assert len(infos) == 1
    assert infos[0].startswith(f"reconnected to NATS at {nats_server.url}")
    # Each failed attempt is still logged at DEBUG, and a 3 s outage has several.
    assert len(attempts) >= 3


def test_long_outage_summary_rate_limited(
    nats_server: EmbeddedNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    interval_s = 1.0
    outage_s = _outage(nats_server, summary_interval_s=interval_s)

    summaries = [m for m in _messages(caplog, logging.WARNING) if m.startswith("still")]
    assert len(summaries) >= 2
    # Each summary comes at least interval_s after the WARNING before it.
    assert len(summaries) <= outage_s // interval_s
    assert "attempts" in summaries[0]
    assert len(_messages(caplog, logging.INFO)) == 1


def test_first_connect_waits_for_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = EmbeddedNatsServer(store_dir=tmp_path / "jetstream").start()
    server.stop()

    async def connect_late() -> None:
        connecting = asyncio.create_task(connect_nats(server.url))
        await asyncio.sleep(OUTAGE_S)
        server.start()
        client = await connecting
        await client.close()

    try:
        asyncio.run(connect_late())
    finally:
        server.stop()

    warnings = _messages(caplog, logging.WARNING)
    infos = _messages(caplog, logging.INFO)
    assert len(warnings) == 1
    assert warnings[0].startswith(f"cannot connect to NATS at {server.url}")
    assert len(infos) == 1
    assert infos[0].startswith(f"connected to NATS at {server.url}")


def test_close_logs_nothing(
    nats_server: EmbeddedNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def connect_and_close() -> None:
        client = await connect_nats(nats_server.url)
        await client.close()

    asyncio.run(connect_and_close())
    assert _messages(caplog, logging.WARNING) == []


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://user:secret@nats.example:4222", "nats://nats.example:4222"),
        ("tls://token@[::1]:4222", "tls://[::1]:4222"),
    ],
)
def test_redact_url_drops_credentials(url: str, logged: str) -> None:
    assert redact_url(url) == logged
