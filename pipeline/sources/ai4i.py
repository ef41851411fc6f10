"""Reader for the AI4I 2020 predictive maintenance CSV: one machine, one unit per row.

The file has no timestamps, so the reader builds a time line from the tool wear column.
The data set adds 2, 3 or 5 minutes of tool wear per unit of variant L, M or H. So a
unit's processing time is the wear its row adds, and wear dropping back to 0 marks a
tool change. Each tool life (a run between tool changes) becomes one production order.
docs/inputs.md describes every event and constant.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from contracts.events import (
    Component,
    DowntimeEnded,
    DowntimeStarted,
    MachineStateChanged,
    MaterialConsumed,
    OperationSpec,
    PlantEvent,
    ProductionConfirmed,
    Quantity,
    WorkOrderReleased,
)
from pipeline.subjects import validate_token

__all__ = [
    "DEFAULT_START",
    "FAILURE_MODES",
    "PRODUCT_MATERIAL",
    "REPAIR_TIME",
    "TOOL_CHANGE_TIME",
    "VARIANT_MINUTES",
    "is_ai4i_header",
    "read_ai4i",
]

logger = logging.getLogger(__name__)

SOURCE = "ai4i2020"

DEFAULT_START = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)

VARIANT_MINUTES = {"L": 2, "M": 3, "H": 5}
"""Tool wear in minutes that one unit of each product variant adds, per the data set's
description. It is also the unit's processing time and the ideal cycle time."""

FAILURE_MODES = ("TWF", "HDF", "PWF", "OSF", "RNF")

REPAIR_TIME = dt.timedelta(minutes=30)
"""Assumed length of the unplanned stop after a machine failure (the file has none)."""

TOOL_CHANGE_TIME = dt.timedelta(minutes=10)
"""Assumed length of the planned stop to change a worn tool (the file has none)."""

PRODUCT_MATERIAL = "AI4I-PART"

REQUIRED_COLUMNS = (
    "UDI",
    "Type",
    "Tool wear [min]",
    "Machine failure",
    *FAILURE_MODES,
)

_ONE = Quantity(Decimal(1), "EA")
_ZERO = Quantity(Decimal(0), "EA")


@dataclass(frozen=True, slots=True)
class _Unit:
    line: int
    udi: int
    variant: str
    tool_wear: int
    failed: bool
    failure_modes: tuple[str, ...]

    @property
    def downtime_reason(self) -> str:
        # Some failure rows (9 in the published file) set no mode, and a guessed mode
        # would be a false reason.
        return "+".join(self.failure_modes) or "unspecified"


def is_ai4i_header(line: str) -> bool:
    """Return True if `line` is a CSV header with every column the reader needs."""
    columns = {column.strip() for column in next(csv.reader([line]), [])}
    return all(name in columns for name in REQUIRED_COLUMNS)


def read_ai4i(
    path: Path,
    *,
    plant: str = "AI4I",
    work_center: str = "AI4I-MILL",
    start: dt.datetime = DEFAULT_START,
    repair_time: dt.timedelta = REPAIR_TIME,
    tool_change_time: dt.timedelta = TOOL_CHANGE_TIME,
) -> Iterator[PlantEvent]:
    """Read an AI4I 2020 CSV file into plant events, in the order a plant sends them.

    The first unit starts at `start`, which must carry a UTC offset. Raises ValueError
    naming the file, line and value when a row cannot be read.
    """
    validate_token(plant, "plant")
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError(
            f"start must carry a UTC offset, got naive {start.isoformat()}; "
            "pass for example datetime(2020, 1, 1, tzinfo=UTC)"
        )
    path = Path(path)
    units = _read_units(path)
    tool_lives = _split_tool_lives(units)
    logger.info(
        "%s: %d units in %d tool lives, %d failures",
        path,
        len(units),
        len(tool_lives),
        sum(unit.failed for unit in units),
    )
    timeline = _Timeline(
        plant=plant,
        work_center=work_center,
        clock=start.astimezone(dt.UTC),
        repair_time=repair_time,
        tool_change_time=tool_change_time,
    )
    return timeline.events(tool_lives)


def _read_units(path: Path) -> list[_Unit]:
    # utf-8-sig drops the byte order mark, and newline="" lets csv handle CRLF endings.
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file)
        missing = [
            name for name in REQUIRED_COLUMNS if name not in (reader.fieldnames or [])
        ]
        if missing:
            raise ValueError(
                f"{path}:1: not an AI4I 2020 CSV, columns {missing} are missing "
                f"from the header {reader.fieldnames}"
            )
        units = [_parse_row(path, reader.line_num, row) for row in reader]

    seen: dict[int, int] = {}
    for unit in units:
        if unit.udi in seen:
            raise ValueError(
                f"{path}:{unit.line}: UDI {unit.udi} repeats line {seen[unit.udi]}; "
                "event ids are built from the UDI, so each must be unique"
            )
        seen[unit.udi] = unit.line
    return units


def _parse_row(path: Path, line: int, row: dict[str, str]) -> _Unit:
    def field(name: str) -> str:
        value = row.get(name)
        if value is None:
            raise ValueError(
                f"{path}:{line}: row has no {name!r} value: too few columns"
            )
        return value.strip()

    def integer(name: str) -> int:
        value = field(name)
        try:
            return int(value)
        except ValueError:
            raise ValueError(
                f"{path}:{line}: invalid {name!r} value {value!r}: "
                "expected a whole number"
            ) from None

    def flag(name: str) -> bool:
        value = field(name)
        if value not in ("0", "1"):
            raise ValueError(
                f"{path}:{line}: invalid {name!r} value {value!r}: expected 0 or 1"
            )
        return value == "1"

    variant = field("Type")
    if variant not in VARIANT_MINUTES:
        raise ValueError(
            f"{path}:{line}: invalid 'Type' value {variant!r}: expected one of "
            f"{', '.join(VARIANT_MINUTES)}"
        )
    tool_wear = integer("Tool wear [min]")
    if tool_wear < 0:
        raise ValueError(
            f"{path}:{line}: invalid 'Tool wear [min]' value {tool_wear}: "
            "must not be negative"
        )
    return _Unit(
        line=line,
        udi=integer("UDI"),
        variant=variant,
        tool_wear=tool_wear,
        failed=flag("Machine failure"),
        failure_modes=tuple(mode for mode in FAILURE_MODES if flag(mode)),
    )


def _split_tool_lives(units: Sequence[_Unit]) -> list[list[_Unit]]:
    # Any drop in tool wear is a tool change. In the published file it drops to 0.
    tool_lives: list[list[_Unit]] = []
    for unit in units:
        if not tool_lives or unit.tool_wear < tool_lives[-1][-1].tool_wear:
            tool_lives.append([])
        tool_lives[-1].append(unit)
    return tool_lives


@dataclass(slots=True)
class _Timeline:
    plant: str
    work_center: str
    clock: dt.datetime
    repair_time: dt.timedelta
    tool_change_time: dt.timedelta

    def events(self, tool_lives: Sequence[Sequence[_Unit]]) -> Iterator[PlantEvent]:
        yield MachineStateChanged(
            event_id=f"{self.plant}-machine-running",
            plant=self.plant,
            occurred_at=self.clock,
            source=SOURCE,
            work_center=self.work_center,
            machine=self.work_center,
            state="running",
        )
        for number, units in enumerate(tool_lives, start=1):
            order = f"TOOL-{number:03d}"
            # A tool life that ended in a failure had its tool replaced during the
            # repair, so only a run that ended without one gets a planned tool change.
            if number > 1 and not tool_lives[number - 2][-1].failed:
                yield from self._downtime(
                    f"{self.plant}-{order}-tool-change",
                    "tool change",
                    planned=True,
                    duration=self.tool_change_time,
                )
            yield self._release(order, units)
            for position, unit in enumerate(units):
                following = units[position + 1] if position + 1 < len(units) else None
                yield from self._unit(order, unit, following)

    def _release(self, order: str, units: Sequence[_Unit]) -> WorkOrderReleased:
        per_variant = Counter(unit.variant for unit in units)
        return WorkOrderReleased(
            event_id=f"{self.plant}-{order}-released",
            plant=self.plant,
            occurred_at=self.clock,
            source=SOURCE,
            order=order,
            work_center=self.work_center,
            material=PRODUCT_MATERIAL,
            quantity=Quantity(Decimal(len(units)), "EA"),
            components=[
                Component(
                    material=f"BLANK-{variant}",
                    quantity=Quantity(Decimal(per_variant[variant]), "EA"),
                    operation=f"MACHINING-{variant}",
                )
                for variant in VARIANT_MINUTES
                if per_variant[variant]
            ],
            operations=[
                OperationSpec(
                    operation=f"MACHINING-{variant}",
                    work_center=self.work_center,
                    ideal_cycle_time_s=Decimal(minutes * 60),
                )
                for variant, minutes in VARIANT_MINUTES.items()
            ],
        )

    def _unit(
        self, order: str, unit: _Unit, following: _Unit | None
    ) -> Iterator[PlantEvent]:
        operation = f"MACHINING-{unit.variant}"
        prefix = f"{self.plant}-{unit.udi:06d}"
        started_at = self.clock
        # Wear in the file is read before the unit runs, so the next row shows what
        # this unit added. The last unit of a tool life has no next row and gets its
        # variant's nominal wear.
        if following is None:
            minutes = VARIANT_MINUTES[unit.variant]
        else:
            minutes = following.tool_wear - unit.tool_wear
        self.clock += dt.timedelta(minutes=minutes)

        yield MaterialConsumed(
            event_id=f"{prefix}-consumed",
            plant=self.plant,
            occurred_at=started_at,
            source=SOURCE,
            order=order,
            work_center=self.work_center,
            material=f"BLANK-{unit.variant}",
            quantity=_ONE,
            operation=operation,
        )
        yield ProductionConfirmed(
            event_id=f"{prefix}-confirmed",
            plant=self.plant,
            occurred_at=self.clock,
            source=SOURCE,
            order=order,
            work_center=self.work_center,
            good=_ZERO if unit.failed else _ONE,
            scrap=_ONE if unit.failed else None,
            operation=operation,
            final=following is None,
            started_at=started_at,
        )
        if unit.failed:
            yield from self._downtime(
                f"{prefix}-failure",
                unit.downtime_reason,
                planned=False,
                duration=self.repair_time,
            )

    def _downtime(
        self, downtime_id: str, reason: str, *, planned: bool, duration: dt.timedelta
    ) -> Iterator[PlantEvent]:
        yield DowntimeStarted(
            event_id=f"{downtime_id}-started",
            plant=self.plant,
            occurred_at=self.clock,
            source=SOURCE,
            work_center=self.work_center,
            machine=self.work_center,
            downtime_id=downtime_id,
            reason=reason,
            planned=planned,
        )
        self.clock += duration
        yield DowntimeEnded(
            event_id=f"{downtime_id}-ended",
            plant=self.plant,
            occurred_at=self.clock,
            source=SOURCE,
            work_center=self.work_center,
            machine=self.work_center,
            downtime_id=downtime_id,
        )
