"""Dead letters too large to copy: kept by position, and retried from PLANT_EVENTS."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from cluster.job import JobConfig, run_job
from cluster.nats_server import EmbeddedNatsServer
from cluster.operations import list_dead_letters, retry_dead_letters
from pipeline.subjects import EVENTS_STREAM

pytestmark = pytest.mark.usefixtures("ray_local")

SUBJECT = "plant.events.P1.material_consumed"


def test_oversized_dead_letter_retried(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    # Not JSON, and so large that its base64 copy cannot fit in one NATS message.
    huge = b"x" * 800_000
    config = JobConfig(db=tmp_path / "db.duckdb", nats_url=nats_server.url)
    result = asyncio.run(run_job(config, [(SUBJECT, huge)]))
    assert result.totals["dead_letter:malformed"] == 1

    async def list_and_retry() -> tuple[list, bytes]:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            entries = await list_dead_letters(js)
            records = await retry_dead_letters(js, entries)
            republished = await js.get_msg(EVENTS_STREAM, records[0].republished_seq)
            return entries, republished.data or b""
        finally:
            await nc.close()

    entries, republished = asyncio.run(list_and_retry())
    [entry] = entries
    assert entry.letter.data_omitted is True
    assert entry.letter.data == b""
    assert entry.letter.stream_seq == 1
    assert republished == huge
