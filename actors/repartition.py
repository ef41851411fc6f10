"""Splitting a checkpoint's partition states among another number of partitions.

A run started with another `--partitions` than its checkpoint's restores every old
partition and keeps the share that hashes to it under the new count, so that changing
the count needs no replay of the stream. Orders, machines and parked events move by
the same hash the ingest routes by. What cannot be routed is given to every new
partition:

- the remembered event ids and the evicted orders are stored as 64-bit hashes, whose
  event or order no longer shows. Each new partition gets the union, so a duplicate is
  still dropped wherever it lands. A union larger than `dedup_max_ids` keeps about the
  newest ids of each old partition, and an order's own ids still catch its duplicates;
- plant-wide holds, which every partition applies already.

Counts go to new partition 0, so totals over the partitions stay the same. A plant's
clock in a new partition takes the earliest watermark of the old partitions it took
the plant's state from. The clock's counters go to one partition: the one that the
plant's plant-wide events route to.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence

from actors.id_table import IdTable
from actors.partition_state import Parked, PartitionState, PlantClock
from actors.settings import StateSettings
from contracts.keys import (
    PLANT_ROUTING_KEY,
    decode_key,
    is_plant_wide,
    machine_routing_key,
    order_routing_key,
    partition_of,
    routing_key,
)

logger = logging.getLogger(__name__)

__all__ = ["take_share"]


def take_share(
    states: Sequence[PartitionState],
    partition: int,
    partitions: int,
    last_seq: int,
    settings: StateSettings | None = None,
) -> PartitionState:
    """Return new partition `partition` of `partitions`, built from `states`, every
    partition of one checkpoint that covers the stream up to `last_seq`.

    Each new partition calls this with the same `states`, and their shares together
    hold every order, machine and parked event once.
    """
    if not 0 <= partition < partitions:
        raise ValueError(
            f"partition {partition} is outside 0 to {partitions - 1}; pass an index "
            "below the new partition count"
        )
    share = PartitionState(partition, settings)
    share.resume_after(last_seq)

    def owns(plant: str, key: str) -> bool:
        return partition_of(plant, key, partitions) == partition

    # Per plant, the old partitions that this one takes orders, machines or parked
    # events from. The plant's clock here starts from their clocks.
    sources: dict[str, set[int]] = {}
    for index, state in enumerate(states):
        for key, order in state.orders.items():
            if owns(order.plant, order_routing_key(order.order_id)):
                share.orders[key] = order
                sources.setdefault(order.plant, set()).add(index)
        for key, track in state.machines.items():
            if owns(track.plant, machine_routing_key(track.machine)):
                share.machines[key] = track
                sources.setdefault(track.plant, set()).add(index)
        share.plant_holds.update(state.plant_holds)
    _share_parked(share, states, partitions, sources)

    share.seen = _union((state.seen for state in states), share.settings.dedup_max_ids)
    plants = sorted({plant for state in states for plant in state.closed_orders})
    for plant in plants:
        share.closed_orders[plant] = _union(
            (
                state.closed_orders[plant]
                for state in states
                if plant in state.closed_orders
            ),
            share.settings.closed_order_max_keys,
        )
    # Each share keeps every rejected id, like every remembered one, because the
    # corrected event may route to any of them.
    for state in states:
        for id_hash, letters in state.rejected.items():
            share.rejected.setdefault(id_hash, []).extend(letters)
    if partition == 0:
        for state in states:
            share.counts.update(state.counts)
    _share_clocks(share, states, partitions, sources)
    share.rewrite_rows()
    logger.debug(
        "partition %d of %d keeps %d orders, %d machines and %d parked events",
        partition,
        partitions,
        len(share.orders),
        len(share.machines),
        share.parked_count(),
    )
    return share


def _share_parked(
    share: PartitionState,
    states: Sequence[PartitionState],
    partitions: int,
    sources: dict[str, set[int]],
) -> None:
    """Move each parked event to the partition its key routes to now.

    A plant-wide hold parks in every partition: as the primary copy in the one its key
    routes to, which reports it, and as a silent copy elsewhere. Only primary copies
    are read here, so each event is placed once, with silent copies in the other new
    partitions.
    """
    for index, state in enumerate(states):
        for waiting_for, waiting in state.parked.items():
            for parked in waiting:
                if not parked.primary:
                    continue
                key = decode_key(parked.data)
                home = partition_of(key.plant, routing_key(key), partitions)
                if home == share.partition:
                    share.parked.setdefault(waiting_for, []).append(parked)
                    sources.setdefault(key.plant, set()).add(index)
                elif is_plant_wide(key):
                    copy = Parked(
                        parked.stream_seq,
                        parked.subject,
                        parked.data,
                        parked.event_id,
                        parked.waiting_for,
                        parked.parked_at,
                        parked.index,
                        primary=False,
                    )
                    share.parked.setdefault(waiting_for, []).append(copy)
    for waiting in share.parked.values():
        waiting.sort(key=lambda parked: (parked.stream_seq, parked.index))


def _share_clocks(
    share: PartitionState,
    states: Sequence[PartitionState],
    partitions: int,
    sources: dict[str, set[int]],
) -> None:
    """Give the share a clock for each plant it has state of, and the plant's
    counters to the partition its plant-wide events route to."""
    for plant in sorted({plant for state in states for plant in state.clocks}):
        home = partition_of(plant, PLANT_ROUTING_KEY, partitions) == share.partition
        if plant not in sources and not home:
            continue
        # The earliest watermark of the old partitions the state came from. The
        # watermark decides evictions, so no order is evicted sooner than it would
        # have been in its old partition.
        taken_from = sources.get(plant) or range(len(states))
        watermarks = [
            clock.watermark
            for index in taken_from
            if (clock := states[index].clocks.get(plant)) is not None
            and clock.watermark is not None
        ]
        watermark = min(watermarks) if watermarks else None
        if not home:
            share.clocks[plant] = PlantClock(watermark)
            continue
        clocks = [state.clocks[plant] for state in states if plant in state.clocks]
        share.clocks[plant] = PlantClock(
            watermark,
            sum(clock.events for clock in clocks),
            sum(clock.late_events for clock in clocks),
            max(clock.max_lateness_us for clock in clocks),
            sum(clock.future_rejected for clock in clocks),
        )


def _union(tables: Iterable[IdTable], max_entries: int) -> IdTable:
    """Return one table with the entries of `tables`, taken in turns from each, oldest
    first, so that a union too large for `max_entries` drops the oldest of each."""
    union = IdTable(max_entries)
    runs = [table.items() for table in tables]
    for entry in itertools.chain.from_iterable(itertools.zip_longest(*runs)):
        if entry is not None:
            union.put(*entry)
    # Not counted as ids_forgotten: each new partition drops its own copy of the same
    # ids, which would count every one of them once per partition.
    union.forgotten = 0
    return union
