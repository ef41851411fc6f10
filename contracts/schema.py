"""JSON Schema export, so publishing teams can validate events before they send them."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.events import PlantEvent
from contracts.postings import Posting

__all__ = ["PLANT_ID_PATTERN", "event_schema", "posting_schema"]

PLANT_ID_PATTERN = r"[A-Za-z0-9_\-]+"
"""What a plant id may contain, because it becomes a NATS subject token; the ingest
dead-letters an event whose plant does not match."""


def event_schema() -> dict[str, object]:
    """Return the JSON Schema (draft 2020-12) of the plant event union.

    msgspec's schema is completed with two rules the decoder and the ingest apply but
    the types do not show: a quantity's value may be a JSON number as well as a
    string, and a plant id must be a subject token.
    """
    schema = msgspec.json.schema(PlantEvent)
    definitions: dict[str, dict[str, Any]] = schema["$defs"]
    definitions["Quantity"]["properties"]["value"] = {
        "anyOf": [{"type": "string", "format": "decimal"}, {"type": "number"}]
    }
    for definition in definitions.values():
        plant = definition.get("properties", {}).get("plant")
        if plant is not None:
            plant["pattern"] = f"^{PLANT_ID_PATTERN}$"
    return schema


def posting_schema() -> dict[str, object]:
    """Return the JSON Schema (draft 2020-12) of the ERP posting union."""
    return msgspec.json.schema(Posting)
