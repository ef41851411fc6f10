"""Dead letters too large to copy: kept by position, and retried from PLANT_EVENTS."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path

import nats
import pytest

from cluster.job import JobConfig, run_job
from cluster.nats_server import EmbeddedNatsServer
from cluster.operations import list_dead_letters, retry_dead_letters
from contracts.dead_letters import DeadLetter
from pipeline.ingest import DEAD_LETTER_LOG_FIRST, Ingest
from pipeline.settings import PipelineSettings
from pipeline.subjects import EVENTS_STREAM

pytestmark = pytest.mark.usefixtures("ray_local")

SUBJECT = "plant.events.P1.material_consumed"


async def _dead_letters(url: str) -> list:
    nc = await nats.connect(url)
    try:
        return await list_dead_letters(nc.jetstream())
    finally:
        await nc.close()


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


def test_hostile_json_becomes_dead_letters(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    deep = b"[" * 1000 + b"]" * 1000
    good = (
        b'{"event_type":"machine_state_changed","machine":"M1","state":"running",'
        b'"event_id":"E-GOOD","plant":"P1","occurred_at":"2026-01-05T08:00:00Z",'
        b'"source":"scada","work_center":"WC1"}'
    )
    huge_exponent = (
        b'{"event_type":"production_confirmed","event_id":"E-EXP","plant":"P1",'
        b'"occurred_at":"2026-01-05T08:00:00Z","source":"mes","order":"WO1",'
        b'"operation":"0010","work_center":"WC1",'
        b'"good":{"value":"1e9999999","uom":"EA"}}'
    )
    messages = [
        ("plant.events.P1.machine_state_changed", b'{"a":' + deep + b"}"),
        ("plant.events.P1.batch", b"[" + deep + b"]"),
        # Only the element nested too deeply is rejected, not the event beside it.
        (
            "plant.events.P1.batch",
            b'[{"a":' + deep + b"}," + good.replace(b"E-GOOD", b"E-GOOD-2") + b"]",
        ),
        ("plant.events.P1.production_confirmed", huge_exponent),
        ("plant.events.P1.machine_state_changed", good),
        # An event id near the server's max_payload, which the dead letter repeats.
        (
            "plant.events.P1.machine_state_changed",
            b'{"event_id":"' + b"A" * 1_040_000 + b'","event_type":'
            b'"machine_state_changed","plant":"P1"}',
        ),
    ]
    config = JobConfig(db=tmp_path / "db.duckdb", nats_url=nats_server.url)
    # Without the checks, the nesting stopped the run with a RecursionError, and the
    # exponent made a 10 MB detail that no NATS message could carry.
    result = asyncio.run(run_job(config, messages))
    assert result.totals["dead_letter:malformed"] == 2
    assert result.totals["dead_letter:invalid"] == 3
    assert result.totals["applied"] == 2

    found = {
        entry.letter.stream_seq: entry.letter
        for entry in asyncio.run(_dead_letters(nats_server.url))
    }
    details = {seq: letter.detail for seq, letter in found.items()}
    for seq in (1, 3):
        assert "JSON nested too deeply to decode" in details[seq]
    # Split by hand, the batch's one element is an array, not an event object.
    assert "must be one event object" in details[2]
    assert found[3].batch_index == 0
    assert "quantity 1E+9999999 has more than 15 digits" in details[4]
    assert max(len(detail) for detail in details.values()) < 1000
    # Without the cut, that dead letter exceeded max_payload and the run stopped.
    long_id = found[6].event_id
    assert long_id is not None
    assert long_id.endswith("characters cut)")


def test_nul_character_becomes_dead_letter(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    event = (
        b'{"event_type":"machine_state_changed","machine":"M1","state":"running",'
        b'"event_id":"E-1","plant":"P1","occurred_at":"2026-01-05T08:00:00Z",'
        b'"source":"scada","work_center":"WC1"}'
    )
    subject = "plant.events.P1.machine_state_changed"
    messages = [
        (subject, event.replace(b'"M1"', b'"M\\u00001"')),
        # An escaped backslash before the text u0000 is no NUL character.
        (subject, event.replace(b"E-1", b"E-2").replace(b"scada", b"C:\\\\u0000")),
    ]
    config = JobConfig(db=tmp_path / "db.duckdb", nats_url=nats_server.url)
    result = asyncio.run(run_job(config, messages))
    assert result.totals["dead_letter:invalid"] == 1
    assert result.totals["applied"] == 1

    [entry] = asyncio.run(_dead_letters(nats_server.url))
    assert entry.letter.event_id == "E-1"
    assert "field 'machine' contains a NUL character" in entry.letter.detail


def test_dead_letter_log_notes_sampling(
    nats_server: EmbeddedNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    # After the first few of a reason, only every 1,000th is logged at WARNING. The
    # log must note this once, or an operator takes the few for the whole count.
    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            ingest = Ingest(nc, [], None, PipelineSettings())
            for seq in range(1, DEAD_LETTER_LOG_FIRST + 3):
                ingest._log_dead_letter(
                    DeadLetter(
                        reason="malformed",
                        detail="cut short",
                        subject="plant.events.P01.order_released",
                        stream_seq=seq,
                        data=b"{",
                        rejected_at=dt.datetime.now(dt.UTC),
                    )
                )
        finally:
            await nc.close()

    with caplog.at_level(logging.WARNING, logger="pipeline.ingest"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == DEAD_LETTER_LOG_FIRST + 1
    assert warnings[-1].startswith("further dead letters of reason malformed")
