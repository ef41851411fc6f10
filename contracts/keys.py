"""The few fields ingest reads from every message, to route and deduplicate it cheaply.

Decoding an `EventKey` skips every field it does not name, so routing a batch costs a
fraction of a full decode; the partition actor decodes the whole event once.
"""

from __future__ import annotations

import sys
import zlib

import msgspec

__all__ = [
    "PLANT_WIDE_EVENTS",
    "EventKey",
    "check_no_nul",
    "decode_key",
    "is_plant_wide",
    "nesting_error",
    "partition_of",
    "routing_key",
]

PLANT_WIDE_EVENTS = frozenset({"quality_hold_applied", "quality_hold_released"})
"""Event types that every partition applies when they name no order."""


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


_NUL_ESCAPE = b"\\u0000"
"""The JSON escape of a NUL character; a raw NUL byte in a string is not valid JSON."""


def check_no_nul(data: bytes) -> None:
    """Raise ValueError if a string in the JSON event `data` contains a NUL character.

    ERP interfaces, C libraries and many text tools end a string at NUL, so a material
    or batch number with one would be posted as a different value than the one stored.
    The byte search costs little on every event. The decode runs only when it finds
    the escape, which may also be an escaped backslash before the text "u0000".
    """
    if _NUL_ESCAPE not in data:
        return
    try:
        value = msgspec.json.decode(data)
        path = _nul_path(value, "")
    except RecursionError:
        # Passing it on would leave the NUL check to a decode at another stack depth.
        raise nesting_error() from None
    if path is not None:
        raise ValueError(
            f"field {path!r} contains a NUL character (\\u0000), which ERP interfaces "
            "and text tools treat as the end of the text; remove it at the source and "
            "publish the event again"
        )


def _nul_path(value: object, path: str) -> str | None:
    """Return the path (`good.value`, `lots[0]`) of a string or field name in `value`
    that contains NUL, or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for name, item in value.items():
            # A name that is not a plain word is quoted, so that "a.b" and "a[0]" do
            # not read as a path.
            if not name.isidentifier():
                where = f"{path}[{name!r}]"
            elif path:
                where = f"{path}.{name}"
            else:
                where = name
            found = where if "\x00" in name else _nul_path(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


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
        return machine_routing_key(key.machine)
    if key.order:
        return order_routing_key(key.order)
    if key.delivery:
        return f"delivery:{key.delivery}"
    return PLANT_ROUTING_KEY


PLANT_ROUTING_KEY = "plant"
"""The routing key of an event that names no machine, order or delivery, such as a
plant-wide hold."""


def order_routing_key(order: str) -> str:
    """Return the routing key of a production order's events."""
    return f"order:{order}"


def machine_routing_key(machine: str) -> str:
    """Return the routing key of a machine's events."""
    return f"machine:{machine}"


def is_plant_wide(key: EventKey) -> bool:
    """Return whether every partition applies the event: a hold that names no order
    blocks stock in orders of every partition."""
    return key.order is None and key.event_type in PLANT_WIDE_EVENTS


def partition_of(plant: str, routing_key: str, partitions: int) -> int:
    """Return the partition that owns (plant, routing key).

    CRC-32 is stable across processes and Python versions, unlike hash(), so a key keeps
    its partition across restarts and its checkpoint stays valid.
    """
    return zlib.crc32(f"{plant}\x1f{routing_key}".encode()) % partitions
