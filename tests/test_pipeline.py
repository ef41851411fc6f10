"""The whole job on a generated stream: real nats-server, Ray and DuckDB."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from decimal import Decimal
from pathlib import Path

import duckdb
import nats
import pytest
import ray
from nats.js.api import AckPolicy, ConsumerConfig

from actors.partition import PartitionActor
from cluster.job import (
    RAY_ARROW_SETTINGS,
    RAY_DIRECT_CALL_BYTES,
    JobConfig,
    JobResult,
    run_job,
)
from cluster.nats_server import EmbeddedNatsServer
from contracts.codec import decode_dead_letter, decode_posting
from pipeline.ingest import Ingest
from pipeline.publish import publish_all
from pipeline.settings import PipelineSettings
from pipeline.sources.generated import Expected, StreamSpec, generate
from pipeline.streams import ensure_streams
from pipeline.subjects import DLQ_STREAM, EVENTS_STREAM, POSTINGS_STREAM

pytestmark = pytest.mark.usefixtures("ray_local")

SPEC = StreamSpec(plants=2, orders_per_plant=60, seed=11)


async def _stream_messages(
    url: str, stream: str, subject: str
) -> list[nats.aio.msg.Msg]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        # No acks: an ephemeral reader stops at max_ack_pending if it has to ack.
        config = ConsumerConfig(ack_policy=AckPolicy.NONE)
        sub = await js.pull_subscribe(subject, stream=stream, config=config)
        out: list[nats.aio.msg.Msg] = []
        while len(out) < info.state.messages:
            out.extend(await sub.fetch(1000, timeout=5))
        return out
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def generated() -> tuple[list[tuple[str, bytes]], Expected]:
    messages, expected = generate(SPEC)
    return [(m.subject, m.data) for m in messages], expected


@pytest.fixture
def run(
    nats_server: EmbeddedNatsServer, tmp_path: Path, generated: tuple[list, Expected]
) -> JobResult:
    config = JobConfig(
        db=tmp_path / "out.duckdb",
        partitions=3,
        nats_url=nats_server.url,
        pipeline=PipelineSettings(fetch_batch=500, checkpoint_interval_s=0.5),
    )
    return asyncio.run(run_job(config, generated[0]))


def dead_letter_total(run: JobResult) -> int:
    return sum(v for k, v in run.totals.items() if k.startswith("dead_letter:"))


def posting_total(run: JobResult) -> int:
    return sum(v for k, v in run.totals.items() if k.startswith("posting:"))


def test_counts_match_truth(run: JobResult, generated: tuple[list, Expected]) -> None:
    expected = generated[1]
    # Exact totals: the report alone counts a batch again if a recovery replays it.
    counts = run.totals
    assert run.published == expected.messages
    assert counts["events_in"] == expected.messages
    assert counts["applied"] == expected.events
    assert counts["duplicates"] == expected.duplicates
    assert dead_letter_total(run) == expected.bad_total + expected.anomaly_total


def test_postings_match_truth(run: JobResult, generated: tuple[list, Expected]) -> None:
    with duckdb.connect(str(run.db), read_only=True) as db:
        rows = db.execute(
            "SELECT plant, material, movement_type, sum(quantity) FROM postings "
            "WHERE posting_type = 'goods_movement' GROUP BY ALL"
        ).fetchall()
    posted = {(plant, material, kind): total for plant, material, kind, total in rows}
    assert posted == generated[1].movements


def test_postings_stream_unique_keys(
    run: JobResult, nats_server: EmbeddedNatsServer
) -> None:
    messages = asyncio.run(
        _stream_messages(nats_server.url, POSTINGS_STREAM, "erp.postings.>")
    )
    keys = [m.headers["Nats-Msg-Id"] for m in messages if m.headers]
    assert len(keys) == len(messages)
    assert len(set(keys)) == len(keys)
    for message in messages[:50]:
        posting = decode_posting(message.data)
        assert posting.key == message.headers["Nats-Msg-Id"]  # type: ignore[index]
        assert message.subject == f"erp.postings.{posting.plant}"
    assert len(messages) == posting_total(run)


def test_dead_letters_keep_bytes_and_position(
    run: JobResult, nats_server: EmbeddedNatsServer
) -> None:
    letters = asyncio.run(
        _stream_messages(nats_server.url, DLQ_STREAM, "plantstream.dlq.>")
    )
    events = {
        m.metadata.sequence.stream: m
        for m in asyncio.run(
            _stream_messages(nats_server.url, EVENTS_STREAM, "plant.events.>")
        )
    }
    assert len(letters) == dead_letter_total(run)
    for message in letters:
        letter = decode_dead_letter(message.data)
        original = events[letter.stream_seq]
        assert letter.data == original.data
        assert letter.subject == original.subject
        assert letter.detail
    reasons = Counter(decode_dead_letter(m.data).reason for m in letters)
    assert set(reasons) == {"malformed", "invalid", "reused_id", "future_time"}


def test_snapshot_tables_filled(
    run: JobResult, generated: tuple[list, Expected]
) -> None:
    expected = generated[1]
    with duckdb.connect(str(run.db), read_only=True) as db:
        orders = dict(
            db.execute("SELECT plant, count(*) FROM orders GROUP BY plant").fetchall()
        )
        dead = db.execute("SELECT count(*) FROM dead_letters").fetchone()
        oee = db.execute("SELECT min(oee), max(oee), count(*) FROM oee").fetchone()
        parked = db.execute(
            "SELECT count(*) FROM parked_events WHERE status='parked'"
        ).fetchone()
    assert orders == dict(expected.orders)
    assert dead == (expected.bad_total + expected.anomaly_total,)
    assert oee is not None
    assert 0 <= oee[0] <= oee[1] <= 1
    assert oee[2] == SPEC.plants * SPEC.machines_per_plant
    assert parked == (0,)


def test_consumer_fully_acked(run: JobResult, nats_server: EmbeddedNatsServer) -> None:
    async def info() -> tuple[int, int]:
        nc = await nats.connect(nats_server.url)
        try:
            consumer = await nc.jetstream().consumer_info(
                EVENTS_STREAM, "plantstream-ingest"
            )
            return consumer.num_pending, consumer.num_ack_pending
        finally:
            await nc.close()

    assert asyncio.run(info()) == (0, 0)


def test_rerun_adds_nothing(
    run: JobResult, nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    """A second run resumes from the checkpoint and posts nothing new."""
    config = JobConfig(
        db=tmp_path / "out.duckdb", partitions=3, nats_url=nats_server.url
    )
    again = asyncio.run(run_job(config, None))
    assert again.report.counts["events_in"] == 0
    with duckdb.connect(str(run.db), read_only=True) as db:
        total = db.execute("SELECT count(*) FROM postings").fetchone()
    assert total == (posting_total(run),)


def test_quantities_exact(run: JobResult) -> None:
    with duckdb.connect(str(run.db), read_only=True) as db:
        kinds = db.execute(
            "SELECT DISTINCT typeof(quantity) FROM postings WHERE quantity IS NOT NULL"
        ).fetchall()
        sample = db.execute(
            "SELECT quantity FROM postings WHERE movement_type='261'"
        ).fetchone()
    assert kinds == [("DECIMAL(38,9)",)]
    assert sample is not None
    assert isinstance(sample[0], Decimal)


def test_local_ray_actors_get_transfer_settings() -> None:
    names = ("RAY_max_direct_call_object_size", *RAY_ARROW_SETTINGS)
    actor = PartitionActor.remote(0)  # type: ignore[attr-defined]
    try:
        # A lambda, because Ray's workers cannot import this test module by name.
        seen = ray.get(
            actor.__ray_call__.remote(
                lambda _: {name: os.environ.get(name) for name in names}
            )
        )
    finally:
        ray.kill(actor)
    # Set by connect_ray for a local Ray, whose workers inherit the driver's variables.
    assert seen["RAY_max_direct_call_object_size"] == str(RAY_DIRECT_CALL_BYTES)
    assert seen["RAY_DISABLE_CUSTOM_ARROW_DATA_SERIALIZATION"] == "1"


def test_quiet_stream_posts_before_next_message(
    nats_server: EmbeddedNatsServer, generated: tuple[list, Expected]
) -> None:
    # A few events and then nothing. The fetch waits up to fetch_timeout_s for more,
    # and the postings of the events already applied must not wait with it.
    settings = PipelineSettings(fetch_timeout_s=120.0, checkpoint_interval_s=3600)

    async def scenario() -> int:
        nc = await nats.connect(nats_server.url)
        actors = [PartitionActor.remote(0)]  # type: ignore[attr-defined]
        try:
            js = nc.jetstream()
            await ensure_streams(js, settings)
            await publish_all(nc, [(s, d, None) for s, d in generated[0][:300]])
            ingest = Ingest(nc, actors, None, settings)
            await ingest.start()
            running = asyncio.create_task(ingest.run(until_drained=False))
            try:
                async with asyncio.timeout(30):
                    while not (await js.stream_info(POSTINGS_STREAM)).state.messages:
                        await asyncio.sleep(0.1)
                return (await js.stream_info(POSTINGS_STREAM)).state.messages
            finally:
                # A stop would wait for the fetch to time out first.
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
        finally:
            ray.kill(actors[0])
            await nc.close()

    assert asyncio.run(scenario()) > 0
