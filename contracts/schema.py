"""JSON Schema export, so publishing teams can validate events before they send them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec

from contracts.events import (
    ORDER_SCOPED_EVENTS,
    QUANTITY_INTEGER_DIGITS,
    QUANTITY_SCALE,
    PlantEvent,
)
from contracts.postings import Posting

__all__ = ["PLANT_ID_PATTERN", "event_schema", "posting_schema"]

PLANT_ID_PATTERN = r"[A-Za-z0-9_\-]+"
"""The characters of a plant id, which becomes a NATS subject token. The ingest
dead-letters an event whose plant does not match."""


def event_schema() -> dict[str, object]:
    """Return the JSON Schema (draft 2020-12) of the plant event union.

    msgspec's schema is completed with the rules that the decoder and the ingest
    apply but the types do not show. A quantity's value may be a JSON string or
    number within the digit limits, a plant id must be a subject token, and a
    timestamp must carry a UTC offset.
    """
    schema = msgspec.json.schema(PlantEvent)
    definitions: dict[str, dict[str, Any]] = schema["$defs"]
    # A validator does not know the "decimal" format, so the string form gets a
    # pattern with the digit limits of contracts.events.Quantity.
    definitions["Quantity"]["properties"]["value"] = {
        "anyOf": [
            {
                "type": "string",
                "format": "decimal",
                "pattern": (
                    f"^[0-9]{{1,{QUANTITY_INTEGER_DIGITS}}}"
                    f"(\\.[0-9]{{1,{QUANTITY_SCALE}}})?$"
                ),
            },
            {
                "type": "number",
                "minimum": 0,
                "exclusiveMaximum": 10**QUANTITY_INTEGER_DIGITS,
            },
        ]
    }
    for definition in definitions.values():
        plant = definition.get("properties", {}).get("plant")
        if plant is not None:
            plant["pattern"] = f"^{PLANT_ID_PATTERN}$"
    # `order` is optional in the base class, but these types are rejected without it,
    # and a null order counts as none.
    for event_type in ORDER_SCOPED_EVENTS:
        definition = definitions[event_type.__name__]
        definition["required"].append("order")
        definition["properties"]["order"] = _not_null(definition["properties"]["order"])
    # A hold without an order applies to the whole plant, which only a lot or material
    # hold can. Scope defaults to "order", so a hold that leaves it out needs an order.
    hold = definitions["QualityHoldApplied"]
    hold["if"] = {
        "anyOf": [
            {"not": {"required": ["scope"]}},
            {"properties": {"scope": {"const": "order"}}},
        ]
    }
    hold["then"] = {
        "required": ["order"],
        "properties": {"order": _not_null(hold["properties"]["order"])},
    }
    # Formats are only annotations in draft 2020-12 unless a validator is configured
    # to check them, so the UTC offset the decoder requires is also a pattern.
    for value in _walk(schema):
        if value.get("format") == "date-time":
            value["pattern"] = _AWARE_DATETIME
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


_AWARE_DATETIME = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


def _not_null(field: dict[str, Any]) -> dict[str, Any]:
    """Return the schema of an optional string field without its null alternative."""
    options = [option for option in field["anyOf"] if option.get("type") != "null"]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _walk(node: object) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for child in node.values():
            yield from _walk(child)
    elif isinstance(node, list):
        for child in node:
            yield from _walk(child)


def posting_schema() -> dict[str, object]:
    """Return the JSON Schema (draft 2020-12) of the ERP posting union."""
    return msgspec.json.schema(Posting)
