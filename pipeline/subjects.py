"""Stream and subject names, in one place so publishers and consumers agree.

Plant events:  plant.events.<plant>.<event_type>   (stream PLANT_EVENTS)
ERP postings:  erp.postings.<plant>                (stream ERP_POSTINGS)
Dead letters:  plantstream.dlq.<plant>             (stream PLANTSTREAM_DLQ)
  resolved:    plantstream.dlq.<plant>.resolved    (a later event under the id applied)
  retried:     plantstream.dlq.<plant>.retried     (plantstream dlq retry sent it back)
  dismissed:   plantstream.dlq.<plant>.dismissed   (plantstream dlq dismiss closed it)

A plant id becomes a subject token, so it must not contain ".", "*", ">" or white space.
"""

from __future__ import annotations

import re

from contracts.schema import PLANT_ID_PATTERN

__all__ = [
    "DLQ_STREAM",
    "EVENTS_STREAM",
    "POSTINGS_STREAM",
    "dlq_resolved_subject",
    "dlq_subject",
    "event_subject",
    "posting_subject",
    "validate_token",
]

EVENTS_STREAM = "PLANT_EVENTS"
POSTINGS_STREAM = "ERP_POSTINGS"
DLQ_STREAM = "PLANTSTREAM_DLQ"

EVENTS_PREFIX = "plant.events"
EDGE_BATCH_TYPE_TOKEN = "batch"  # noqa: S105 (a subject token, not a secret)
"""The last token of an edge batch's subject (plant.events.<plant>.batch)."""
POSTINGS_PREFIX = "erp.postings"
DLQ_PREFIX = "plantstream.dlq"
DISMISSED_SUFFIX = "dismissed"
RESOLVED_SUFFIX = "resolved"
RETRIED_SUFFIX = "retried"

_TOKEN = re.compile(PLANT_ID_PATTERN)


def validate_token(value: str, what: str) -> str:
    """Return `value` if it can be a subject token; otherwise raise ValueError."""
    if not _TOKEN.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} cannot be a NATS subject token: use letters, digits, "
            "'_' and '-' only"
        )
    return value


def event_subject(plant: str, event_type: str) -> str:
    return f"{EVENTS_PREFIX}.{validate_token(plant, 'plant')}.{event_type}"


def posting_subject(plant: str) -> str:
    return f"{POSTINGS_PREFIX}.{validate_token(plant, 'plant')}"


def dlq_subject(plant: str | None) -> str:
    # A message too broken to name its plant still needs a home in the DLQ stream.
    if plant is None or not _TOKEN.fullmatch(plant):
        return f"{DLQ_PREFIX}._unknown"
    return f"{DLQ_PREFIX}.{plant}"


def dlq_resolved_subject(plant: str) -> str:
    """Return the subject of the records that resolve `plant`'s dead letters."""
    return f"{dlq_subject(plant)}.{RESOLVED_SUFFIX}"
