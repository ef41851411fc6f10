"""The full pipeline end to end: fetch, apply, store postings, write snapshots, ack.

Each run starts from a published stream with no consumer, no checkpoint and empty
output streams, creates fresh partition actors and times `Ingest.run` until the stream
is drained and the last checkpoint (DuckDB write and acks) is done. With
`timed_messages`, the stream already published is an untimed preload, and the run
times the messages it publishes after the preload is drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from actors.partition import PartitionActor
from actors.settings import StateSettings
from benchmarks.broker import Broker
from benchmarks.workload import publish_messages
from pipeline.ingest import Ingest
from pipeline.settings import PipelineSettings
from pipeline.sink import SnapshotWriter
from pipeline.subjects import POSTINGS_STREAM

logger = logging.getLogger(__name__)

__all__ = [
    "BENCH_SETTINGS",
    "DuringRun",
    "PipelineRun",
    "run_pipeline",
    "start_actors",
]

DuringRun = Callable[[list[ray.actor.ActorHandle]], Coroutine[Any, Any, None]]
"""A coroutine run alongside the ingest with its actors, such as a memory sampler."""

BENCH_SETTINGS = PipelineSettings(consumer="bench-ingest", fetch_timeout_s=0.1)
"""Defaults except the fetch timeout. The last fetch of a drained stream waits for the
whole timeout before the final checkpoint; 0.1 s instead of 0.5 s keeps that idle wait
out of the measured time without changing how full batches are fetched."""


@dataclass(frozen=True)
class PipelineRun:
    partitions: int
    events: int
    seconds: float
    postings_stored: int
    dead_letters: int
    checkpoints: int
    partition_stats: list[dict[str, object]]
    """Each partition's `stats()` after the run: orders, remembered ids, counts."""
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds per ingest step, from `IngestReport.seconds`; the steps overlap."""

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def start_actors(
    partitions: int, settings: StateSettings | None = None
) -> list[ray.actor.ActorHandle]:
    """Create partition actors and wait until each process runs."""
    actors = [
        PartitionActor.remote(index, settings or StateSettings())  # type: ignore[attr-defined]
        for index in range(partitions)
    ]
    ray.get([actor.pid.remote() for actor in actors])
    return actors


async def run_pipeline(
    broker: Broker,
    partitions: int,
    settings: PipelineSettings = BENCH_SETTINGS,
    *,
    during: DuringRun | None = None,
    state: StateSettings | None = None,
    sink: bool = True,
    timed_messages: Sequence[tuple[str, bytes]] | None = None,
) -> PipelineRun:
    """Run the ingest over the whole stream with `partitions` fresh actors.

    `during`, when given, runs alongside the ingest (a memory sampler) and is cancelled
    when the stream is drained. `state` configures the actors (defaults when None).
    Without `sink` the ingest writes nothing to DuckDB, which shows what the snapshot
    writes cost; the actors still build the snapshot rows.

    With `timed_messages`, the stream on the broker is drained first without timing
    it, and the run times `timed_messages`, published once the preload is applied and
    committed. The run's events and postings count `timed_messages` only, while its
    dead letters, checkpoints and phases count both. The stream keeps both, so a
    second run on the same broker would take `timed_messages` for preload too.
    """
    await broker.reset_outputs(settings.consumer)
    actors = start_actors(partitions, state)
    helper: asyncio.Task[None] | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="plantstream-bench-") as folder:
            with contextlib.ExitStack() as stack:
                writer = (
                    stack.enter_context(SnapshotWriter(Path(folder) / "bench.duckdb"))
                    if sink
                    else None
                )
                ingest = Ingest(broker.client, actors, writer, settings)
                await ingest.start()
                preloaded_events = preloaded_postings = 0
                if timed_messages is not None:
                    report = await ingest.run(until_drained=True)
                    preloaded_events = report.counts["events_in"]
                    info = await broker.js.stream_info(POSTINGS_STREAM)
                    preloaded_postings = info.state.messages
                    await publish_messages(broker.client, timed_messages)
                if during is not None:
                    helper = asyncio.create_task(during(actors))
                started = time.perf_counter()
                report = await ingest.run(until_drained=True)
                elapsed = time.perf_counter() - started
                stats = await ingest.partition_stats()
        info = await broker.js.stream_info(POSTINGS_STREAM)
    finally:
        if helper is not None:
            helper.cancel()
            await asyncio.gather(helper, return_exceptions=True)
        for actor in actors:
            ray.kill(actor)
    run = PipelineRun(
        partitions=partitions,
        events=report.counts["events_in"] - preloaded_events,
        seconds=elapsed,
        postings_stored=info.state.messages - preloaded_postings,
        dead_letters=sum(report.dead_letters.values()),
        checkpoints=report.checkpoints,
        partition_stats=stats,
        phases=dict(report.seconds),
    )
    logger.info(
        "pipeline: partitions=%d events=%d seconds=%.2f rate=%.0f/s postings=%d",
        run.partitions,
        run.events,
        run.seconds,
        run.rate,
        run.postings_stored,
    )
    return run
