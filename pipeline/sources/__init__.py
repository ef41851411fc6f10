"""Readers that turn public data files, and files of canonical events, into plant
events.

`read_events` recognizes the file by its content. Each module also has its own reader
with the options of its format (plant id, start time, time zone). `read_messages` gives
the messages to publish, with the lines of an events file unchanged.
"""

from pipeline.sources.ai4i import read_ai4i
from pipeline.sources.b2mml import read_b2mml
from pipeline.sources.event_lines import decode_event_lines, read_event_lines
from pipeline.sources.files import (
    SUPPORTED_KINDS,
    SourceKind,
    detect_kind,
    read_events,
    read_messages,
)
from pipeline.sources.secom import read_secom

__all__ = [
    "SUPPORTED_KINDS",
    "SourceKind",
    "decode_event_lines",
    "detect_kind",
    "read_ai4i",
    "read_b2mml",
    "read_event_lines",
    "read_events",
    "read_messages",
    "read_secom",
]
