"""Reader for the SECOM labels file: one wafer lot per line, its test result and time.

A line reads `-1 "19/07/2008 11:55:00"` (-1 pass, 1 fail, day/month/year). Each line
becomes one production order for one lot, released, confirmed and inspected at the
line's time. The file has no time zone, so the caller names the one its clock used.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from contracts.events import (
    InspectionRecorded,
    PlantEvent,
    ProductionConfirmed,
    Quantity,
    WorkOrderReleased,
)
from pipeline.subjects import validate_token

__all__ = ["LOT_MATERIAL", "is_secom_line", "read_secom"]

logger = logging.getLogger(__name__)

SOURCE = "secom"

LOT_MATERIAL = "SECOM-WAFER-LOT"

CHARACTERISTIC = "in-house line test"

_LINE = re.compile(r'(?P<label>-1|1)\s+"(?P<time>[^"]*)"')
_TIME_FORMAT = "%d/%m/%Y %H:%M:%S"
_ONE_LOT = Quantity(Decimal(1), "LOT")


def is_secom_line(line: str) -> bool:
    """Return True if `line` is a SECOM label: -1 or 1 and a quoted time."""
    return _LINE.fullmatch(line.strip()) is not None


def read_secom(
    path: Path,
    *,
    plant: str = "SECOM",
    tz: str = "UTC",
    work_center: str = "SECOM-LINE",
) -> Iterator[PlantEvent]:
    """Read a SECOM labels file into plant events, three per lot, in file order.

    `tz` is the IANA time zone of the file's clock, "UTC" unless the caller knows
    better. Times are converted to UTC. Raises ValueError naming the file, line and
    value when a line cannot be read.
    """
    validate_token(plant, "plant")
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ValueError(
            f"unknown time zone {tz!r} for {path}: pass an IANA name such as "
            "'UTC' or 'America/Phoenix'"
        ) from error
    lots = _read_lots(Path(path), zone)
    logger.info(
        "%s: %d lots, %d failed, times read in %s",
        path,
        len(lots),
        sum(not passed for _, _, passed in lots),
        tz,
    )
    return _events(lots, plant=plant, work_center=work_center)


def _read_lots(path: Path, zone: ZoneInfo) -> list[tuple[int, dt.datetime, bool]]:
    # Lines end in CR CR LF. Splitting on LF alone keeps line numbers as an editor shows
    # them, where universal newlines would see an empty line after each one.
    lots = []
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            if not text:
                continue
            match = _LINE.fullmatch(text)
            if match is None:
                raise ValueError(
                    f"{path}:{number}: invalid SECOM label line {text!r}: expected "
                    '-1 or 1 and a quoted "dd/mm/yyyy hh:mm:ss" time'
                )
            try:
                local = dt.datetime.strptime(match["time"], _TIME_FORMAT)
            except ValueError:
                raise ValueError(
                    f"{path}:{number}: invalid time {match['time']!r}: expected "
                    "dd/mm/yyyy hh:mm:ss"
                ) from None
            # NOTE: a wall-clock time that a DST change skips or repeats is read with
            # fold=0 (the earlier offset), because the file cannot tell the two apart.
            occurred_at = local.replace(tzinfo=zone).astimezone(dt.UTC)
            lots.append((number, occurred_at, match["label"] == "-1"))
    return lots


def _events(
    lots: list[tuple[int, dt.datetime, bool]], *, plant: str, work_center: str
) -> Iterator[PlantEvent]:
    for number, occurred_at, passed in lots:
        # The file has no lot ids: the line number is the only stable key it offers.
        order = f"LOT-{number:05d}"
        yield WorkOrderReleased(
            event_id=f"{plant}-{order}-released",
            plant=plant,
            occurred_at=occurred_at,
            source=SOURCE,
            order=order,
            work_center=work_center,
            material=LOT_MATERIAL,
            quantity=_ONE_LOT,
        )
        yield ProductionConfirmed(
            event_id=f"{plant}-{order}-confirmed",
            plant=plant,
            occurred_at=occurred_at,
            source=SOURCE,
            order=order,
            work_center=work_center,
            good=_ONE_LOT,
            lot=order,
            final=True,
        )
        yield InspectionRecorded(
            event_id=f"{plant}-{order}-inspected",
            plant=plant,
            occurred_at=occurred_at,
            source=SOURCE,
            order=order,
            work_center=work_center,
            result="pass" if passed else "fail",
            lot=order,
            material=LOT_MATERIAL,
            characteristic=CHARACTERISTIC,
        )
