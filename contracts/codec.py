"""Reusable msgspec encoders and decoders for each stream's contract."""

from __future__ import annotations

import re

import msgspec

from contracts.dead_letters import DeadLetter
from contracts.events import PlantEvent
from contracts.postings import Posting

__all__ = [
    "decode_dead_letter",
    "decode_event",
    "decode_posting",
    "describe_decode_error",
    "encode",
]

_event_decoder = msgspec.json.Decoder(PlantEvent)
_posting_decoder = msgspec.json.Decoder(Posting)
_dead_letter_decoder = msgspec.json.Decoder(DeadLetter)
_encoder = msgspec.json.Encoder(decimal_format="string")


def decode_event(data: bytes) -> PlantEvent:
    """Decode and validate one event; raise msgspec.ValidationError or DecodeError."""
    return _event_decoder.decode(data)


def decode_posting(data: bytes) -> Posting:
    return _posting_decoder.decode(data)


def decode_dead_letter(data: bytes) -> DeadLetter:
    return _dead_letter_decoder.decode(data)


def encode(value: object) -> bytes:
    """Encode any contract Struct as JSON, with Decimals as exact strings."""
    return _encoder.encode(value)


_SCHEMA_HINT = "`plantstream schema events` prints the event contract"
_ARRAY_GIVEN = "Expected `object`, got `array`"

# msgspec's message, matched at its start, and what the publisher should change.
_HINTS = (
    (
        "Expected `datetime` with a timezone component",
        "timestamps need a UTC offset, such as 2026-01-05T06:00:00+01:00 or "
        "2026-01-05T05:00:00Z",
    ),
    (
        "Invalid RFC3339 encoded datetime",
        "write timestamps in RFC 3339, such as 2026-01-05T06:00:00+01:00",
    ),
    (
        "Invalid decimal string",
        'write quantities as decimal numbers such as "12.500" or 12.5, with "." '
        "as the decimal point and no thousands separator",
    ),
    (
        "Input data was truncated",
        "the body is empty or cut short; publish one JSON object per event",
    ),
    (
        _ARRAY_GIVEN,
        "an event is one JSON object; publish arrays of events on "
        "plant.events.<plant>.batch",
    ),
    ("Object missing required field", _SCHEMA_HINT),
    ("Expected `str` of length", f"shorten the value; {_SCHEMA_HINT}"),
    ("Invalid value", f"{_SCHEMA_HINT}, with the event types it accepts"),
    ("Expected", _SCHEMA_HINT),
    ("JSON is malformed", "the body is not valid JSON"),
)
_PATH = re.compile(r" - at `\$((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*)`$")
_PATH_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")
_SHOWN_VALUE_CHARS = 60


def describe_decode_error(
    error: msgspec.MsgspecError, data: bytes, *, in_edge_batch: bool = False
) -> str:
    """Return msgspec's message with the offending value and what to change.

    msgspec names the place (`$.quantity.value`) but not the value or the fix, and the
    dead letter's reader needs all three. Set `in_edge_batch` for one element of an
    edge batch, which is already on the batch subject.
    """
    message = str(error)
    match = _PATH.search(message)
    if match is not None and match.group(1):
        found, value = _value_at(data, match.group(1))
        if found:
            value_text = repr(value)
            if len(value_text) > _SHOWN_VALUE_CHARS:
                value_text = value_text[:_SHOWN_VALUE_CHARS] + "..."
            if value_text not in message:
                message = f"{message} (got {value_text})"
    for start, hint in _HINTS:
        if message.startswith(start):
            if in_edge_batch and start == _ARRAY_GIVEN:
                hint = "each element of an edge batch must be one event object"
            return f"{message}; {hint}"
    return message


def _value_at(data: bytes, path: str) -> tuple[bool, object]:
    try:
        value: object = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return False, None
    for name, index in _PATH_STEP.findall(path):
        if name and isinstance(value, dict) and name in value:
            value = value[name]
        elif index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        else:
            return False, None
    return True, value
