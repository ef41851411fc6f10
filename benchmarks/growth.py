"""Growth: partition state throughput and memory with many open orders or many plants.

Both run PartitionState in this process, so that the figure shows how the state itself
scales without the broker and the actors around it. The end-to-end pipeline at
different plant counts is measured by the suite with `pipeline_run`.
"""

from __future__ import annotations

import gc
import logging
import random
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass

from actors.partition_state import PartitionState
from benchmarks.in_memory import apply_in_batches, source_messages
from benchmarks.memory import open_order_messages

logger = logging.getLogger(__name__)

__all__ = ["GrowthRun", "measure_with_open_orders"]


@dataclass(frozen=True)
class GrowthRun:
    events: int
    seconds: float
    traced_bytes: int
    """Python memory of the state after the run, from tracemalloc."""
    checkpoint_bytes: int
    checkpoint_seconds: float
    """Serialising the state with every order, as a base checkpoint does."""
    delta_bytes: int
    delta_seconds: float
    """Serialising the state with the orders changed by the run only, as the next
    checkpoint after a base taken before the run does."""

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def measure_with_open_orders(
    open_orders: int,
    messages: Sequence[tuple[str, bytes]],
    *,
    traced: bool,
    remembered_ids: int = 0,
) -> GrowthRun:
    """Preload `open_orders` open orders and `remembered_ids` event ids, then time
    applying `messages`.

    With `traced`, tracemalloc runs during the whole measurement and reports the
    state's size; it slows Python allocations, so the suite times an untraced run and
    takes the memory from a separate traced one.
    """
    # The open orders take plant P99, which the generated stream never uses, and
    # stream sequences after the workload's.
    preload = open_order_messages(open_orders, plant="P99", first_seq=len(messages) + 1)
    workload = source_messages(messages)
    if traced:
        gc.collect()
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0] if traced else 0
        state = PartitionState(0)
        apply_in_batches(state, preload)
        # Ids as the id table stores them (64-bit hashes), put directly: applying that
        # many events would take most of a minute per run.
        rng = random.Random(remembered_ids)
        for _ in range(remembered_ids):
            state.seen.put(rng.getrandbits(64) or 1, 0)
        state.take_snapshot()
        state.checkpoint_parts(base=True)
        started = time.perf_counter()
        apply_in_batches(state, workload)
        elapsed = time.perf_counter() - started
        state.take_snapshot()
        del preload, workload
        gc.collect()
        traced_bytes = tracemalloc.get_traced_memory()[0] - before if traced else 0
    finally:
        if traced:
            tracemalloc.stop()
    started = time.perf_counter()
    delta = state.checkpoint_parts(base=False)
    delta_seconds = time.perf_counter() - started
    started = time.perf_counter()
    base = state.checkpoint_parts(base=True)
    base_seconds = time.perf_counter() - started
    return GrowthRun(
        events=len(messages),
        seconds=elapsed,
        traced_bytes=traced_bytes,
        checkpoint_bytes=sum(map(len, base)),
        checkpoint_seconds=base_seconds,
        delta_bytes=sum(map(len, delta)),
        delta_seconds=delta_seconds,
    )
