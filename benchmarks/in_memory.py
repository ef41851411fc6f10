"""plantstream's partition state alone, in this process: no NATS, no Ray, no DuckDB."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from actors.partition_state import PartitionState, SourceMessage

__all__ = ["apply_in_batches", "partition_state_rate", "source_messages"]

BATCH = 2000
"""Messages per apply_batch call, the ingest's default fetch size."""


def source_messages(
    messages: Sequence[tuple[str, bytes]], first_seq: int = 1
) -> list[SourceMessage]:
    return [
        SourceMessage(first_seq + i, subject, data)
        for i, (subject, data) in enumerate(messages)
    ]


def apply_in_batches(
    state: PartitionState, messages: Sequence[SourceMessage], batch: int = BATCH
) -> int:
    """Apply `messages` in fetch-sized batches; return the postings produced."""
    postings = 0
    for start in range(0, len(messages), batch):
        postings += len(
            state.apply_batch(list(messages[start : start + batch])).postings
        )
    return postings


def partition_state_rate(
    messages: Sequence[tuple[str, bytes]], *, arrow: bool = False
) -> tuple[int, float, int]:
    """Apply every message to a new PartitionState. Return (events, seconds, postings).

    The time covers decoding, deduplication, parking, the order logic, encoding the
    postings and collecting the snapshot rows. With `arrow` it also covers turning the
    rows into Arrow tables after every thousand or so events and joining them into the
    snapshot at the end, as the partition actor does. Without it, that step is left
    out, because the Bytewax peer builds no snapshot at all.
    """
    prepared = source_messages(messages)
    state = PartitionState(0)
    if not arrow:
        state.chunk_rows = sys.maxsize
    started = time.perf_counter()
    postings = apply_in_batches(state, prepared)
    if arrow:
        state.take_snapshot()
    elapsed = time.perf_counter() - started
    return len(prepared), elapsed, postings
