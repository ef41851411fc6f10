"""JSON Lines files of canonical plant events, one event object per line.

The other readers build events from a public data set. This one reads events that a
user wrote, in the contract `plantstream schema events` prints, to try the pipeline
with their own plant's messages. `read_event_lines` passes each line on byte for byte.
The pipeline then validates it and dead-letters what breaks the contract, as it would a
plant system's message. Only the subject comes from the line's `plant` and
`event_type`. `decode_event_lines` decodes and validates every line instead, for Python
code that wants the events themselves.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import msgspec

from contracts.codec import decode_event, describe_decode_error
from contracts.events import PlantEvent
from pipeline.subjects import EDGE_BATCH_TYPE_TOKEN, event_subject, validate_token

__all__ = ["decode_event_lines", "is_event_line", "read_event_lines"]

logger = logging.getLogger(__name__)


class _Subject(msgspec.Struct):
    """The two fields of an event that its subject is built from."""

    plant: str
    event_type: str


_subject_decoder = msgspec.json.Decoder(_Subject)

_FIELD = {
    name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*"([^"\\]*)"')
    for name in ("plant", "event_type")
}
"""A string field as written, for a line that is not valid JSON elsewhere."""

_FIX = "write one event object per line, as `plantstream schema events` prints"


def is_event_line(line: str) -> bool:
    """Return whether the first line of a file looks like a JSON event object."""
    # A JSON object that names neither field is some other JSON file, such as a
    # config, which a folder may hold beside the inputs.
    return line.lstrip().startswith("{") and (
        '"event_type"' in line or '"plant"' in line
    )


def _lines(path: Path) -> list[tuple[int, bytes]]:
    """Return (line number, bytes) of each line that is not blank, without its end."""
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    return [
        (number, line.rstrip(b"\r"))
        for number, line in enumerate(data.split(b"\n"), start=1)
        if line.strip()
    ]


def _subject_of(line: bytes) -> str:
    """Return the subject of an event line; raise ValueError naming what is missing."""
    try:
        fields = _subject_decoder.decode(line)
        plant, event_type = fields.plant, fields.event_type
    except msgspec.ValidationError as error:
        raise ValueError(str(error)) from None
    except msgspec.DecodeError as error:
        # Invalid JSON elsewhere in the line (a bad escape, a cut-off value) is for the
        # pipeline to dead-letter with its detail, if the subject can still be read:
        # each field written once, without escapes. Written twice, one may be nested.
        found = {name: field.findall(line) for name, field in _FIELD.items()}
        if len(found["plant"]) != 1 or len(found["event_type"]) != 1:
            raise ValueError(
                f"{error}, and without valid JSON the line's plant and event_type "
                "cannot be told apart from other fields"
            ) from None
        plant = found["plant"][0].decode("utf-8", errors="replace")
        event_type = found["event_type"][0].decode("utf-8", errors="replace")
    validate_token(event_type, "event_type")
    if event_type == EDGE_BATCH_TYPE_TOKEN:
        raise ValueError(
            f"event_type {event_type!r} is the subject token of edge batches, not an "
            "event type"
        )
    return event_subject(plant, event_type)


def read_event_lines(
    path: Path, *, max_bytes: int | None = None
) -> list[tuple[str, bytes]]:
    """Return (subject, line) for every event line of `path`, the line unchanged.

    The whole file is checked first: a line whose `plant` and `event_type` cannot be
    read as strings that make a NATS subject, or that is longer than `max_bytes` (the
    server's max_payload), raises ValueError as `path:line: what is wrong`, and nothing
    is returned. Anything else the event contract requires, valid JSON included, is
    left for the pipeline to check.
    """
    messages: list[tuple[str, bytes]] = []
    for number, line in _lines(path):
        if max_bytes is not None and len(line) > max_bytes:
            raise ValueError(
                f"{path}:{number}: the line is {len(line):,} bytes, more than the "
                f"{max_bytes:,} bytes the NATS server takes in one message "
                "(max_payload); shorten the event, or raise max_payload on the server"
            )
        try:
            subject = _subject_of(line)
        except ValueError as error:
            raise ValueError(
                f"{path}:{number}: {error}; the subject needs the line's plant and "
                f"event_type, so {_FIX}"
            ) from None
        messages.append((subject, line))
    logger.info("%s: read %d event lines", path, len(messages))
    return messages


def decode_event_lines(path: Path) -> list[PlantEvent]:
    """Decode and validate every event line of `path`.

    A line that breaks the event contract raises ValueError as `path:line: what is
    wrong`, with the offending value, and nothing is returned.
    """
    events: list[PlantEvent] = []
    for number, line in _lines(path):
        try:
            events.append(decode_event(line))
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise ValueError(
                f"{path}:{number}: {describe_decode_error(error, line)}"
            ) from None
    return events
