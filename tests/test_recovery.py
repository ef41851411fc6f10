"""Edge batches, and recovery that loses and doubles nothing after a kill."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import duckdb
import msgspec
import nats
import pytest
import ray
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from test_semantics_support import movement_totals

from actors.partition import PartitionActor
from actors.settings import StateSettings
from cluster.nats_server import EmbeddedNatsServer
from contracts.codec import decode_dead_letter
from contracts.keys import decode_key
from pipeline.ingest import (
    MANIFEST,
    CheckpointManifest,
    CheckpointMismatchError,
    Ingest,
    IngestReport,
    KeyChecker,
)
from pipeline.publish import publish_all
from pipeline.settings import PipelineSettings
from pipeline.sink import SnapshotWriter
from pipeline.sources.generated import Expected, StreamSpec, generate
from pipeline.streams import CHECKPOINT_BUCKET, ensure_streams
from pipeline.subjects import EVENTS_STREAM, POSTINGS_STREAM

pytestmark = pytest.mark.usefixtures("ray_local")


def _dlq_messages(server: EmbeddedNatsServer) -> list[Msg]:
    """Return the messages of the dead-letter stream, up to 10."""

    async def fetch() -> list[Msg]:
        nc = await nats.connect(server.url)
        try:
            sub = await nc.jetstream().pull_subscribe("plantstream.dlq.>")
            return await sub.fetch(10, timeout=5)
        finally:
            await nc.close()

    return asyncio.run(fetch())


SPEC = StreamSpec(plants=2, orders_per_plant=80, seed=5)
SETTINGS = PipelineSettings(fetch_batch=200, checkpoint_interval_s=0.3)

Fault = Callable[[Ingest, EmbeddedNatsServer], Awaitable[None]]


async def _run(
    server: EmbeddedNatsServer,
    db: Path,
    messages: list[tuple[str, bytes]],
    fault: Fault | None = None,
) -> tuple[IngestReport, Counter[str]]:
    nc = await nats.connect(
        server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )
    actors = [PartitionActor.remote(i) for i in range(2)]  # type: ignore[attr-defined]
    try:
        js = nc.jetstream()
        await ensure_streams(js, SETTINGS)
        await publish_all(nc, ((s, d, None) for s, d in messages))
        with SnapshotWriter(db) as writer:
            ingest = Ingest(nc, actors, writer, SETTINGS)
            await ingest.start()
            task = asyncio.create_task(ingest.run(until_drained=True))
            if fault is not None:
                await fault(ingest, server)
            report = await asyncio.wait_for(task, timeout=240)
            return report, await ingest.totals()
    finally:
        for actor in actors:
            ray.kill(actor)
        await nc.close()


async def _posting_keys(url: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(POSTINGS_STREAM)
        config = ConsumerConfig(ack_policy=AckPolicy.NONE)
        sub = await js.pull_subscribe(
            "erp.postings.>", stream=POSTINGS_STREAM, config=config
        )
        keys: list[str] = []
        while len(keys) < info.state.messages:
            keys.extend(
                (m.headers or {})["Nats-Msg-Id"]
                for m in await sub.fetch(1000, timeout=5)
            )
        return keys
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def stream() -> tuple[list[tuple[str, bytes]], Expected]:
    messages, expected = generate(SPEC)
    return [(m.subject, m.data) for m in messages], expected


def _edge_batches(
    messages: list[tuple[str, bytes]], size: int
) -> list[tuple[str, bytes]]:
    """Pack consecutive events of one plant into JSON arrays, as an edge buffer does."""
    batches: list[tuple[str, bytes]] = []
    pending: dict[str, list[bytes]] = {}
    for subject, data in messages:
        plant = subject.split(".")[2]
        pending.setdefault(plant, []).append(data)
        if len(pending[plant]) == size:
            batches.append(
                (f"plant.events.{plant}.batch", b"[" + b",".join(pending[plant]) + b"]")
            )
            pending[plant] = []
    for plant, rest in pending.items():
        if rest:
            batches.append(
                (f"plant.events.{plant}.batch", b"[" + b",".join(rest) + b"]")
            )
    return batches


def test_edge_batches_match_truth(
    nats_server: EmbeddedNatsServer, tmp_path: Path, stream: tuple[list, Expected]
) -> None:
    messages, expected = stream
    # Bad lines cannot sit inside a JSON array, so edge batches carry only valid JSON;
    # the other bad kinds stay in the batches.
    decodable = [(s, d) for s, d in messages if _is_json(d)]
    batches = _edge_batches(decodable, 50)
    batches.append(("plant.events.P01.batch", b'{"not": "an array"}'))
    _, totals = asyncio.run(_run(nats_server, tmp_path / "db.duckdb", batches))
    assert totals["applied"] == expected.events
    # A restarted nats-server redelivers what it had not recorded as acknowledged;
    # those redeliveries are dropped as duplicates on top of the stream's own.
    assert totals["duplicates"] >= expected.duplicates
    assert movement_totals(tmp_path / "db.duckdb") == expected.movements
    with duckdb.connect(str(tmp_path / "db.duckdb"), read_only=True) as connection:
        indexed = connection.execute(
            "SELECT count(*) FROM dead_letters WHERE batch_index >= 0"
        ).fetchone()
        whole = connection.execute(
            "SELECT count(*) FROM dead_letters WHERE batch_index = -1"
        ).fetchone()
    assert indexed is not None and indexed[0] > 0
    assert whole == (1,)


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


async def _kill_actor(ingest: Ingest, server: EmbeddedNatsServer) -> None:
    while ingest.report.batches < 5:
        await asyncio.sleep(0.01)
    ray.kill(ingest.actors[0], no_restart=False)


async def _kill_nats(ingest: Ingest, server: EmbeddedNatsServer) -> None:
    while ingest.report.batches < 5:
        await asyncio.sleep(0.01)
    server.kill()
    await asyncio.sleep(0.5)
    server.start()


@pytest.mark.parametrize(
    ("fault", "must_recover"),
    # The NATS client reconnects by itself. The ingest recovers only if a publish or an
    # ack fails during the outage, so a recovery is not required there.
    [(_kill_actor, True), (_kill_nats, False)],
    ids=["actor", "nats_server"],
)
def test_recovery_loses_and_doubles_nothing(
    fault: Fault,
    must_recover: bool,
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    stream: tuple[list, Expected],
) -> None:
    messages, expected = stream
    db = tmp_path / "db.duckdb"
    report, totals = asyncio.run(_run(nats_server, db, messages, fault))
    if must_recover:
        assert report.recoveries >= 1
    assert totals["applied"] == expected.events
    # A restarted nats-server redelivers what it had not recorded as acknowledged;
    # those redeliveries are dropped as duplicates on top of the stream's own.
    assert totals["duplicates"] >= expected.duplicates
    assert movement_totals(db) == expected.movements
    keys = asyncio.run(_posting_keys(nats_server.url))
    assert len(keys) == len(set(keys))
    with duckdb.connect(str(db), read_only=True) as connection:
        stored = connection.execute("SELECT count(*) FROM postings").fetchone()
    assert stored == (len(keys),)


def test_dead_letter_names_batch_position(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    good = b'{"event_type":"shipment_confirmed","event_id":"s1","plant":"P1",'
    good += b'"occurred_at":"2026-01-01T00:00:00Z","source":"wms","delivery":"D1",'
    good += b'"material":"FG","quantity":{"value":"1","uom":"EA"}}'
    naive = good.replace(b'"s1"', b'"s2"').replace(b"00Z", b"00")
    batch = b"[" + good + b"," + naive + b"]"
    asyncio.run(
        _run(nats_server, tmp_path / "db.duckdb", [("plant.events.P1.batch", batch)])
    )

    [letter] = [decode_dead_letter(m.data) for m in _dlq_messages(nats_server)]
    assert letter.batch_index == 1
    assert letter.event_id == "s2"
    assert letter.data == naive
    assert letter.stream_seq == 1


def test_plant_must_match_subject(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    event = b'{"event_type":"shipment_confirmed","event_id":"s1","plant":"P2",'
    event += b'"occurred_at":"2026-01-01T00:00:00Z","source":"wms","delivery":"D1",'
    event += b'"material":"FG","quantity":{"value":"1","uom":"EA"}}'
    _, totals = asyncio.run(
        _run(
            nats_server,
            tmp_path / "db.duckdb",
            [("plant.events.P1.shipment_confirmed", event)],
        )
    )
    assert totals["dead_letter:invalid"] == 1
    assert totals.get("applied", 0) == 0


_SHIPMENT = (
    b'{"event_type":"shipment_confirmed","event_id":"s1","plant":"P1",'
    b'"occurred_at":"2026-01-01T00:00:00Z","source":"wms","delivery":"D1",'
    b'"material":"FG","quantity":{"value":"1","uom":"EA"}}'
)
_MACHINE_STATE = (
    b'{"event_type":"machine_state_changed","event_id":"m1","plant":"P1",'
    b'"occurred_at":"2026-01-01T00:00:00Z","source":"mes","machine":"M1",'
    b'"state":"running"}'
)


def test_event_type_must_match_subject(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    subject = "plant.events.P1.shipment_confirmed"
    # The first event passes the check, so the second one meets the cached result of
    # its subject.
    _, totals = asyncio.run(
        _run(
            nats_server,
            tmp_path / "db.duckdb",
            [(subject, _SHIPMENT), (subject, _MACHINE_STATE)],
        )
    )
    assert totals["applied"] == 1
    assert totals["dead_letter:invalid"] == 1

    [letter] = [decode_dead_letter(m.data) for m in _dlq_messages(nats_server)]
    assert letter.stream_seq == 2
    assert subject in letter.detail
    assert "machine_state_changed" in letter.detail
    assert "publish it on plant.events.P1.machine_state_changed" in letter.detail
    assert letter.event_id == "m1"
    assert letter.plant == "P1"


@pytest.mark.parametrize(
    ("token", "event_type"),
    [
        ("material-consumed", "material-consumed"),
        ("material_consumed", "Material_consumed"),
        # As a file of one's own events publishes it: the subject matches the body.
        ("Machine_state_changed", "Machine_state_changed"),
    ],
)
def test_unknown_event_type_named(token: str, event_type: str) -> None:
    # Advice to publish on the type's own subject would name a subject of no type,
    # such as the one it came on.
    data = _MACHINE_STATE.replace(b"machine_state_changed", event_type.encode())
    with pytest.raises(ValueError, match=f"event_type '{event_type}' is not an event"):
        KeyChecker().check(f"plant.events.P1.{token}", data, decode_key(data), -1)


def test_long_batch_subject_not_edge_batch(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    batch = b"[" + _SHIPMENT + b"]"
    _, totals = asyncio.run(
        _run(
            nats_server,
            tmp_path / "db.duckdb",
            [("plant.events.P1.shipment_confirmed.batch", batch)],
        )
    )
    assert totals.get("applied", 0) == 0
    assert totals["dead_letter:invalid"] == 1


def test_edge_batch_mixes_event_types(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    batch = b"[" + _SHIPMENT + b"," + _MACHINE_STATE + b"]"
    _, totals = asyncio.run(
        _run(nats_server, tmp_path / "db.duckdb", [("plant.events.P1.batch", batch)])
    )
    assert totals["applied"] == 2
    assert totals.get("dead_letter:invalid", 0) == 0


def test_empty_edge_batch_counted(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    batches = [("plant.events.P1.batch", b"[]"), ("plant.events.P1.batch", b" [ ] ")]
    _, totals = asyncio.run(_run(nats_server, tmp_path / "db.duckdb", batches))
    assert totals["edge_batches_empty"] == 2
    assert totals.get("events_in", 0) == 0
    assert not any(key.startswith("dead_letter:") for key in totals)


def test_unreadable_checkpoint_stops_start(nats_server: EmbeddedNatsServer) -> None:
    async def start() -> None:
        nc = await nats.connect(nats_server.url)
        actors = [PartitionActor.remote(0)]  # type: ignore[attr-defined]
        try:
            js = nc.jetstream()
            await ensure_streams(js, SETTINGS)
            store = await js.object_store(CHECKPOINT_BUCKET)
            manifest = CheckpointManifest(stream_seq=5, partitions=1, written_at=0.0)
            await store.put("partition-0", b"\x93not a checkpoint")
            await store.put(MANIFEST, msgspec.json.encode(manifest))
            ingest = Ingest(nc, actors, None, SETTINGS)
            await asyncio.wait_for(ingest.start_with_retry(), timeout=60)
        finally:
            for actor in actors:
                ray.kill(actor)
            await nc.close()

    with pytest.raises(CheckpointMismatchError, match="plantstream-checkpoints"):
        asyncio.run(start())


def test_keyless_dead_letter_filed_under_subject_plant(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    asyncio.run(
        _run(
            nats_server,
            tmp_path / "db.duckdb",
            [("plant.events.P7.material_consumed", b"{not json")],
        )
    )

    assert [m.subject for m in _dlq_messages(nats_server)] == ["plantstream.dlq.P7"]


async def _drained_and_acked(js: nats.js.JetStreamContext, consumer: str) -> None:
    """Wait until the ingest consumer has nothing pending and nothing unacknowledged."""
    for _ in range(1200):
        info = await js.consumer_info(EVENTS_STREAM, consumer)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"consumer {consumer} still has messages after 120 s")


_WAITING_CONSUMPTION = (
    b'{"event_type":"material_consumed","event_id":"c1","plant":"P1",'
    b'"occurred_at":"2026-01-01T00:00:00Z","source":"mes","order":"NEVER",'
    b'"material":"RM","quantity":{"value":"1","uom":"KG"}}'
)


def test_idle_service_expires_parked_event(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    # Its order is never released, and no later message reaches the partitions.
    async def main() -> list[str]:
        nc = await nats.connect(nats_server.url)
        actors = [
            PartitionActor.remote(i, StateSettings(park_timeout_s=1))  # type: ignore[attr-defined]
            for i in range(2)
        ]
        try:
            js = nc.jetstream()
            await ensure_streams(js, SETTINGS)
            subject = "plant.events.P1.material_consumed"
            await publish_all(nc, [(subject, _WAITING_CONSUMPTION, None)])
            with SnapshotWriter(tmp_path / "db.duckdb") as writer:
                ingest = Ingest(nc, actors, writer, SETTINGS)
                await ingest.start()
                stop = asyncio.Event()
                task = asyncio.create_task(ingest.run(until_drained=False, stop=stop))
                # The first scan comes 5 s after an actor starts, and the first empty
                # batch 5 s after the last one.
                reasons: list[str] = []
                for _ in range(60):
                    await asyncio.sleep(0.5)
                    reasons = [
                        reason
                        for reason, count in ingest.report.counts.items()
                        if reason.startswith("dead_letter:") and count
                    ]
                    if reasons:
                        break
                stop.set()
                await asyncio.wait_for(task, timeout=60)
                return reasons
        finally:
            for actor in actors:
                ray.kill(actor)
            await nc.close()

    assert asyncio.run(main()) == ["dead_letter:parked_expired"]
    [letter] = [decode_dead_letter(m.data) for m in _dlq_messages(nats_server)]
    assert letter.event_id == "c1"


async def _run_with_idle_kill(
    server: EmbeddedNatsServer, db: Path, messages: list[tuple[str, bytes]]
) -> tuple[IngestReport, Counter[str]]:
    nc = await nats.connect(server.url)
    actors = [PartitionActor.remote(i) for i in range(2)]  # type: ignore[attr-defined]
    half = len(messages) // 2
    try:
        js = nc.jetstream()
        await ensure_streams(js, SETTINGS)
        await publish_all(nc, ((s, d, None) for s, d in messages[:half]))
        with SnapshotWriter(db) as writer:
            ingest = Ingest(nc, actors, writer, SETTINGS)
            await ingest.start()
            stop = asyncio.Event()
            task = asyncio.create_task(ingest.run(until_drained=False, stop=stop))
            await _drained_and_acked(js, SETTINGS.consumer)
            # Killed while it waits for work: no call fails, and Ray restarts it with
            # the constructor's empty state.
            before = await actors[0].pid.remote()
            ray.kill(actors[0], no_restart=False)
            for _ in range(600):
                try:
                    if await actors[0].pid.remote() != before:
                        break
                except ray.exceptions.RayActorError:
                    pass
                await asyncio.sleep(0.1)
            await publish_all(nc, ((s, d, None) for s, d in messages[half:]))
            await _drained_and_acked(js, SETTINGS.consumer)
            stop.set()
            report = await asyncio.wait_for(task, timeout=120)
            return report, await ingest.totals()
    finally:
        for actor in actors:
            ray.kill(actor)
        await nc.close()


def test_actor_restarted_while_idle_is_restored(
    nats_server: EmbeddedNatsServer, tmp_path: Path, stream: tuple[list, Expected]
) -> None:
    messages, expected = stream
    db = tmp_path / "db.duckdb"
    report, totals = asyncio.run(_run_with_idle_kill(nats_server, db, messages))
    # Without the restore token, the restarted actor applied the second half to an
    # empty state: its orders were unknown and its earlier events counted again.
    assert report.recoveries >= 1
    assert totals["applied"] == expected.events
    assert movement_totals(db) == expected.movements
    keys = asyncio.run(_posting_keys(nats_server.url))
    assert len(keys) == len(set(keys))


def test_stop_while_nats_down_ends_run(
    nats_server: EmbeddedNatsServer, stream: tuple[list[tuple[str, bytes]], Expected]
) -> None:
    # A stop must not wait for a server that may stay down: the run ends with what it
    # committed, and the next start processes the rest again.
    messages, _ = stream

    async def scenario() -> IngestReport:
        nc = await nats.connect(
            nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2
        )
        actors = [PartitionActor.remote(i) for i in range(2)]  # type: ignore[attr-defined]
        try:
            await ensure_streams(nc.jetstream(), SETTINGS)
            await publish_all(nc, ((s, d, None) for s, d in messages))
            ingest = Ingest(nc, actors, None, SETTINGS)
            await ingest.start()
            stop = asyncio.Event()
            task = asyncio.create_task(ingest.run(until_drained=False, stop=stop))
            async with asyncio.timeout(60):
                while ingest.report.committed_seq == 0:
                    await asyncio.sleep(0.01)
            # A graceful shutdown ends the open pull request, which starts a recovery
            # that then waits for the server.
            nats_server.stop()
            async with asyncio.timeout(60):
                while ingest.report.recoveries == 0:
                    await asyncio.sleep(0.05)
            stop.set()
            # Without the stop check, the recovery waits for as long as the server
            # stays down, and this times out.
            return await asyncio.wait_for(task, 60)
        finally:
            for actor in actors:
                ray.kill(actor)
            with contextlib.suppress(ConnectionError):
                await nc.close()

    report = asyncio.run(scenario())
    assert report.stop_error is not None
    assert report.stop_error.startswith("stopped while recovering from ")
