"""Recognize an input file by its content and send it to the matching reader."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from contracts.codec import encode
from contracts.events import PlantEvent
from pipeline.sources.ai4i import is_ai4i_header, read_ai4i
from pipeline.sources.b2mml import message_noun, read_b2mml
from pipeline.sources.event_lines import (
    decode_event_lines,
    is_event_line,
    read_event_lines,
)
from pipeline.sources.secom import is_secom_line, read_secom
from pipeline.subjects import event_subject

__all__ = [
    "SUPPORTED_KINDS",
    "SourceKind",
    "detect_kind",
    "read_events",
    "read_messages",
]

logger = logging.getLogger(__name__)

SourceKind = Literal["ai4i", "secom", "b2mml", "events"]

SUPPORTED_KINDS = (
    "an AI4I 2020 CSV (header with UDI, Type, Tool wear [min], Machine failure and "
    "the failure modes), a SECOM labels file (lines like -1 "
    '"19/07/2008 11:55:00"), a B2MML V0401 ProductionSchedule, ProductionPerformance, '
    "MaterialInformation or MaterialDefinition message, a JSON Lines file of "
    "canonical events (one object per line), or a folder of these"
)

_BOM = b"\xef\xbb\xbf"
_SNIFF_BYTES = 4096


def detect_kind(path: Path) -> SourceKind | None:
    """Return the kind of input file `path` holds, judged by its content, or None."""
    with Path(path).open("rb") as file:
        head = file.read(_SNIFF_BYTES).removeprefix(_BOM)
    # A cut multi-byte character at the end of the sample must not hide the first line.
    text = head.decode("utf-8", errors="replace")
    if text.lstrip().startswith("<"):
        return "b2mml" if message_noun(path) is not None else None
    # Blank lines before the first, which a JSON Lines file may have, tell nothing.
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    if is_ai4i_header(first_line):
        return "ai4i"
    if is_secom_line(first_line):
        return "secom"
    if is_event_line(first_line):
        return "events"
    return None


def read_events(path: Path) -> Iterator[PlantEvent]:
    """Read plant events from one input file, or from every input file in a folder.

    A folder is read recursively in sorted path order, except that B2MML performance
    messages come after everything else, so orders are released before their reports.
    Files of no known kind in a folder are skipped with a warning. A single file of no
    known kind raises ValueError, and so does a row that cannot be read.
    """
    path = Path(path)
    inputs = _inputs(path)
    if not path.is_dir():
        # A single file's reader checks the whole file now, not when iterated.
        [(file, kind)] = inputs
        return _read(file, kind)
    return itertools.chain.from_iterable(_read(file, kind) for file, kind in inputs)


def read_messages(
    path: Path, *, max_bytes: int | None = None
) -> Iterator[tuple[str, bytes]]:
    """Read (subject, JSON) messages to publish from one input file or a folder.

    The same files as `read_events`, in the same order. The events of the data sets are
    encoded. The lines of a JSON Lines file of events are passed on unchanged, so that
    the pipeline validates them and dead-letters those that break the contract. A line
    longer than `max_bytes`, the server's max_payload, raises ValueError.
    """
    for file, kind in _inputs(Path(path)):
        if kind == "events":
            yield from read_event_lines(file, max_bytes=max_bytes)
            continue
        for event in _read(file, kind):
            tag = event.__struct_config__.tag
            yield event_subject(event.plant, str(tag)), encode(event)


def _inputs(path: Path) -> list[tuple[Path, SourceKind]]:
    """Return the input files of `path` with their kinds, in the order to read them."""
    if path.is_dir():
        return _folder_inputs(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"input {path} does not exist; pass a data file or a folder"
        )
    kind = detect_kind(path)
    if kind is None:
        if not path.read_bytes().removeprefix(_BOM).strip():
            raise ValueError(f"{path}: the file is empty; pass a file with events")
        raise ValueError(
            f"{path}: unknown input file kind; supported are {SUPPORTED_KINDS}"
        )
    return [(path, kind)]


def _read(path: Path, kind: SourceKind) -> Iterator[PlantEvent]:
    if kind == "ai4i":
        return read_ai4i(path)
    if kind == "secom":
        return read_secom(path)
    if kind == "events":
        return iter(decode_event_lines(path))
    return read_b2mml(path)


def _folder_inputs(folder: Path) -> list[tuple[Path, SourceKind]]:
    inputs: list[tuple[int, Path, SourceKind]] = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        kind = detect_kind(path)
        if kind is None:
            logger.warning("%s: skipped, not a supported input file kind", path)
            continue
        is_report = kind == "b2mml" and message_noun(path) == "ProductionPerformance"
        inputs.append((int(is_report), path, kind))
    inputs.sort(key=lambda item: (item[0], item[1]))
    logger.info("%s: reading %d input files", folder, len(inputs))
    # Readers open and check their file when the caller reaches it, not all up front.
    return [(path, kind) for _, path, kind in inputs]
