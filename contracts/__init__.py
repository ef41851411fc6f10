"""The wire format: plant events, ERP postings, dead letters and snapshot tables."""

from contracts.codec import decode_event, decode_posting, encode
from contracts.dead_letters import DeadLetter
from contracts.events import EVENT_TYPES, PlantEvent, Quantity
from contracts.keys import EventKey, decode_key, routing_key
from contracts.postings import GoodsMovement, OrderConfirmation, Posting

__all__ = [
    "EVENT_TYPES",
    "DeadLetter",
    "EventKey",
    "GoodsMovement",
    "OrderConfirmation",
    "PlantEvent",
    "Posting",
    "Quantity",
    "decode_event",
    "decode_key",
    "decode_posting",
    "encode",
    "routing_key",
]
