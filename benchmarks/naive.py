"""The naive design: the same partition actors, called once per event.

Each event makes its own round trip: one `PartitionActor.apply.remote` call with a
one-message batch, its postings published and their acks awaited, then the source
message acked. The snapshot rows go to DuckDB once at the end, so the naive figure is
not held back by the sink.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path

import msgspec
import ray
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from actors.partition import PartitionCheckpoint
from actors.partition_state import BatchResult, SourceMessage
from benchmarks.broker import Broker
from benchmarks.pipeline_run import start_actors
from contracts.codec import encode
from contracts.keys import decode_key, partition_of, routing_key
from pipeline.publish import publish_all
from pipeline.sink import SnapshotWriter, merge_tables
from pipeline.subjects import EVENTS_PREFIX, EVENTS_STREAM, dlq_subject

logger = logging.getLogger(__name__)

__all__ = ["NAIVE_CONSUMER", "run_naive"]

NAIVE_CONSUMER = "bench-naive"


async def run_naive(
    broker: Broker, events: int, partitions: int = 2
) -> tuple[int, float]:
    """Process the first `events` messages one at a time; return (events, seconds)."""
    await broker.reset_outputs(NAIVE_CONSUMER)
    js = broker.js
    await js.add_consumer(
        EVENTS_STREAM,
        ConsumerConfig(
            durable_name=NAIVE_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=f"{EVENTS_PREFIX}.>",
            max_ack_pending=10_000,
            ack_wait=120.0,
        ),
    )
    subscription = await js.pull_subscribe_bind(
        durable=NAIVE_CONSUMER, stream=EVENTS_STREAM
    )
    actors = start_actors(partitions)
    done = 0
    try:
        with tempfile.TemporaryDirectory(prefix="plantstream-naive-") as folder:
            started = time.perf_counter()
            while done < events:
                batch = await subscription.fetch(min(500, events - done), timeout=2.0)
                for message in batch:
                    seq = message.metadata.sequence.stream
                    source = SourceMessage(seq, message.subject, message.data)
                    actor = actors[_partition(message.data, partitions)]
                    result: BatchResult = await actor.apply.remote([source])
                    outgoing = [(p.subject, p.data, p.key) for p in result.postings]
                    outgoing += [
                        (dlq_subject(d.plant), encode(d), None)
                        for d in result.dead_letters
                    ]
                    await publish_all(broker.client, outgoing)
                    await message.ack()
                    done += 1
            snapshots: list[PartitionCheckpoint] = await asyncio.gather(
                *(actor.checkpoint.remote() for actor in actors)
            )
            tables = merge_tables([snapshot.tables for snapshot in snapshots])
            with SnapshotWriter(Path(folder) / "naive.duckdb") as writer:
                writer.write(tables)
            await broker.client.flush()
            elapsed = time.perf_counter() - started
    finally:
        await subscription.unsubscribe()
        await broker.delete_consumer(NAIVE_CONSUMER)
        for actor in actors:
            ray.kill(actor)
    logger.info("naive: events=%d seconds=%.2f", done, elapsed)
    return done, elapsed


def _partition(data: bytes, partitions: int) -> int:
    # A message without a valid key goes to partition 0, whose state dead-letters it.
    try:
        key = decode_key(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 0
    return partition_of(key.plant, routing_key(key), partitions)
