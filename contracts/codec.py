"""Reusable msgspec encoders and decoders for each stream's contract."""

from __future__ import annotations

import msgspec

from contracts.dead_letters import DeadLetter
from contracts.events import PlantEvent
from contracts.postings import Posting

__all__ = [
    "decode_dead_letter",
    "decode_event",
    "decode_posting",
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
