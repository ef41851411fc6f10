"""The generated events the benchmarks share, in both wire modes."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client as NATS

from contracts.keys import decode_key
from pipeline.publish import publish_all
from pipeline.sources.generated import StreamSpec, iter_events
from pipeline.subjects import EVENTS_PREFIX

logger = logging.getLogger(__name__)

__all__ = [
    "EDGE_BATCH_EVENTS",
    "Workload",
    "build_workload",
    "edge_batches",
    "publish_messages",
]

EDGE_BATCH_EVENTS = 100
"""Events per edge batch message, as from a gateway that flushes every 100 events."""


@dataclass(frozen=True)
class Workload:
    """One generated stream as (subject, body) pairs, one event per message."""

    spec: StreamSpec
    messages: list[tuple[str, bytes]]

    @property
    def events(self) -> int:
        return len(self.messages)


def spec_for(events: int, plants: int = 6, seed: int = 7) -> StreamSpec:
    """Return a StreamSpec that yields about `events` messages over `plants` plants.

    A generated order yields about 22 messages. Spreading orders over plants keeps the
    stream's time span short: each plant releases an order every 42 minutes of stream
    time, and events dated after this host's clock would be dead letters (future_time).
    """
    orders_per_plant = max(1, round(events / 22 / plants))
    return StreamSpec(plants=plants, orders_per_plant=orders_per_plant, seed=seed)


def build_workload(spec: StreamSpec, limit: int | None = None) -> Workload:
    """Generate the stream of `spec`, cut to `limit` messages when given."""
    messages: list[tuple[str, bytes]] = []
    for message in iter_events(spec):
        messages.append((message.subject, message.data))
        if limit is not None and len(messages) >= limit:
            break
    return Workload(spec, messages)


def edge_batches(
    messages: Sequence[tuple[str, bytes]], size: int = EDGE_BATCH_EVENTS
) -> list[tuple[str, bytes, int]]:
    """Group events into edge batches: (subject, JSON array body, events in it).

    Each plant's events are kept in stream order and flushed every `size` events, as a
    plant gateway does. A body that is not valid JSON cannot sit inside a JSON array
    without breaking the whole batch, so such messages are left out here; the other bad
    messages (invalid but well-formed JSON) stay in.
    """
    pending: dict[str, list[bytes]] = {}
    batches: list[tuple[str, bytes, int]] = []

    def flush(plant: str) -> None:
        items = pending.pop(plant)
        body = b"[" + b",".join(items) + b"]"
        batches.append((f"{EVENTS_PREFIX}.{plant}.batch", body, len(items)))

    for subject, data in messages:
        try:
            msgspec.json.decode(data)
        except msgspec.DecodeError:
            continue
        plant = _plant_of(subject, data)
        items = pending.setdefault(plant, [])
        items.append(data)
        if len(items) >= size:
            flush(plant)
    for plant in list(pending):
        flush(plant)
    return batches


def _plant_of(subject: str, data: bytes) -> str:
    try:
        return decode_key(data).plant
    except (msgspec.DecodeError, msgspec.ValidationError):
        # plant.events.<plant>.<event_type>: a message without a valid key still has
        # the plant in its subject.
        return subject.split(".")[2]


async def publish_messages(nc: NATS, messages: Iterable[tuple[str, bytes]]) -> int:
    """Publish to the plant events stream, waiting for every ack; return the count."""
    stored, _ = await publish_all(nc, ((s, d, None) for s, d in messages))
    return stored
