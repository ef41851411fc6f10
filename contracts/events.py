"""Canonical plant events: what MES, quality, maintenance and warehouse systems publish.

Every event is a msgspec Struct in the tagged union `PlantEvent`, tagged by
`event_type`. Quantities are `Quantity` (a Decimal with its unit of measure) and every
timestamp must carry a UTC offset, so a naive timestamp fails to decode instead of being
guessed.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated, Literal

import msgspec
from msgspec.structs import force_setattr

__all__ = [
    "SCHEMA_VERSION",
    "Component",
    "ConsumptionReversed",
    "DowntimeEnded",
    "DowntimeStarted",
    "Event",
    "InspectionRecorded",
    "MachineStateChanged",
    "MaterialConsumed",
    "OperationCompleted",
    "OperationSpec",
    "OperationStarted",
    "ORDER_SCOPED_EVENTS",
    "PlantEvent",
    "ProductionCancelled",
    "ProductionConfirmed",
    "QualityHoldApplied",
    "QualityHoldReleased",
    "Quantity",
    "ShipmentConfirmed",
    "WorkOrderReleased",
]

SCHEMA_VERSION = 1

QUANTITY_SCALE = 9
"""Decimal places a quantity may have; snapshot tables store DECIMAL(38, 9)."""

AwareDatetime = Annotated[dt.datetime, msgspec.Meta(tz=True)]
"""A timestamp that must carry a UTC offset ("Z" or "+02:00"); naive ones fail to
decode."""

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]

Text = Annotated[str, msgspec.Meta(max_length=256)]
"""An optional text or id field, bounded so that a posting stays far below 1 MiB."""

MAX_LINES = 1000
"""Bill-of-material lines and routing operations one release may carry."""

QUANTITY_INTEGER_DIGITS = 15
"""Digits a quantity may have before the point. DECIMAL(38, 9) leaves 29, and the
margin keeps the sums an order builds up (all confirmations of an order, BOM lines of
one material, a quantity converted from T to MG) inside those 29 digits."""

EARLIEST_TIME = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
"""Event times before this are rejected: no plant system sends them on purpose, and
times near year 1 cannot be converted to UTC or stored."""


class Quantity(msgspec.Struct, frozen=True, gc=False):
    """A non-negative, finite decimal amount in a unit of measure such as "KG" or "EA".

    On the wire `value` is a JSON string ("12.500") or a JSON number; both decode to the
    exact Decimal as written, never through a float.
    """

    value: Decimal
    uom: NonEmpty

    def __post_init__(self) -> None:
        if not self.value.is_finite():
            raise ValueError(
                f"quantity must be a finite number, got {self.value}; send a decimal "
                'number such as "12.5"'
            )
        if _written_places(self.value) > QUANTITY_SCALE:
            if _decimal_places(self.value) > QUANTITY_SCALE:
                raise ValueError(
                    f"quantity {shown_decimal(self.value)} has more than "
                    f"{QUANTITY_SCALE} decimal places, which the postings and snapshot "
                    "tables cannot store exactly"
                )
            force_setattr(self, "value", _at_scale(self.value))
        if self.value.adjusted() >= QUANTITY_INTEGER_DIGITS:
            if self.value:
                raise ValueError(
                    f"quantity {shown_decimal(self.value)} has more than "
                    f"{QUANTITY_INTEGER_DIGITS} digits before the decimal point; "
                    "larger quantities would let an order's totals outgrow the "
                    "DECIMAL(38, 9) columns of postings and snapshots"
                )
            # A zero such as 0E+20 has no digits before the point to count.
            force_setattr(self, "value", Decimal(0))
        if self.value < 0:
            raise ValueError(
                f"quantity must not be negative, got {shown_decimal(self.value)} "
                f"{self.uom}; send a reversal event to take a quantity back"
            )


SHOWN_DIGITS = 30
"""Digits of a quantity that an error message writes out in full. Longer values are
abbreviated."""


def shown_decimal(value: Decimal) -> str:
    """Return `value` for an error message: in plain notation while that stays short,
    else abbreviated in scientific notation.

    A value such as "1e9999999" is 10 characters on the wire but ten million in plain
    notation, which would make its dead letter too large to publish.
    """
    _, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        return str(value)  # NaN or Infinity
    if len(digits) <= SHOWN_DIGITS and -SHOWN_DIGITS <= exponent <= SHOWN_DIGITS:
        return f"{value:f}"
    if len(digits) <= SHOWN_DIGITS:
        return str(value)
    sign = "-" if value < 0 else ""
    leading = "".join(map(str, digits[:SHOWN_DIGITS]))
    return (
        f"{sign}{leading[0]}.{leading[1:]}...E{value.adjusted():+d} "
        f"({len(digits):,} digits)"
    )


def _written_places(value: Decimal) -> int:
    """Return the digits after the decimal point as `value` was written, trailing zeros
    included: an upper bound of `_decimal_places`, found from str(), which took a
    quarter of the time of as_tuple() (the check runs for every decoded quantity)."""
    text = str(value)
    if "E" in text:
        # Scientific notation: str() writes it for exponents above 0 and for values
        # below 0.000001; the digits tell the places.
        exponent = value.as_tuple().exponent
        return -exponent if isinstance(exponent, int) and exponent < 0 else 0
    point = text.find(".")
    return 0 if point < 0 else len(text) - point - 1


_SCALE_QUANTUM = Decimal(1).scaleb(-QUANTITY_SCALE)


def _at_scale(value: Decimal) -> Decimal:
    """Return `value`, whose places past QUANTITY_SCALE are all zeros, at that scale.

    The digits stay the same, but Arrow cannot store the value as written: it rejects
    "5." with 40 zeros for DECIMAL(38, 9), and pyarrow 26 crashed the process on
    "0E-999999999", so one such event would stop every checkpoint.
    """
    return value.quantize(_SCALE_QUANTUM)


def _decimal_places(value: Decimal) -> int:
    """Return the decimal places `value` needs: trailing zeros, as in "5.000000000000",
    lose nothing when the tables store it at 9 places, so they do not count."""
    # Counted from the digits, not with normalize(), which rounds a value below the
    # context's smallest exponent, such as 1e-9999999, to 0.
    _, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int) or not any(digits):
        return 0
    trailing_zeros = len(digits) - len("".join(map(str, digits)).rstrip("0"))
    return max(0, -(exponent + trailing_zeros))


def _require_utc_offset(value: dt.datetime, field: str) -> None:
    # msgspec's tz=True already rejects naive values on decode; this also guards
    # events built in Python, where the annotation is not checked.
    if (
        type(value.tzinfo) is dt.timezone
        and EARLIEST_TIME.year < value.year < dt.MAXYEAR
    ):
        # Every decoded time of a working plant takes this path: a fixed offset always
        # gives one, and no offset under a day moves such a year out of 1971 to 9998.
        # The full check took 4% of a partition's time.
        return
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{field} must carry a UTC offset, got naive {value.isoformat()}"
        )
    try:
        in_range = value.astimezone(dt.UTC) >= EARLIEST_TIME
    except OverflowError:
        if value.year == dt.MAXYEAR:
            raise ValueError(
                f"{field} {value.isoformat()} is after the last time that can be "
                "stored in UTC, 9999-12-31T23:59:59.999999Z; check the clock and the "
                "time format of the source system"
            ) from None
        in_range = False
    if not in_range:
        raise ValueError(
            f"{field} {value.isoformat()} is before {EARLIEST_TIME.isoformat()}; "
            "check the clock and the time format of the source system"
        )


# gc=False on the event structs: an event contains only strings, numbers, times and
# lists of frozen structs, so it can never be part of a reference cycle. Skipping the
# cycle collector saved about a tenth of the partition's time per event (in-memory
# benchmark, CPython 3.11). Each event type repeats frozen=True: msgspec would inherit
# it, but type checkers read only a class's own arguments.
class Event(
    msgspec.Struct,
    frozen=True,
    gc=False,
    kw_only=True,
    omit_defaults=True,
    tag_field="event_type",
):
    """Fields every plant event carries.

    `order` is the production order the event belongs to, where it belongs to one;
    events without an order (machine states, shipments) are keyed by machine or
    delivery.
    """

    event_id: NonEmpty
    plant: NonEmpty
    occurred_at: AwareDatetime
    source: NonEmpty
    schema_version: int = SCHEMA_VERSION
    order: NonEmpty | None = None
    work_center: NonEmpty | None = None

    def __post_init__(self) -> None:
        _require_utc_offset(self.occurred_at, "occurred_at")


class Component(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """A bill-of-material line: a component's standard quantity for the whole order."""

    material: NonEmpty
    quantity: Quantity
    operation: Text | None = None
    storage_location: Text | None = None


class OperationSpec(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """An operation of a routing with its ideal cycle time (ISO 22400 PRI) per unit."""

    operation: NonEmpty
    work_center: NonEmpty
    ideal_cycle_time_s: Decimal

    def __post_init__(self) -> None:
        cycle_time = self.ideal_cycle_time_s
        if (
            not cycle_time.is_finite()
            or cycle_time <= 0
            or cycle_time.adjusted() >= QUANTITY_INTEGER_DIGITS
            or _decimal_places(cycle_time) > QUANTITY_SCALE
        ):
            raise ValueError(
                f"ideal_cycle_time_s of operation {self.operation} must be a positive "
                f"number of seconds with at most {QUANTITY_SCALE} decimal places and "
                f"{QUANTITY_INTEGER_DIGITS} digits before the point, got "
                f"{shown_decimal(self.ideal_cycle_time_s)}"
            )
        if _written_places(cycle_time) > QUANTITY_SCALE:
            force_setattr(self, "ideal_cycle_time_s", _at_scale(cycle_time))


class WorkOrderReleased(Event, tag="work_order_released", frozen=True):
    """A production order released to the shop floor, with its BOM and routing."""

    material: NonEmpty
    quantity: Quantity
    components: Annotated[list[Component], msgspec.Meta(max_length=MAX_LINES)] = []
    operations: Annotated[list[OperationSpec], msgspec.Meta(max_length=MAX_LINES)] = []
    storage_location: Text | None = None


class OperationStarted(Event, tag="operation_started", frozen=True):
    operation: NonEmpty


class OperationCompleted(Event, tag="operation_completed", frozen=True):
    operation: NonEmpty


class ProductionConfirmed(Event, tag="production_confirmed", frozen=True):
    """Output reported against an order: good, scrap and rework, in one unit."""

    good: Quantity
    scrap: Quantity | None = None
    rework: Quantity | None = None
    operation: Text | None = None
    lot: Text | None = None
    final: bool = False
    started_at: AwareDatetime | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.started_at is not None:
            _require_utc_offset(self.started_at, "started_at")


class ProductionCancelled(Event, tag="production_cancelled", frozen=True):
    """Cancels an earlier `production_confirmed` event, named by its event id."""

    cancels_event_id: NonEmpty


class MaterialConsumed(Event, tag="material_consumed", frozen=True):
    material: NonEmpty
    quantity: Quantity
    lot: Text | None = None
    storage_location: Text | None = None
    operation: Text | None = None


class ConsumptionReversed(Event, tag="consumption_reversed", frozen=True):
    """Reverses an earlier `material_consumed` event, named by its event id."""

    reverses_event_id: NonEmpty


class InspectionRecorded(Event, tag="inspection_recorded", frozen=True):
    """A quality inspection result; a failed one holds its lot, or else its order."""

    result: Literal["pass", "fail"]
    lot: Text | None = None
    material: Text | None = None
    characteristic: Text | None = None


class QualityHoldApplied(Event, tag="quality_hold_applied", frozen=True):
    """Blocks stock of an order, a lot or a material until a matching release."""

    hold_id: NonEmpty
    scope: Literal["order", "lot", "material"] = "order"
    lot: Text | None = None
    material: Text | None = None
    reason: Text | None = None


class QualityHoldReleased(Event, tag="quality_hold_released", frozen=True):
    hold_id: NonEmpty


MachineState = Literal["running", "idle", "down", "setup", "maintenance"]


class MachineStateChanged(Event, tag="machine_state_changed", frozen=True):
    """A machine entered `state`; it stays there until its next state change."""

    machine: NonEmpty
    state: MachineState
    reason: Text | None = None
    planned: bool = False


class DowntimeStarted(Event, tag="downtime_started", frozen=True):
    machine: NonEmpty
    downtime_id: NonEmpty
    reason: Text | None = None
    planned: bool = False


class DowntimeEnded(Event, tag="downtime_ended", frozen=True):
    machine: NonEmpty
    downtime_id: NonEmpty


class ShipmentConfirmed(Event, tag="shipment_confirmed", frozen=True):
    """A delivery left the plant. The ERP delivery posts its own goods issue (601)."""

    delivery: NonEmpty
    material: NonEmpty
    quantity: Quantity
    customer: Text | None = None


PlantEvent = (
    WorkOrderReleased
    | OperationStarted
    | OperationCompleted
    | ProductionConfirmed
    | ProductionCancelled
    | MaterialConsumed
    | ConsumptionReversed
    | InspectionRecorded
    | QualityHoldApplied
    | QualityHoldReleased
    | MachineStateChanged
    | DowntimeStarted
    | DowntimeEnded
    | ShipmentConfirmed
)

EVENT_TYPES: tuple[str, ...] = tuple(
    cls.__struct_config__.tag for cls in PlantEvent.__args__
)

ORDER_SCOPED_EVENTS: tuple[type[Event], ...] = (
    WorkOrderReleased,
    OperationStarted,
    OperationCompleted,
    ProductionConfirmed,
    ProductionCancelled,
    MaterialConsumed,
    ConsumptionReversed,
    InspectionRecorded,
)
"""Event types that belong to one production order and must name it in `order`, which
the base class leaves optional for machine, shipment and plant-wide hold events. The
partition rejects one without an order as `invalid`."""
