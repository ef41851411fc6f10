"""Memory: bytes per open order and per remembered event id, and actor RSS over a run.

Per-item costs come from tracemalloc, which counts every Python allocation, over many
items, after the snapshot rows they produced have been taken out of the state. RSS is
read from /proc/<pid>/status (VmRSS) of the actor processes while the pipeline runs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import os
import time
import tracemalloc
from dataclasses import dataclass, field
from decimal import Decimal

import ray

from actors.partition_state import PartitionState, SourceMessage
from benchmarks.in_memory import apply_in_batches
from benchmarks.pipeline_run import DuringRun
from benchmarks.sampler import short_path
from contracts import events as ev
from contracts.codec import encode
from pipeline.subjects import event_subject

logger = logging.getLogger(__name__)

__all__ = [
    "AllocationSite",
    "RssTrace",
    "bytes_per_event_id",
    "bytes_per_open_order",
    "open_order_messages",
    "read_rss",
    "sample_rss",
]

_RELEASED_AT = dt.datetime(2026, 3, 2, 6, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))


def open_order_messages(
    count: int, plant: str = "P01", first_seq: int = 1
) -> list[SourceMessage]:
    """Return `count` order releases that nothing completes: one open order each.

    Each order has 3 components and 2 operations, as a typical generated order does.
    """
    subject = event_subject(plant, "work_order_released")
    messages = []
    for index in range(count):
        event = ev.WorkOrderReleased(
            event_id=f"{plant}-R{index:09d}",
            plant=plant,
            occurred_at=_RELEASED_AT,
            source="erp",
            order=f"{plant}-OPEN{index:08d}",
            material="FG-1001",
            quantity=ev.Quantity(Decimal("250"), "EA"),
            components=[
                ev.Component(
                    material=f"RM-{2001 + k}",
                    quantity=ev.Quantity(Decimal("12.5"), "KG"),
                    operation="0010",
                    storage_location="0001",
                )
                for k in range(3)
            ],
            operations=[
                ev.OperationSpec(
                    operation=f"00{10 * (k + 1)}",
                    work_center=f"{plant}-CNC0{k + 1}",
                    ideal_cycle_time_s=Decimal("4.5"),
                )
                for k in range(2)
            ],
            storage_location="0002",
        )
        messages.append(SourceMessage(first_seq + index, subject, encode(event)))
    return messages


def _traced_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def bytes_per_event_id(count: int) -> float:
    """Return the bytes PartitionState keeps per remembered event id.

    Ids look like the generated ones ("P01-E000000042") and hashes are 64-bit, as
    `_payload_hash` makes them. The id string is counted: in the pipeline it is the
    decoded event's own string, which the state keeps as the dict key.
    """
    state = PartitionState(0)
    tracemalloc.start()
    try:
        before = _traced_bytes()
        for index in range(count):
            # The exact code path apply_batch uses for every new event.
            state._remember(f"P01-E{index:09d}", (index * 0x9E3779B97F4A7C15) >> 1)
        after = _traced_bytes()
    finally:
        tracemalloc.stop()
    return (after - before) / count


@dataclass(frozen=True)
class AllocationSite:
    """Where the memory of one open order was allocated, per order."""

    location: str
    bytes_per_order: float


def bytes_per_open_order(
    count: int, sites: list[AllocationSite] | None = None
) -> tuple[float, float]:
    """Return (bytes per open order, bytes per order with its remembered release id).

    The first figure takes out the release's event id at the cost bytes_per_event_id
    measures, so the two targets are not counted twice. `sites`, when given, receives
    the 8 source lines that allocated the most of it.
    """
    messages = open_order_messages(count)
    state = PartitionState(0)
    tracemalloc.start()
    try:
        before = _traced_bytes()
        first = tracemalloc.take_snapshot()
        apply_in_batches(state, messages)
        state.take_snapshot()
        after = _traced_bytes()
        if sites is not None:
            last = tracemalloc.take_snapshot()
            for stat in last.compare_to(first, "lineno")[:8]:
                frame = stat.traceback[0]
                sites.append(
                    AllocationSite(
                        f"{short_path(frame.filename)}:{frame.lineno}",
                        stat.size_diff / count,
                    )
                )
    finally:
        tracemalloc.stop()
    if len(state.orders) != count:
        raise RuntimeError(
            f"expected {count} open orders in the state, found {len(state.orders)}"
        )
    del messages
    with_id = (after - before) / count
    return with_id - bytes_per_event_id(min(count, 100_000)), with_id


def read_rss(pid: int) -> int:
    """Return the resident set size of `pid` in bytes, from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(
        f"/proc/{pid}/status has no VmRSS line; is {pid} a live process?"
    )


@dataclass
class RssTrace:
    """RSS samples per process, in bytes, with the seconds since the first sample."""

    seconds: list[float] = field(default_factory=list)
    by_pid: dict[int, list[int]] = field(default_factory=dict)

    def add(self, elapsed: float, pids: list[int]) -> None:
        self.seconds.append(elapsed)
        for pid in pids:
            self.by_pid.setdefault(pid, []).append(read_rss(pid))


def sample_rss(
    trace: RssTrace, interval_s: float, include_driver: bool = True
) -> DuringRun:
    """Return a `during` hook for run_pipeline that samples actor (and driver) RSS."""

    async def sample(actors: list[ray.actor.ActorHandle]) -> None:
        pids = list(await asyncio.gather(*(actor.pid.remote() for actor in actors)))
        if include_driver:
            pids.append(os.getpid())
        started = time.monotonic()
        while True:
            trace.add(time.monotonic() - started, pids)
            await asyncio.sleep(interval_s)

    return sample
