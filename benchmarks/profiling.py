"""Where the time goes: the driver's phases and hot spots, and PartitionState's.

The driver (the ingest loop in this process) is profiled with `StackSampler`, because a
tracing profiler changes its batching; the ingest times its own steps
(`IngestReport.seconds`). In the same run a `ThreadSampler` in each partition actor
samples the actor's main thread, which runs its calls. PartitionState runs
without I/O, so cProfile describes it faithfully apart from the overhead it adds to
every call; its shares are of the profiled time.
"""

from __future__ import annotations

import asyncio
import cProfile
import logging
import pstats
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.partition_state import PartitionState
from benchmarks.broker import Broker
from benchmarks.in_memory import apply_in_batches, source_messages
from benchmarks.pipeline_run import PipelineRun, run_pipeline
from benchmarks.sampler import (
    Hotspot,
    SampleCounts,
    StackSampler,
    short_path,
    start_actor_sampler,
    stop_actor_sampler,
)

logger = logging.getLogger(__name__)

RAY_TASK_LOOP = "ray/_private/worker.py:main_loop"
"""The innermost Python frame of a Ray worker's main thread between two calls."""

__all__ = ["DriverProfile", "FunctionShare", "profile_driver", "profile_state"]


@dataclass(frozen=True)
class FunctionShare:
    function: str
    calls: int
    own_share: float
    cumulative_share: float


@dataclass(frozen=True)
class DriverProfile:
    run: PipelineRun
    phases: dict[str, float]
    """Wall-clock seconds per phase of the ingest loop."""
    hotspots: list[Hotspot]
    samples: int
    actor_hotspots: list[Hotspot] = field(default_factory=list)
    """The partition actors' main threads, their samples added together."""
    actor_samples: int = 0


def profile_state(
    messages: Sequence[tuple[str, bytes]], top: int = 12
) -> list[FunctionShare]:
    """Profile PartitionState.apply_batch over `messages` with cProfile."""
    prepared = source_messages(messages)
    state = PartitionState(0)
    profiler = cProfile.Profile()
    profiler.enable()
    apply_in_batches(state, prepared)
    profiler.disable()
    stats = pstats.Stats(profiler)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [
        FunctionShare(
            function=_label(key),
            calls=value[1],
            own_share=value[2] / total,
            cumulative_share=value[3] / total,
        )
        for key, value in rows
    ]


def _label(key: tuple[str, int, str]) -> str:
    path, line, name = key
    if path == "~":
        return name
    return f"{short_path(path)}:{line}({name})"


async def profile_driver(broker: Broker, partitions: int) -> DriverProfile:
    """Run the pipeline once more with the sampler on; the ingest times its own steps.

    The steps overlap (the next fetch runs while a batch is routed, checkpoints commit
    in the background), so their times add up to more than the run's wall time.
    """
    actors_counts = SampleCounts()
    sampler = StackSampler()

    async def sample_actors(actors: list[ray.actor.ActorHandle]) -> None:
        await asyncio.gather(
            *(actor.__ray_call__.remote(start_actor_sampler) for actor in actors)
        )
        # The driver is sampled from here, as the actors are, so that the samples
        # leave out the set-up before the timed run: starting the actors and creating
        # the DuckDB file took up to a tenth of a sampled window.
        try:
            with sampler:
                await asyncio.Event().wait()
        finally:
            # run_pipeline cancels this task once the stream is drained, and kills
            # the actors only after it returns, so their counts are still there.
            stopped: list[SampleCounts] = await asyncio.shield(
                asyncio.gather(
                    *(actor.__ray_call__.remote(stop_actor_sampler) for actor in actors)
                )
            )
            for counts in stopped:
                actors_counts.add(counts)

    run = await run_pipeline(broker, partitions, during=sample_actors)
    return DriverProfile(
        run,
        dict(run.phases),
        sampler.top(12),
        sampler.samples,
        _actor_hotspots(actors_counts, 14),
        actors_counts.samples,
    )


def _actor_hotspots(counts: SampleCounts, count: int) -> list[Hotspot]:
    # By share on the stack, which nests: apply_batch, then what it calls. Ray's own
    # frames wrap every call, so they add nothing. Only its task loop is shown, whose
    # innermost share is the time between calls.
    ranked = counts.top(count + 20, by="total")
    without_ray = [
        h
        for h in ranked
        if not h.function.startswith("ray/") or h.function == RAY_TASK_LOOP
    ]
    return without_ray[:count]
