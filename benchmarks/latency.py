"""Latency from publish to posting stored, under a paced publisher.

The pipeline runs in this process as in production (`Ingest.run`, not until drained,
with the DuckDB sink and checkpoints every 2 s).
A child process publishes generated events at a fixed rate and watches ERP_POSTINGS
with an ordered JetStream consumer, which only delivers postings the stream has stored.
It records when it published each event id and when the first posting naming that id
(GoodsMovement.reference, or lineage[0] of a confirmation) arrived. Both clocks are the
child's time.monotonic(), so no clocks are compared across processes. The child runs in
its own process so that its publishing and decoding do not share the driver's event
loop; on this 2-core machine it still shares the cores.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
import ray
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from benchmarks.broker import PUBLISH_MAX_PENDING, Broker
from benchmarks.pipeline_run import BENCH_SETTINGS, start_actors
from benchmarks.stats import percentile
from benchmarks.workload import build_workload, spec_for
from contracts.keys import decode_key
from pipeline.ingest import Ingest
from pipeline.publish import Publisher
from pipeline.sink import SnapshotWriter
from pipeline.subjects import POSTINGS_PREFIX

logger = logging.getLogger(__name__)

__all__ = ["LatencyRun", "run_latency"]

WARMUP_S = 1.0
"""Postings of events published in the first second (the first quarter of a shorter
run) are left out: actors and connections are still warming up."""

DRAIN_S = 10.0
"""How long the child waits after the last publish for the remaining postings."""

TICK_S = 0.005
"""The publisher sends what is due every 5 ms."""


class _Reference(msgspec.Struct):
    reference: str | None = None
    lineage: list[str] = []


_reference_decoder = msgspec.json.Decoder(_Reference)


@dataclass(frozen=True)
class LatencyRun:
    target_rate: float
    published: int
    publish_seconds: float
    measured: int
    """Postings whose source event was published after the warm-up."""
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def achieved_rate(self) -> float:
        return self.published / self.publish_seconds


async def run_latency(rate: float, seconds: float, partitions: int) -> LatencyRun:
    """Run the pipeline on a fresh broker while publishing at `rate` events/s."""
    events = int(rate * seconds) + 1
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    async with Broker() as broker:
        actors = start_actors(partitions)
        stop = asyncio.Event()
        try:
            with (
                tempfile.TemporaryDirectory(prefix="plantstream-latency-") as folder,
                SnapshotWriter(Path(folder) / "latency.duckdb") as writer,
            ):
                ingest = Ingest(broker.client, actors, writer, BENCH_SETTINGS)
                await ingest.start()
                runner = asyncio.create_task(ingest.run(until_drained=False, stop=stop))
                child = context.Process(
                    target=_child, args=(broker.url, rate, events, results), daemon=True
                )
                child.start()
                try:
                    outcome = await asyncio.to_thread(
                        results.get, True, seconds + DRAIN_S + 120.0
                    )
                finally:
                    child.join(timeout=10)
                    if child.is_alive():
                        child.kill()
                stop.set()
                await runner
        finally:
            for actor in actors:
                ray.kill(actor)
    if isinstance(outcome, str):
        raise RuntimeError(f"the latency publisher failed: {outcome}")
    return LatencyRun(target_rate=rate, **outcome)


def _child(url: str, rate: float, events: int, results: multiprocessing.Queue) -> None:
    try:
        results.put(asyncio.run(_publish_and_watch(url, rate, events)))
    except Exception as error:  # reported to the parent, which raises it
        results.put(f"{type(error).__name__}: {error}")


async def _publish_and_watch(url: str, rate: float, events: int) -> dict[str, object]:
    workload = build_workload(spec_for(events, seed=31), limit=events)
    ids = [_event_id(data) for _, data in workload.messages]
    nc = await nats.connect(url)
    js = nc.jetstream()
    # The same publisher as the ingest: publish_async would take several times the
    # CPU from the two cores the pipeline under test runs on.
    publisher = Publisher(nc, window=PUBLISH_MAX_PENDING)
    await publisher.start()
    published_at: dict[str, float] = {}
    landed_at: dict[str, float] = {}

    async def on_posting(message: Msg) -> None:
        now = time.monotonic()
        posting = _reference_decoder.decode(message.data)
        source = posting.reference or (posting.lineage[0] if posting.lineage else None)
        if source is not None and source not in landed_at:
            landed_at[source] = now

    await js.subscribe(
        f"{POSTINGS_PREFIX}.>",
        cb=on_posting,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
    )
    started = time.monotonic()
    sent = 0
    while sent < len(workload.messages):
        due = min(len(workload.messages), int((time.monotonic() - started) * rate) + 1)
        while sent < due:
            subject, data = workload.messages[sent]
            event_id = ids[sent]
            if event_id is not None and event_id not in published_at:
                published_at[event_id] = time.monotonic()
            await publisher.publish(subject, data, None)
            sent += 1
        await asyncio.sleep(TICK_S)
    await publisher.settle()
    publish_seconds = time.monotonic() - started

    # Wait until no new posting arrived for a second, or DRAIN_S at most.
    deadline = time.monotonic() + DRAIN_S
    last_count = -1
    while time.monotonic() < deadline and len(landed_at) != last_count:
        last_count = len(landed_at)
        await asyncio.sleep(1.0)
    await nc.close()

    cutoff = started + min(WARMUP_S, events / rate / 4)
    latencies = sorted(
        (landed_at[event_id] - at) * 1000
        for event_id, at in published_at.items()
        if at >= cutoff and event_id in landed_at
    )
    if not latencies:
        raise RuntimeError(
            f"no posting arrived for {len(published_at)} events published at "
            f"{rate:.0f}/s; the pipeline did not run or publishes nowhere"
        )
    return {
        "published": sent,
        "publish_seconds": publish_seconds,
        "measured": len(latencies),
        "p50_ms": percentile(latencies, 0.50),
        "p95_ms": percentile(latencies, 0.95),
        "p99_ms": percentile(latencies, 0.99),
    }


def _event_id(data: bytes) -> str | None:
    try:
        return decode_key(data).event_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
