"""Memory: bytes per open order and per remembered event id, and actor RSS over a run.

Per-item costs come from tracemalloc, which counts every Python allocation, over many
items, after the snapshot rows they produced have been taken out of the state. RSS is
read from /proc/<pid>/status of the actor processes while the pipeline runs: VmRSS, and
RssShmem, the part of it in shared memory, which for a Ray worker is mostly the pages of
the object store that it has written to or read from.
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

import msgspec
import ray

from actors.id_table import event_hash
from actors.partition_state import PAYLOAD_HASH_BITS, PartitionState, SourceMessage
from benchmarks.in_memory import apply_in_batches
from benchmarks.pipeline_run import DuringRun
from benchmarks.sampler import short_path
from contracts import events as ev
from contracts.codec import encode
from pipeline.sources.generated import StreamSpec, iter_events
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

    The releases come from the generated plant stream: 2 to 5 components and 1 to 3
    operations per order, with quantities that differ from order to order and the
    ideal cycle times of the product's routing. The order number, event id and plant
    are renamed so that every release is unique. The release time is fixed, because a
    long generated stream runs past this host's clock and its later releases would be
    rejected as future events.
    """
    if count == 0:
        return []
    subject = event_subject(plant, "work_order_released")
    spec = StreamSpec(plants=1, orders_per_plant=count, seed=17)
    messages: list[SourceMessage] = []
    for generated in iter_events(spec):
        if generated.kind != "event" or not generated.subject.endswith(
            ".work_order_released"
        ):
            continue
        release = msgspec.json.decode(generated.data, type=ev.WorkOrderReleased)
        index = len(messages)
        event = msgspec.structs.replace(
            release,
            event_id=f"{plant}-R{index:09d}",
            plant=plant,
            order=f"{plant}-OPEN{index:08d}",
            occurred_at=_RELEASED_AT,
        )
        messages.append(SourceMessage(first_seq + index, subject, encode(event)))
        if len(messages) == count:
            return messages
    raise RuntimeError(
        f"the generated stream released {len(messages)} orders, fewer than {count}"
    )


def _traced_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def bytes_per_event_id(count: int) -> float:
    """Return the bytes PartitionState keeps per remembered event id.

    Ids look like the generated ones ("P01-E000000042") and go through the code path
    apply_batch uses for a new event: the 64-bit event_hash of plant and id as key and
    the 30-bit payload hash as value. The id string itself is not kept. The table's
    default bound (2,000,000) is above `count`, so nothing is forgotten during the
    measurement.
    """
    state = PartitionState(0)
    tracemalloc.start()
    try:
        before = _traced_bytes()
        for index in range(count):
            payload_hash = (index * 0x9E3779B97F4A7C15) >> (64 - PAYLOAD_HASH_BITS)
            state._remember(
                event_hash("P01", f"P01-E{index:09d}"), payload_hash & 0x3FFFFFFF
            )
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
        # As at each checkpoint of the ingest: take_snapshot hands the changed orders
        # on to checkpoint_parts, which drops them once they are serialised.
        state.take_snapshot()
        state.checkpoint_parts(base=True)
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


def read_rss(pid: int) -> tuple[int, int]:
    """Return the resident set size of `pid` and its shared-memory part, in bytes.

    The shared part is 0 on kernels older than 4.5, which have no RssShmem line.
    """
    resident: int | None = None
    shared = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                resident = int(line.split()[1]) * 1024
            elif line.startswith("RssShmem:"):
                shared = int(line.split()[1]) * 1024
    if resident is None:
        raise RuntimeError(
            f"/proc/{pid}/status has no VmRSS line; is {pid} a live process?"
        )
    return resident, shared


@dataclass
class RssTrace:
    """RSS samples per process, in bytes, with the seconds since the first sample."""

    seconds: list[float] = field(default_factory=list)
    by_pid: dict[int, list[int]] = field(default_factory=dict)
    """VmRSS: everything resident, shared memory included."""
    shared_by_pid: dict[int, list[int]] = field(default_factory=dict)
    """RssShmem, the shared part of each sample in `by_pid`."""

    def add(self, elapsed: float, pids: list[int]) -> None:
        self.seconds.append(elapsed)
        for pid in pids:
            resident, shared = read_rss(pid)
            self.by_pid.setdefault(pid, []).append(resident)
            self.shared_by_pid.setdefault(pid, []).append(shared)

    @property
    def has_shared(self) -> bool:
        # Traces saved before the shared part was sampled have no such attribute.
        return bool(getattr(self, "shared_by_pid", None))

    def private(self, pid: int) -> list[int]:
        """Return the samples of `pid` without their shared part.

        Ray maps its object store into every worker as shared memory, and a page of it
        counts in a worker's RSS once the worker has touched it. Which pages an actor
        touches depends on where the store placed each checkpoint, up to the store's
        fixed size, so the private part is what shows the actor's own memory.
        """
        values = self.by_pid[pid]
        if not self.has_shared:
            return list(values)
        shared = self.shared_by_pid[pid]
        return [total - part for total, part in zip(values, shared, strict=True)]


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
