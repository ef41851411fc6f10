"""Readers that turn public data files into canonical plant events.

`read_events` recognizes the file by its content. Each module also has its own reader
with the options of its format (plant id, start time, time zone).
"""

from pipeline.sources.ai4i import read_ai4i
from pipeline.sources.b2mml import read_b2mml
from pipeline.sources.files import SUPPORTED_KINDS, SourceKind, detect_kind, read_events
from pipeline.sources.secom import read_secom

__all__ = [
    "SUPPORTED_KINDS",
    "SourceKind",
    "detect_kind",
    "read_ai4i",
    "read_b2mml",
    "read_events",
    "read_secom",
]
