"""The few fields ingest reads from every message, to route and deduplicate it cheaply.

Decoding an `EventKey` skips every field it does not name, so routing a batch costs a
fraction of a full decode; the partition actor decodes the whole event once.
"""

from __future__ import annotations

import msgspec

__all__ = ["EventKey", "decode_key", "routing_key"]


class EventKey(msgspec.Struct, frozen=True, gc=False):
    event_id: str
    event_type: str
    plant: str
    order: str | None = None
    machine: str | None = None
    delivery: str | None = None


_key_decoder = msgspec.json.Decoder(EventKey)


def decode_key(data: bytes) -> EventKey:
    """Decode the key fields of one JSON event; raise msgspec.DecodeError if invalid."""
    return _key_decoder.decode(data)


def routing_key(key: EventKey) -> str:
    """Return the entity whose state the event changes, within its plant.

    Machine events go to their machine, even when they name the order that was running,
    because a machine's intervals must be built in one place. Other events of a
    production order go to that order, shipments without an order to their delivery.
    """
    if key.machine:
        return f"machine:{key.machine}"
    if key.order:
        return f"order:{key.order}"
    if key.delivery:
        return f"delivery:{key.delivery}"
    return "plant"
