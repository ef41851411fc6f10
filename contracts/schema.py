"""JSON Schema export, so publishing teams can validate events before they send them."""

from __future__ import annotations

import msgspec

from contracts.events import PlantEvent
from contracts.postings import Posting

__all__ = ["event_schema", "posting_schema"]


def event_schema() -> dict[str, object]:
    """Return the JSON Schema (draft 2020-12) of the plant event union."""
    return msgspec.json.schema(PlantEvent)


def posting_schema() -> dict[str, object]:
    """Return the JSON Schema (draft 2020-12) of the ERP posting union."""
    return msgspec.json.schema(Posting)
