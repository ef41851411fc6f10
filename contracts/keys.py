"""The few fields ingest reads from every message, to route and deduplicate it cheaply.

Decoding an `EventKey` skips every field it does not name, so routing a batch costs a
fraction of a full decode; the partition actor decodes the whole event once.
"""

from __future__ import annotations

import sys

import msgspec

__all__ = ["EventKey", "decode_key", "nesting_error", "routing_key"]


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
    try:
        return _key_decoder.decode(data)
    except RecursionError:
        raise nesting_error() from None


def nesting_error() -> msgspec.DecodeError:
    """Return the error for JSON nested deeper than the decoder follows.

    msgspec raises RecursionError there, which handlers of decode errors do not catch.
    As this DecodeError, a 2 KB message of nested arrays becomes a malformed dead
    letter like any other.
    """
    return msgspec.DecodeError(
        "JSON nested too deeply to decode: msgspec stops near Python's recursion "
        f"limit (about {sys.getrecursionlimit():,} levels here); an event is one "
        "object whose values nest only a few levels"
    )


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
