"""Dead letters: messages plantstream could not apply, kept whole with the reason."""

from __future__ import annotations

import datetime as dt
from typing import Literal

import msgspec

__all__ = [
    "MAX_DETAIL_CHARS",
    "MAX_NAME_CHARS",
    "DeadLetter",
    "DeadLetterReason",
    "LetterResolved",
    "letter_id",
    "letter_id_at",
    "shorten_letter",
]

MAX_DETAIL_CHARS = 4000
"""Characters kept of a dead letter's detail, which is cut after them. The details
plantstream writes are far shorter unless they quote a hostile value at length, and a
detail near the server's max_payload could not be published at all."""

MAX_NAME_CHARS = 300
"""Characters kept of a dead letter's event id, plant and order. The event contract
allows 256, so only a name that already broke it is cut."""

DeadLetterReason = Literal[
    "malformed",  # not valid JSON, or not an object
    "invalid",  # valid JSON that breaks the event contract (type, field, value)
    "reused_id",  # an event id seen before with a different payload
    "future_time",  # occurred_at further ahead of the plant's clock than allowed
    "parked_expired",  # waited for a prerequisite (its order release) too long
    "unmatched",  # a reversal of an event of another kind or order, or reversed already
    "negative_stock",  # the movement would drive stock of a material below zero
    "order_closed",  # its order completed and was evicted from memory after retention
    "internal_error",  # applying it raised an unexpected error: a plantstream bug
    # A plant site's buffer dropped messages before the hub copied them; the letter
    # stands for all of them and carries no bytes.
    "lost_at_site",
]


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A rejected message with everything needed to fix and retry it.

    `data` is the original message body, byte for byte (base64 in JSON). `stream_seq` is
    its sequence in the plant events stream, so `plantstream dlq retry` can find it
    again.
    """

    reason: DeadLetterReason
    detail: str
    subject: str
    stream_seq: int
    data: bytes
    rejected_at: dt.datetime
    data_omitted: bool = False
    """True when the body was too large to copy here; it stays in PLANT_EVENTS at
    `stream_seq`, from where `plantstream dlq retry` reads it."""
    batch_index: int | None = None
    """Position of the event in an edge batch; None for a single-event message."""
    event_id: str | None = None
    plant: str | None = None
    order: str | None = None


class LetterResolved(msgspec.Struct, frozen=True, kw_only=True):
    """A later event under a dead letter's event id was applied, so the letter needs
    no retry.

    A partition drops the id of an event it rejected while applying it, so that the
    plant can send the corrected event again under the same id. When that event is
    applied, the partition records this for every letter of the id it still keeps.
    `subject`, `stream_seq` and `batch_index` are those of the applied event.
    """

    letter_id: str
    plant: str
    event_id: str
    subject: str
    stream_seq: int
    batch_index: int | None = None
    resolved_at: dt.datetime


def letter_id_at(
    subject: str, stream_seq: int, batch_index: int | None, reason: str
) -> str:
    """Return the identity of a dead letter: its message, event position and reason.

    A replay after a crash can reject the same message again, and letters with one
    identity are one dead letter. The identity is also their Nats-Msg-Id.
    """
    index = "" if batch_index is None else f":{batch_index}"
    return f"{subject}:{stream_seq}{index}:{reason}"


def letter_id(letter: DeadLetter) -> str:
    """Return `letter`'s identity (`letter_id_at`)."""
    return letter_id_at(
        letter.subject, letter.stream_seq, letter.batch_index, letter.reason
    )


def shorten_letter(letter: DeadLetter) -> DeadLetter:
    """Return `letter` with its detail cut to MAX_DETAIL_CHARS and its event id, plant
    and order to MAX_NAME_CHARS, each with a note of the cut.

    The names come from the rejected message, unchecked, so a hostile name of a
    megabyte would make the dead letter too large to publish even without the body.
    """
    changes: dict[str, str] = {}
    if len(letter.detail) > MAX_DETAIL_CHARS:
        changes["detail"] = _cut(letter.detail, MAX_DETAIL_CHARS)
    for name in ("event_id", "plant", "order"):
        value = getattr(letter, name)
        if value is not None and len(value) > MAX_NAME_CHARS:
            changes[name] = _cut(value, MAX_NAME_CHARS)
    return msgspec.structs.replace(letter, **changes) if changes else letter


def _cut(text: str, limit: int) -> str:
    # The note takes at most 40 characters, so the result is within the limit too.
    head = limit - 40
    return f"{text[:head]}... ({len(text) - head:,} characters cut)"
