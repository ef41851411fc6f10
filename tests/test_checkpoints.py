"""Checkpoints as orders bases and deltas in the object store, restored by a new run."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import nats
import pytest
import ray

import pipeline.ingest as ingest_module
from actors.partition import PartitionActor, PartitionCheckpoint
from actors.partition_state import OrdersCheckpoint, PartitionState, SourceMessage
from cluster.job import JobResult
from cluster.nats_server import EmbeddedNatsServer
from cluster.summary import format_summary
from pipeline.checkpoints import (
    MANIFEST,
    MAX_DELTAS,
    CheckpointMismatchError,
    read_manifest,
    read_partitions,
)
from pipeline.ingest import Ingest, IngestReport, StartStoppedError, brief_error
from pipeline.publish import publish_all
from pipeline.settings import PipelineSettings
from pipeline.sink import SinkError, SnapshotWriter
from pipeline.sources.generated import StreamSpec, generate
from pipeline.streams import CHECKPOINT_BUCKET, ensure_streams
from pipeline.subjects import EVENTS_STREAM

pytestmark = pytest.mark.usefixtures("ray_local")

SPEC = StreamSpec(plants=2, orders_per_plant=40, seed=11)
SETTINGS = PipelineSettings(fetch_batch=50, checkpoint_interval_s=0.02)
"""Small fetches and a short interval, so the run writes many checkpoints."""

LATE = 12
"""Events held back for the second run."""

OBJECT_NAME = re.compile(r"manifest|partition-[01]-(state-[ab]|orders-[ab]-\d+)")


def _orders(part: bytes) -> OrdersCheckpoint:
    return msgspec.msgpack.decode(part, type=OrdersCheckpoint)


async def _publish(
    nc: nats.NATS, settings: PipelineSettings, count: int | None = None
) -> list[tuple[str, bytes, None]]:
    """Create the streams and publish the first `count` events of SPEC; return all."""
    await ensure_streams(nc.jetstream(), settings)
    events = [(m.subject, m.data, None) for m in generate(SPEC)[0]]
    await publish_all(nc, events[:count])
    return events


async def _committed_seq(nc: nats.NATS) -> int:
    """Return the stream sequence that the committed manifest covers."""
    store = await nc.jetstream().object_store(CHECKPOINT_BUCKET)
    manifest = await read_manifest(store)
    assert manifest is not None
    return manifest.stream_seq


def test_restart_restores_base_and_deltas(
    nats_server: EmbeddedNatsServer,
) -> None:
    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        runs = [[PartitionActor.remote(i) for i in range(2)] for _ in range(3)]  # type: ignore[attr-defined]
        try:
            js = nc.jetstream()
            events = await _publish(nc, SETTINGS, -LATE)
            first = Ingest(nc, runs[0], None, SETTINGS)
            await first.start()
            assert (await first.run(until_drained=True)).checkpoints >= 5
            # The first run never restored, so its orders do not depend on the code
            # under test. Nothing in this short stream is old enough to be evicted.
            applied: list[PartitionCheckpoint] = await asyncio.gather(
                *(actor.checkpoint.remote(True) for actor in runs[0])
            )

            # The late events change a few orders, so the second run's last
            # checkpoint is a delta on top of a base it restored from the store.
            await publish_all(nc, events[-LATE:])
            second = Ingest(nc, runs[1], None, SETTINGS)
            await second.start()
            await second.run(until_drained=True)
            store = await js.object_store(CHECKPOINT_BUCKET)
            manifest = await read_manifest(store)
            assert manifest is not None
            assert max(len(objects.orders) for objects in manifest.objects) > 1
            names = {info.name for info in await store.list(ignore_deletes=True)}
            assert all(OBJECT_NAME.fullmatch(name) for name in names), names
            assert len(names) <= 1 + 2 * 2 * (2 + MAX_DELTAS)

            # The second run's actors hold the state of the last checkpoint; a full
            # checkpoint of it is what the chain in the store must rebuild.
            truth: list[PartitionCheckpoint] = await asyncio.gather(
                *(actor.checkpoint.remote(True) for actor in runs[1])
            )
            saved = await read_partitions(store, manifest)
            for partition, expected in zip(saved, truth, strict=True):
                rebuilt = PartitionState.restore(
                    partition.state, None, partition.orders
                )
                state_part, orders_part = rebuilt.checkpoint_parts(base=True)
                assert state_part == expected.state
                assert _orders(orders_part).orders == _orders(expected.orders).orders
            for before, after in zip(applied, truth, strict=True):
                assert _orders(before.orders).orders.keys() <= (
                    _orders(after.orders).orders.keys()
                )

            third = Ingest(nc, runs[2], None, SETTINGS)
            assert await third.start() == manifest.stream_seq
            assert await third.partition_stats() == await second.partition_stats()
        finally:
            for actor in [actor for run in runs for actor in run]:
                ray.kill(actor)
            await nc.close()

    asyncio.run(scenario())


def test_partition_count_changed_between_runs(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    # Two partitions, then three, then one, each run on a third of the stream: each
    # splits the checkpoint it finds. The result must match one state that applied
    # the whole stream.
    db = tmp_path / "runs.duckdb"
    truth = PartitionState(0)
    truth_keys: set[str] = set()

    async def scenario() -> list[Counter[str]]:
        nc = await nats.connect(nats_server.url)
        runs = [[PartitionActor.remote(i) for i in range(n)] for n in (2, 3, 1)]  # type: ignore[attr-defined]
        totals: list[Counter[str]] = []
        try:
            events = await _publish(nc, SETTINGS, 0)
            for start in range(0, len(events), 50):
                batch = [
                    SourceMessage(seq, subject, data)
                    for seq, (subject, data, _) in enumerate(
                        events[start : start + 50], start=start + 1
                    )
                ]
                truth_keys.update(p.key for p in truth.apply_batch(batch).postings)
            third = len(events) // 3
            with SnapshotWriter(db) as writer:
                for index, actors in enumerate(runs):
                    end = len(events) if index == 2 else third * (index + 1)
                    await publish_all(nc, events[third * index : end])
                    ingest = Ingest(nc, actors, writer, SETTINGS)
                    await ingest.start()
                    await ingest.run(until_drained=True)
                    totals.append(await ingest.totals())
            store = await nc.jetstream().object_store(CHECKPOINT_BUCKET)
            manifest = await read_manifest(store)
            assert manifest is not None and manifest.partitions == 1
            names = {info.name for info in await store.list(ignore_deletes=True)}
            assert {name.split("-")[1] for name in names - {MANIFEST}} == {"0"}
        finally:
            for actor in [actor for run in runs for actor in run]:
                ray.kill(actor)
            await nc.close()
        return totals

    totals = asyncio.run(scenario())

    for name in ("applied", "duplicates", "parked", "unparked"):
        assert totals[-1][name] == truth.counts[name], name
    with duckdb.connect(str(db), read_only=True) as connection:
        postings = connection.execute("SELECT key FROM postings").fetchall()
        orders = connection.execute("SELECT count(*) FROM orders").fetchall()
        clock_partitions = connection.execute(
            "SELECT DISTINCT partition FROM plant_clocks"
        ).fetchall()
    assert {key for (key,) in postings} == truth_keys
    assert orders == [(len(truth.orders),)]
    assert clock_partitions == [(0,)]


def test_damaged_checkpoint_named_at_start(nats_server: EmbeddedNatsServer) -> None:
    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        actors = [PartitionActor.remote(i) for i in range(2)]  # type: ignore[attr-defined]
        extra = PartitionActor.remote(2)  # type: ignore[attr-defined]
        try:
            js = nc.jetstream()
            await _publish(nc, SETTINGS, 300)
            ingest = Ingest(nc, actors, None, SETTINGS)
            await ingest.start()
            await ingest.run(until_drained=True)
            store = await js.object_store(CHECKPOINT_BUCKET)
            manifest = await read_manifest(store)
            assert manifest is not None
            objects = manifest.objects[0]

            async def start_error() -> str:
                with pytest.raises(CheckpointMismatchError) as caught:
                    await Ingest(nc, actors, None, SETTINGS).start()
                return str(caught.value)

            async def replaced(name: str, data: bytes) -> str:
                original = (await store.get(name)).data or b""
                await store.put(name, data)
                try:
                    return await start_error()
                finally:
                    await store.put(name, original)

            # Same size, other bytes: only the digest shows the change.
            orders = (await store.get(objects.orders[0])).data or b""
            message = await replaced(objects.orders[0], orders[:-1] + b"\0")
            assert f"{objects.orders[0]} has digest" in message
            assert "replaced after the checkpoint" in message
            # The stored chunks changed under the object: only nats-py's own digest
            # check on reading finds it.
            info = await store.get_info(objects.orders[0])
            chunks = f"$O.{CHECKPOINT_BUCKET}.C.{info.nuid}"
            await js.purge_stream(f"OBJ_{CHECKPOINT_BUCKET}", subject=chunks)
            await js.publish(chunks, orders[:-1] + b"\0")
            message = await start_error()
            assert f"{objects.orders[0]} in the object store bucket" in message
            assert "does not match its own digest" in message
            await store.put(objects.orders[0], orders)
            manifest = await read_manifest(store)
            assert manifest is not None
            objects = manifest.objects[0]
            message = await replaced(MANIFEST, b"{not json")
            assert "manifest cannot be read" in message
            short = msgspec.structs.replace(
                manifest,
                objects=[
                    msgspec.structs.replace(objects, sizes=[]),
                    *manifest.objects[1:],
                ],
            )
            message = await replaced(MANIFEST, msgspec.json.encode(short))
            assert "manifest is invalid: partition 0 has" in message
            # Without digests (a manifest of the first chained format), a damaged
            # object is found when the partition decodes it.
            bare = msgspec.structs.replace(
                manifest,
                objects=[
                    msgspec.structs.replace(o, digests=[]) for o in manifest.objects
                ],
            )
            state = (await store.get(objects.state)).data or b""
            await store.put(MANIFEST, msgspec.json.encode(bare))
            await store.put(objects.state, b"\x93junk")
            message = await start_error()
            assert f"partition 0, object {objects.state}: " in message
            assert objects.orders[0] not in message
            assert "damaged" in message
            await store.put(objects.state, state)
            # A run with another partition count names the stored partition whose
            # object failed, not the actor that read it.
            other = manifest.objects[1]
            other_state = (await store.get(other.state)).data or b""
            await store.put(other.state, b"\x93junk")
            with pytest.raises(CheckpointMismatchError) as caught:
                await Ingest(nc, [*actors, extra], None, SETTINGS).start()
            assert f"partition 1, object {other.state}: " in str(caught.value)
            await store.put(other.state, other_state)
            last = objects.orders[-1]
            delta = (await store.get(last)).data or b""
            # Of the recorded size, so that only decoding finds the damage.
            await store.put(last, b"\x93junk".ljust(len(delta), b"\0"))
            message = await start_error()
            assert f"partition 0, object {last}: " in message
            assert objects.state not in message
            await store.put(last, delta)
            # Put back whole, the same checkpoint restores again.
            restarted = Ingest(nc, actors, None, SETTINGS)
            assert await restarted.start() == manifest.stream_seq
        finally:
            for actor in [*actors, extra]:
                ray.kill(actor)
            await nc.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("ending", ["stop", "drained"])
def test_last_checkpoint_committed_at_end(
    nats_server: EmbeddedNatsServer, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    # No checkpoint falls due during the run, so only the last one can commit. Its
    # commit is deferred for longer than the test, so the run must end that wait.
    monkeypatch.setattr(ingest_module, "COMMIT_DEFER_S", 600.0)
    settings = PipelineSettings(fetch_batch=50, checkpoint_interval_s=3600)

    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        actors = [PartitionActor.remote(i) for i in range(2)]  # type: ignore[attr-defined]
        try:
            published = 200
            await _publish(nc, settings, published)
            ingest = Ingest(nc, actors, None, settings)
            await ingest.start()
            if ending == "drained":
                report = await asyncio.wait_for(ingest.run(until_drained=True), 60)
                assert report.checkpoints == 1
            else:
                stop = asyncio.Event()
                task = asyncio.create_task(ingest.run(until_drained=False, stop=stop))
                async with asyncio.timeout(60):
                    while ingest.report.counts["events_in"] < published:
                        await asyncio.sleep(0.05)
                stop.set()
                await asyncio.wait_for(task, 60)
            assert await _committed_seq(nc) == published
        finally:
            for actor in actors:
                ray.kill(actor)
            await nc.close()

    asyncio.run(scenario())


def test_failed_stop_checkpoint_reported(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    # A partition dies just before the stop, so the checkpoint on stop fails. The run
    # must still end, say where the next start resumes, and mark its summary partial.
    settings = PipelineSettings(fetch_batch=50, checkpoint_interval_s=3600)

    async def scenario() -> IngestReport:
        nc = await nats.connect(nats_server.url)
        actors = [PartitionActor.remote(i) for i in range(2)]  # type: ignore[attr-defined]
        try:
            events = await _publish(nc, settings, 100)
            first = Ingest(nc, actors, None, settings)
            await first.start()
            await asyncio.wait_for(first.run(until_drained=True), 60)
            await publish_all(nc, events[100:200])
            ingest = Ingest(nc, actors, None, settings)
            await ingest.start()
            assert ingest.report.committed_seq == 100
            stop = asyncio.Event()
            task = asyncio.create_task(ingest.run(until_drained=False, stop=stop))
            async with asyncio.timeout(60):
                while ingest.report.counts["events_in"] < 100:
                    await asyncio.sleep(0.05)
            ray.kill(actors[0], no_restart=True)
            stop.set()
            report = await asyncio.wait_for(task, 60)
            assert await _committed_seq(nc) == 100
            return report
        finally:
            for actor in actors:
                ray.kill(actor)
            await nc.close()

    report = asyncio.run(scenario())
    assert report.stop_error is not None
    assert "\n" not in report.stop_error
    assert "\x1b" not in report.stop_error
    assert report.committed_seq == 100
    db = tmp_path / "db.duckdb"
    with SnapshotWriter(db):
        pass
    summary = format_summary(JobResult(report, Counter(), 0, [], db), db)
    assert "incomplete: the checkpoint on stop failed" in summary
    assert "through stream sequence 100 and processes" in summary


def test_totals_skip_partition_restarted_while_idle(
    nats_server: EmbeddedNatsServer,
) -> None:
    # Ray restarts a partition killed while the stream is quiet, so nothing notices
    # before the stop. Its empty state must not pass for its counts.
    settings = PipelineSettings(fetch_batch=50, checkpoint_interval_s=0.2)

    async def scenario() -> tuple[IngestReport, Counter[str], int]:
        nc = await nats.connect(nats_server.url)
        actors = [PartitionActor.remote(i) for i in range(2)]  # type: ignore[attr-defined]
        try:
            await _publish(nc, settings, 100)
            ingest = Ingest(nc, actors, None, settings)
            await ingest.start()
            stop = asyncio.Event()
            task = asyncio.create_task(ingest.run(until_drained=False, stop=stop))
            async with asyncio.timeout(60):
                while ingest.report.committed_seq < 100:
                    await asyncio.sleep(0.05)
            whole = await ingest.totals()
            ray.kill(actors[0], no_restart=False)
            stop.set()
            report = await asyncio.wait_for(task, 60)
            partial = await ingest.totals()
            assert ingest.report.stop_error is not None
            return report, partial, whole["events_in"]
        finally:
            for actor in actors:
                ray.kill(actor)
            await nc.close()

    report, partial, events_in = asyncio.run(scenario())
    assert report.stop_error is not None
    # Restarting or restarted: either way the empty state is found.
    assert report.stop_error in {
        f"partition 0 returned no counts ({name}), because Ray restarted it after "
        "the last checkpoint or it is unavailable"
        for name in ("PartitionRestartedError", "ActorUnavailableError")
    }
    assert 0 < partial["events_in"] < events_in


def test_commit_deferral_waits_until_hurried(
    nats_server: EmbeddedNatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = PipelineSettings(checkpoint_interval_s=3600)

    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            ingest = Ingest(nc, [], None, settings)
            monkeypatch.setattr(ingest_module, "COMMIT_DEFER_S", 0.2)
            started = time.monotonic()
            await ingest._defer_commit()
            assert time.monotonic() - started >= 0.2

            monkeypatch.setattr(ingest_module, "COMMIT_DEFER_S", 600.0)
            deferred = asyncio.create_task(ingest._defer_commit())
            await asyncio.sleep(0.1)
            assert not deferred.done()
            ingest._hurry_commit()
            await asyncio.wait_for(deferred, 5)
            # Hurried before it starts, the next wait is skipped altogether.
            await asyncio.wait_for(ingest._defer_commit(), 5)
        finally:
            await nc.close()

    asyncio.run(scenario())


class _FailingWriter(SnapshotWriter):
    """A snapshot writer whose writes fail while `failing` is set."""

    failing = False

    def write(
        self,
        tables: Mapping[str, Any],
        *,
        through_seq: int | None = None,
        partitions: int | None = None,
    ) -> None:
        if self.failing:
            raise SinkError(f"write to {self.path} failed on purpose")
        super().write(tables, through_seq=through_seq, partitions=partitions)


def test_failed_commit_recovered_while_idle(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    # The commit of the last checkpoint before the stream goes quiet fails. Its error
    # must reach the loop now, not only at a next checkpoint that may be far off.
    settings = PipelineSettings(fetch_batch=500, checkpoint_interval_s=0.2)

    async def scenario() -> int:
        nc = await nats.connect(nats_server.url)
        actors = [PartitionActor.remote(i) for i in range(2)]  # type: ignore[attr-defined]
        try:
            js = nc.jetstream()
            events = await _publish(nc, settings)
            with _FailingWriter(tmp_path / "db.duckdb") as writer:
                ingest = Ingest(nc, actors, writer, settings)
                await ingest.start()
                stop = asyncio.Event()
                running = asyncio.create_task(
                    ingest.run(until_drained=False, stop=stop)
                )
                try:
                    # Wait until the whole stream is processed and acknowledged.
                    while True:
                        info = await js.consumer_info(EVENTS_STREAM, settings.consumer)
                        if info.num_pending == 0 and info.num_ack_pending == 0:
                            break
                        await asyncio.sleep(0.1)
                    writer.failing = True
                    await publish_all(nc, events[:1])
                    for _ in range(100):
                        if ingest.report.recoveries:
                            break
                        await asyncio.sleep(0.1)
                    recoveries = ingest.report.recoveries
                    writer.failing = False
                finally:
                    stop.set()
                    await running
            return recoveries
        finally:
            await nc.close()
            for actor in actors:
                ray.kill(actor)

    assert asyncio.run(scenario()) == 1


def test_start_retry_ends_on_stop(nats_server: EmbeddedNatsServer) -> None:
    # A partition actor that stays dead makes every start fail; a stop signal must
    # end the retries instead of leaving the run waiting for ever.
    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        actor = PartitionActor.remote(0)  # type: ignore[attr-defined]
        ray.kill(actor, no_restart=True)
        try:
            ingest = Ingest(nc, [actor], None, SETTINGS)
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(0.2, stop.set)
            with pytest.raises(StartStoppedError, match="processed nothing"):
                await asyncio.wait_for(ingest.start_with_retry(stop), 20)
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_brief_error_one_plain_line() -> None:
    error = ValueError(
        "\x1b[36mpartition 0 failed\x1b[0m\nTraceback (most recent call)"
    )
    assert brief_error(error) == "ValueError: partition 0 failed"
    long = brief_error(ValueError("x" * 500))
    assert len(long) == 200
    assert long.endswith("…")
