"""Per-order state and the ERP postings each order event causes.

`OrderBook.apply` is called by the partition state with an event whose order is known.
It updates the order and returns the postings and snapshot rows the event produced.
Stock is tracked per lot (batch) of the order's output, in unrestricted and blocked
stock, so that a quality hold blocks exactly the stock it covers.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import Any, cast

import msgspec

from actors.id_table import add_packed_id, event_hash, find_packed_id
from contracts import events as ev
from contracts.postings import (
    FROM_BLOCKED,
    GOODS_ISSUE,
    GOODS_ISSUE_REVERSAL,
    GOODS_RECEIPT,
    GOODS_RECEIPT_REVERSAL,
    TO_BLOCKED,
    GoodsMovement,
    OrderConfirmation,
    Posting,
    posting_key,
)

__all__ = [
    "UNIT_FACTORS",
    "HoldState",
    "NegativeStock",
    "OrderState",
    "Receipt",
    "UnmatchedReversal",
    "applied_event_type",
    "apply_hold",
    "apply_order_event",
    "hold_from_event",
    "convert_quantity",
    "describe_reversal_mismatch",
    "release_hold",
    "release_order",
    "reversed_event_id",
]

ZERO = Decimal(0)

QUANTUM_PLACES = 9
QUANTUM = Decimal(1).scaleb(-QUANTUM_PLACES)
"""A converted quantity is rounded once, half to even, to the tables' 9 places."""

UNIT_FACTORS: dict[str, tuple[str, Decimal]] = {
    "MG": ("mass", Decimal("0.000001")),
    "G": ("mass", Decimal("0.001")),
    "KG": ("mass", Decimal(1)),
    "T": ("mass", Decimal(1000)),
    "LB": ("mass", Decimal("0.45359237")),
    "ML": ("volume", Decimal("0.001")),
    "L": ("volume", Decimal(1)),
    "M3": ("volume", Decimal(1000)),
    "MM": ("length", Decimal("0.001")),
    "CM": ("length", Decimal("0.01")),
    "M": ("length", Decimal(1)),
    "KM": ("length", Decimal(1000)),
}
"""Units that convert into each other: dimension and size in the dimension's base unit
(KG, L, M). Every factor is exact, the pound by its 1959 definition."""


def convert_quantity(quantity: ev.Quantity, uom: str, label: str) -> Decimal:
    """Convert `quantity` to `uom`, rounded once to 9 places, or raise ValueError.

    The product of value and factors is computed with 60 significant digits, so the only
    rounding is the final one, half to even. `label` names the event in the error.
    """
    if quantity.uom == uom:
        return quantity.value
    source = UNIT_FACTORS.get(quantity.uom)
    target = UNIT_FACTORS.get(uom)
    if source is None or target is None or source[0] != target[0]:
        raise ValueError(_unit_mismatch_detail(quantity.uom, uom, label))
    with localcontext() as context:
        context.prec = 60
        exact = quantity.value * source[1] / target[1]
    rounded = exact.quantize(QUANTUM, rounding=ROUND_HALF_EVEN)
    if exact and not rounded:
        # Posted as nothing, the event would be applied and leave no trace.
        raise ValueError(
            f"{label} of {quantity.value:f} {quantity.uom} is {exact:f} {uom}, which "
            f"rounds to 0 at the {QUANTUM_PLACES} decimal places that postings keep; "
            f"report quantities of at least {QUANTUM:f} {uom}"
        )
    return rounded


def _unit_mismatch_detail(unit: str, posted: str, label: str) -> str:
    """Return the error for a quantity in `unit` that cannot be posted in `posted`.

    A code that differs from a known one only in case, such as kg for KG, gets its own
    message, because "no conversion between kg and KG" reads like a bug.
    """
    if unit != unit.strip():
        # Quoted, because "is in EA  but must be posted in EA" hides the space.
        return (
            f"{label} is in {unit!r}, which has white space around the unit code; "
            f"report it in {posted}"
        )
    if unit.upper() == posted.upper():
        return (
            f"{label} is in {unit}, but unit codes are case-sensitive and it must be "
            f"posted in {posted}; report it in {posted}"
        )
    known = unit.upper()
    target = UNIT_FACTORS.get(posted)
    if known in UNIT_FACTORS and target is not None:
        if UNIT_FACTORS[known][0] == target[0]:
            return (
                f"{label} is in {unit}, an unknown unit because unit codes are "
                f"case-sensitive; report it in {known}, which plantstream converts "
                f"to {posted}, or in {posted}"
            )
    return (
        f"{label} is in {unit} but must be posted in {posted}, and plantstream has "
        f"no conversion between them (convertible units, case-sensitive: "
        f"{', '.join(sorted(UNIT_FACTORS))}); report it in {posted}"
    )


# -- values shared between orders ----------------------------------------------------
#
# Orders repeat the same plants, materials, units, work centres, operation numbers and
# storage locations, and often the same quantities and cycle times. Each decoded copy
# costs 50 to 65 bytes for a short str and 104 for a Decimal (CPython 3.11, x86-64), so
# the order state keeps one shared object per distinct value instead.
#
# Strings go through sys.intern, but only master data, whose count is bounded. Lots and
# ids are not interned, because CPython 3.12.1 never frees an interned string (CPython
# issue gh-113993, fixed in later releases) and a lot per order would leak there.
# CPython 3.11 and 3.13 free an interned string once nothing else refers to it.

SHARED_DECIMALS_MAX = 4096
"""Distinct Decimal values shared_decimal keeps. Past it, the table starts empty
again. A full table takes about 0.8 MB (tracemalloc, CPython 3.11)."""

SHARED_ROUTINGS_MAX = 1024
"""Distinct routings shared_routing keeps. Past it, the table starts empty again. A full
table of two-operation routings takes about 0.8 MB (tracemalloc, CPython 3.11)."""

_shared_decimals: dict[str, Decimal] = {}


def shared_decimal(value: Decimal) -> Decimal:
    """Return a Decimal with the value and exponent of `value` that other orders share.

    The key is the string form, not the Decimal, because 12.5 == 12.50 but a posting of
    either carries its own digits, so the two must stay separate objects.
    """
    key = str(value)
    shared = _shared_decimals.get(key)
    if shared is None:
        if len(_shared_decimals) >= SHARED_DECIMALS_MAX:
            # Start over rather than drop the oldest key: finding the first key of a
            # dict after many deletions from its front scans every deleted slot.
            _shared_decimals.clear()
        shared = _shared_decimals[key] = value
    return shared


_shared_quantity_texts: dict[str, str] = {}


def shared_quantity_text(text: str) -> str:
    """Return a str equal to `text` that other orders share, as shared_decimal does
    for Decimals (and with the same bound), without interning quantities."""
    shared = _shared_quantity_texts.get(text)
    if shared is None:
        if len(_shared_quantity_texts) >= SHARED_DECIMALS_MAX:
            _shared_quantity_texts.clear()  # as in shared_decimal
        shared = _shared_quantity_texts[text] = text
    return shared


def _intern_or_none(value: str | None) -> str | None:
    return None if value is None else sys.intern(value)


# The structs below contain only strings, Decimals, datetimes, ints and dicts of the
# structs defined before them. So none can refer back to itself or to a struct that
# contains it, and no instance can be part of a reference cycle. gc=False drops the
# 16-byte GC header of each and keeps them out of the cyclic collector's passes.


class ComponentState(msgspec.Struct, gc=False):
    uom: str
    standard: str = "0"
    """The BOM's standard quantity as exact decimal text. Nothing computes with it
    before the snapshot, and the text of a quantity takes about half the memory of a
    Decimal (55 against 104 bytes), which a few BOM lines per open order add up to."""
    actual: Decimal = ZERO

    def standard_quantity(self) -> Decimal:
        return Decimal(self.standard)


class OperationState(msgspec.Struct, frozen=True, gc=False):
    """An operation of a routing. Frozen, because orders of one routing share it."""

    work_center: str
    ideal_cycle_time_s: Decimal


_Routing = dict[str, OperationState]

_shared_routings: dict[tuple[tuple[str, str, str], ...], _Routing] = {}


def shared_routing(operations: _Routing) -> _Routing:
    """Return a routing equal to `operations` that other orders of that routing share.

    The returned dict and its OperationStates are shared, so no caller may change them.
    The order logic only reads an order's `operations`.
    """
    key = tuple(
        (number, operation.work_center, str(operation.ideal_cycle_time_s))
        for number, operation in operations.items()
    )
    shared = _shared_routings.get(key)
    if shared is None:
        if len(_shared_routings) >= SHARED_ROUTINGS_MAX:
            _shared_routings.clear()  # as in shared_decimal
        shared = _shared_routings[key] = {
            sys.intern(number): OperationState(
                sys.intern(operation.work_center),
                shared_decimal(operation.ideal_cycle_time_s),
            )
            for number, operation in operations.items()
        }
    return shared


class LotStock(msgspec.Struct, gc=False):
    """Received output of one lot that is still in stock, by stock type."""

    unrestricted: Decimal = ZERO
    blocked: Decimal = ZERO

    def __post_init__(self) -> None:
        # A new LotStock starts at the shared ZERO, so only a decoded one needs this.
        self.unrestricted = shared_decimal(self.unrestricted)
        self.blocked = shared_decimal(self.blocked)


class Receipt(msgspec.Struct, gc=False):
    """A goods receipt and its confirmation, kept so a cancellation can invert them."""

    receipt_key: str | None
    confirmation_key: str
    good: Decimal
    scrap: Decimal
    rework: Decimal
    uom: str
    lot: str
    operation: str | None
    work_center: str | None
    occurred_at: dt.datetime
    ideal_cycle_time_s: Decimal | None
    cancelled_by: str | None = None
    final: bool = False
    """Whether the confirmation was final; its cancellation reopens the order."""

    def __post_init__(self) -> None:
        # Runs when _confirmed builds a receipt and when a checkpoint is decoded.
        self.good = shared_decimal(self.good)
        self.scrap = shared_decimal(self.scrap)
        self.rework = shared_decimal(self.rework)
        self.uom = sys.intern(self.uom)
        self.operation = _intern_or_none(self.operation)
        self.work_center = _intern_or_none(self.work_center)
        if self.ideal_cycle_time_s is not None:
            self.ideal_cycle_time_s = shared_decimal(self.ideal_cycle_time_s)


class Consumption(msgspec.Struct, gc=False):
    key: str
    material: str
    quantity: Decimal
    uom: str
    lot: str | None
    storage_location: str | None
    reversed_by: str | None = None

    def __post_init__(self) -> None:
        self.material = sys.intern(self.material)
        self.quantity = shared_decimal(self.quantity)
        self.uom = sys.intern(self.uom)
        self.storage_location = _intern_or_none(self.storage_location)


class HoldState(msgspec.Struct, gc=False):
    hold_id: str
    scope: str
    lot: str | None
    material: str | None
    reason: str | None
    applied_at: dt.datetime
    applied_by: str

    def __post_init__(self) -> None:
        self.scope = sys.intern(self.scope)
        self.material = _intern_or_none(self.material)


class OrderState(msgspec.Struct, gc=False):
    """A released order.

    Values that many orders repeat are shared with them (see __post_init__), and the
    dicts that only activity fills are None until their first entry, because even an
    empty dict costs 64 bytes.
    """

    plant: str
    order_id: str
    material: str
    planned: Decimal
    uom: str
    released_at: dt.datetime
    storage_location: str | None = None
    status: str = "released"
    components: dict[str, ComponentState] = {}
    operations: dict[str, OperationState] = {}
    """The routing, shared with every order of the same routing (shared_routing)."""
    good: Decimal = ZERO
    scrap: Decimal = ZERO
    rework: Decimal = ZERO
    stock: dict[str, LotStock] | None = None
    """Output still in stock by lot, or None before the first goods receipt."""
    holds: dict[str, HoldState] | None = None
    """Active holds by hold id, or None while no hold is active."""
    receipts: dict[str, Receipt] | None = None
    """Confirmations by event id, or None before the first one."""
    consumptions: dict[str, Consumption] | None = None
    """Goods issues by event id, or None before the first one."""
    first_activity_at: dt.datetime | None = None
    last_event_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    events_applied: int = 0
    event_ids: bytes | dict[int, int] = b""
    """The event id's 64-bit event_hash and the payload hash (30 bits) of every event
    applied to the order, packed by actors.id_table.add_packed_id. It outlives the
    partition's bounded id memory, so a duplicate of an order event replayed much later
    is still recognised."""

    def __post_init__(self) -> None:
        # msgspec calls this after release_order builds the state and after a
        # checkpoint is decoded, so a restored order shares as much as a released one.
        self.plant = sys.intern(self.plant)
        self.material = sys.intern(self.material)
        self.planned = shared_decimal(self.planned)
        self.uom = sys.intern(self.uom)
        self.storage_location = _intern_or_none(self.storage_location)
        self.status = sys.intern(self.status)
        for component in self.components.values():
            component.uom = sys.intern(component.uom)
            component.standard = shared_quantity_text(component.standard)
            component.actual = shared_decimal(component.actual)
        self.components = {
            sys.intern(material): component
            for material, component in self.components.items()
        }
        self.operations = shared_routing(self.operations)
        self.good = shared_decimal(self.good)
        self.scrap = shared_decimal(self.scrap)
        self.rework = shared_decimal(self.rework)
        # Checkpoints from before these dicts could be None contain {} for an empty one.
        self.stock = self.stock or None
        self.holds = self.holds or None
        self.receipts = self.receipts or None
        self.consumptions = self.consumptions or None
        if isinstance(self.event_ids, dict):
            # Checkpoints from before the packed form kept a dict of the same pairs.
            packed = b""
            for key, value in self.event_ids.items():
                packed = add_packed_id(packed, key, value)
            self.event_ids = packed

    def covered_by_hold(self, lot: str) -> bool:
        if not self.holds:
            return False
        return any(
            _hold_covers(hold, lot, self.material) for hold in self.holds.values()
        )

    def blocked_quantity(self) -> Decimal:
        if not self.stock:
            return ZERO
        # Most orders have no blocked stock, and this runs after every event: testing
        # each lot for zero took less time than adding them up.
        blocked = [stock.blocked for stock in self.stock.values() if stock.blocked]
        return sum(blocked, ZERO) if blocked else ZERO

    def lot_stock(self, lot: str) -> LotStock:
        """Return the stock of `lot`, adding an empty one if the lot has none yet."""
        if self.stock is None:
            self.stock = {}
        stock = self.stock.get(lot)
        if stock is None:
            stock = self.stock[lot] = LotStock()
        return stock

    def stock_by_lot(self) -> list[tuple[str, LotStock]]:
        """Return (lot, stock) pairs sorted by lot, so postings come in a stable
        order."""
        return sorted(self.stock.items()) if self.stock else []

    def add_hold(self, hold: HoldState) -> None:
        if self.holds is None:
            self.holds = {}
        self.holds[hold.hold_id] = hold

    def pop_hold(self, hold_id: str) -> HoldState | None:
        """Remove and return the active hold `hold_id`, or return None."""
        if not self.holds:
            return None
        hold = self.holds.pop(hold_id, None)
        if not self.holds:
            self.holds = None
        return hold

    def has_order_hold(self) -> bool:
        if not self.holds:
            return False
        return any(hold.scope == "order" for hold in self.holds.values())


class Outcome(msgspec.Struct, gc=False):
    """The postings and append-only snapshot rows of one applied event, and the facts
    the event ledger records for it (material, quantity, uom, lot, hold)."""

    postings: list[Posting] = []
    rows: dict[str, list[dict[str, object]]] = {}
    facts: dict[str, object] = {}

    def add_row(self, table: str, row: dict[str, object]) -> None:
        self.rows.setdefault(table, []).append(row)


class NegativeStock(Exception):
    """The movement would take more stock of the order's output than it holds."""


class Unmatched(Exception):
    """The event names an event or hold this order does not have (yet)."""

    def __init__(self, waiting_for: str, detail: str) -> None:
        super().__init__(detail)
        self.waiting_for = waiting_for
        self.detail = detail


class UnmatchedReversal(ValueError):
    """The cancellation or reversal names an applied event that it cannot take back.

    The named event is of another kind or of another order, or another event took it
    back already. Waiting cannot change that, so the partition rejects the event as an
    `unmatched` dead letter instead of parking it.
    """


_REVERSED_TYPE = {
    ev.ProductionCancelled: "production_confirmed",
    ev.ConsumptionReversed: "material_consumed",
}
"""The event type that each reversal type takes back."""

_REVERSAL_OF = {kind: reversal for reversal, kind in _REVERSED_TYPE.items()}


def reversed_event_id(event: ev.ProductionCancelled | ev.ConsumptionReversed) -> str:
    """Return the id of the event that a cancellation or reversal takes back."""
    if isinstance(event, ev.ProductionCancelled):
        return event.cancels_event_id
    return event.reverses_event_id


def applied_event_type(
    order: OrderState, event_id: str, id_hash: int | None = None
) -> str | None:
    """Return the type of the event `event_id` applied to `order`, or None if the
    order has not applied it.

    Only reports and consumptions are kept by event id. Any other event applied to the
    order is found by its id hash and returned as "event". A caller that checks many
    orders passes `id_hash`, `event_hash(order.plant, event_id)`, so that it is
    computed once.
    """
    if order.receipts and event_id in order.receipts:
        return "production_confirmed"
    if order.consumptions and event_id in order.consumptions:
        return "material_consumed"
    # Always bytes once decoded: OrderState.__post_init__ packs the older dict form.
    packed = cast(bytes, order.event_ids)
    if id_hash is None:
        id_hash = event_hash(order.plant, event_id)
    if find_packed_id(packed, id_hash) is not None:
        return "event"
    return None


def describe_reversal_mismatch(
    order: OrderState,
    event: ev.ProductionCancelled | ev.ConsumptionReversed,
    owner: OrderState,
    found_type: str,
) -> str:
    """Return the detail of an `unmatched` dead letter for a reversal of `order` whose
    named event `owner` applied as an event of type `found_type`."""
    tag = event.__struct_config__.tag
    named = reversed_event_id(event)
    expected = _REVERSED_TYPE[type(event)]
    found = (
        f"a {found_type} event"
        if found_type in _REVERSAL_OF
        else "an event that is neither production_confirmed nor material_consumed"
    )
    # The same id works because nothing of a rejected event was applied, and the
    # event applied under it resolves this dead letter.
    fixes = [
        f"send the {tag} again under event id {event.event_id}, naming a "
        f"{expected} event of order {order.order_id}"
    ]
    reversal = _REVERSAL_OF.get(found_type)
    if reversal is not None:
        fixes.insert(
            0,
            f"to take back {named}, send a {reversal.__struct_config__.tag} with "
            f"order {owner.order_id} under a new event id",
        )
    return (
        f"{tag} {event.event_id} of order {order.order_id} names event {named}, "
        f"which is {found} of order {owner.order_id}, but it can take back only a "
        f"{expected} event of order {order.order_id}; {', or '.join(fixes)}"
    )


def _reject_mismatched_kind(
    order: OrderState, event: ev.ProductionCancelled | ev.ConsumptionReversed
) -> None:
    """Raise UnmatchedReversal if the order applied the named event as another type."""
    found_type = applied_event_type(order, reversed_event_id(event))
    if found_type is not None:
        raise UnmatchedReversal(
            describe_reversal_mismatch(order, event, order, found_type)
        )


def _already_reversed_detail(
    order: OrderState,
    event: ev.ProductionCancelled | ev.ConsumptionReversed,
    reversed_by: str,
) -> str:
    tag = event.__struct_config__.tag
    named = reversed_event_id(event)
    return (
        f"{tag} {event.event_id} of order {order.order_id} names event {named}, "
        f"which event {reversed_by} took back already, so it would post nothing. "
        f"No fix is needed if it repeats {reversed_by}; to take back another event, "
        f"send a new {tag} under a new event id that names it"
    )


def _hold_covers(hold: HoldState, lot: str, material: str) -> bool:
    if hold.scope == "lot":
        return hold.lot == lot
    if hold.scope == "material":
        return hold.material == material
    return True


def _local_date(moment: dt.datetime) -> dt.date:
    # The plant publishes its local time with its offset, so the offset's date is the
    # plant's calendar day: the ERP's posting date.
    return moment.date()


def release_order(event: ev.WorkOrderReleased) -> OrderState:
    """Create the state of a newly released order from its release event."""
    assert event.order is not None
    components: dict[str, ComponentState] = {}
    standards: dict[str, Decimal] = {}
    for line in event.components:
        # A BOM may list one material in several lines (per operation); sum them.
        component = components.setdefault(
            line.material, ComponentState(line.quantity.uom)
        )
        if component.uom != line.quantity.uom:
            raise ValueError(
                f"component {line.material} of order {event.order} is listed in both "
                f"{component.uom} and {line.quantity.uom}; send one unit per material"
            )
        standards[line.material] = standards.get(line.material, ZERO) + (
            line.quantity.value
        )
    for material, standard in standards.items():
        components[material].standard = str(standard)
    operations = {
        op.operation: OperationState(op.work_center, op.ideal_cycle_time_s)
        for op in event.operations
    }
    return OrderState(
        plant=event.plant,
        order_id=event.order,
        material=event.material,
        planned=event.quantity.value,
        uom=event.quantity.uom,
        released_at=event.occurred_at,
        storage_location=event.storage_location,
        components=components,
        operations=operations,
        last_event_at=event.occurred_at,
    )


def _movement(
    order: OrderState,
    event: ev.Event,
    movement_type: str,
    key: str,
    *,
    material: str,
    quantity: Decimal,
    uom: str,
    stock_type: str,
    batch: str | None,
    storage_location: str | None,
    reverses: str | None = None,
    reverses_event: str | None = None,
    reason: str | None = None,
) -> GoodsMovement:
    # Lineage lists event ids: the event itself, then the event a reversal takes back.
    return GoodsMovement(
        key=key,
        plant=order.plant,
        movement_type=movement_type,  # type: ignore[arg-type]
        material=material,
        quantity=quantity,
        uom=uom,
        stock_type=stock_type,  # type: ignore[arg-type]
        order=order.order_id,
        batch=batch or None,
        storage_location=storage_location,
        reason=reason,
        posting_date=_local_date(event.occurred_at),
        document_date=_local_date(event.occurred_at),
        occurred_at=event.occurred_at,
        reference=event.event_id,
        lineage=(event.event_id,)
        if reverses_event is None
        else (event.event_id, reverses_event),
        reverses=reverses,
    )


_NOT_ACTIVITY = (ev.WorkOrderReleased, ev.QualityHoldApplied)
"""Events that do not start an order's activity. A tuple, because isinstance() with
`A | B` builds the union on every call."""


def _touch(order: OrderState, event: ev.Event) -> None:
    order.events_applied += 1
    if order.last_event_at is None or event.occurred_at > order.last_event_at:
        order.last_event_at = event.occurred_at
    if not isinstance(event, _NOT_ACTIVITY):
        if (
            order.first_activity_at is None
            or event.occurred_at < order.first_activity_at
        ):
            order.first_activity_at = event.occurred_at
        if order.status == "released":
            order.status = "in_progress"


def _confirmed(order: OrderState, event: ev.ProductionConfirmed, out: Outcome) -> None:
    lot = event.lot or ""
    label = f"production {event.event_id} of order {order.order_id}"
    good = convert_quantity(event.good, order.uom, label)
    scrap = convert_quantity(event.scrap, order.uom, label) if event.scrap else ZERO
    rework = convert_quantity(event.rework, order.uom, label) if event.rework else ZERO
    operation = order.operations.get(event.operation or "")
    if operation is None and len(order.operations) == 1:
        operation = next(iter(order.operations.values()))
    work_center = event.work_center or (operation.work_center if operation else None)

    receipt_key = None
    if good > 0:
        blocked = order.covered_by_hold(lot)
        receipt_key = posting_key(order.plant, GOODS_RECEIPT, event.event_id)
        out.postings.append(
            _movement(
                order,
                event,
                GOODS_RECEIPT,
                receipt_key,
                material=order.material,
                quantity=good,
                uom=order.uom,
                stock_type="blocked" if blocked else "unrestricted",
                batch=lot,
                storage_location=order.storage_location,
            )
        )
        stock = order.lot_stock(lot)
        if blocked:
            stock.blocked += good
        else:
            stock.unrestricted += good
    confirmation_key = posting_key(order.plant, "conf", event.event_id)
    out.postings.append(
        OrderConfirmation(
            key=confirmation_key,
            plant=order.plant,
            order=order.order_id,
            operation=event.operation,
            work_center=work_center,
            yield_quantity=good,
            scrap_quantity=scrap,
            rework_quantity=rework,
            uom=order.uom,
            final=event.final,
            started_at=event.started_at,
            finished_at=event.occurred_at,
            lineage=(event.event_id,),
        )
    )
    order.good += good
    order.scrap += scrap
    order.rework += rework
    receipt = Receipt(
        receipt_key=receipt_key,
        confirmation_key=confirmation_key,
        good=good,
        scrap=scrap,
        rework=rework,
        uom=order.uom,
        lot=lot,
        operation=event.operation,
        work_center=work_center,
        occurred_at=event.occurred_at,
        ideal_cycle_time_s=operation.ideal_cycle_time_s if operation else None,
        final=event.final,
    )
    if order.receipts is None:
        order.receipts = {}
    order.receipts[event.event_id] = receipt
    if event.final:
        order.status = "completed"
        order.completed_at = event.occurred_at
    out.add_row("production", _production_row(order, event.event_id, receipt))
    out.facts = {
        "material": order.material,
        "quantity": good,
        "uom": order.uom,
        "lot": lot,
    }


def _production_row(
    order: OrderState, event_id: str, receipt: Receipt
) -> dict[str, object]:
    return {
        "event_id": event_id,
        "plant": order.plant,
        "order_id": order.order_id,
        "work_center": receipt.work_center,
        "operation": receipt.operation,
        "good_quantity": receipt.good,
        "scrap_quantity": receipt.scrap,
        "rework_quantity": receipt.rework,
        "uom": receipt.uom,
        "ideal_cycle_time_s": receipt.ideal_cycle_time_s,
        "occurred_at": receipt.occurred_at,
        "cancelled": receipt.cancelled_by is not None,
    }


def _cancelled(order: OrderState, event: ev.ProductionCancelled, out: Outcome) -> None:
    receipt = order.receipts.get(event.cancels_event_id) if order.receipts else None
    if receipt is None:
        _reject_mismatched_kind(order, event)
        raise Unmatched(
            f"event:{event.cancels_event_id}",
            f"production {event.cancels_event_id} to cancel is not applied to order "
            f"{order.order_id}",
        )
    if receipt.cancelled_by is not None:
        # It would post nothing, and as an applied event the ledger would count the
        # report as cancelled twice.
        raise UnmatchedReversal(
            _already_reversed_detail(order, event, receipt.cancelled_by)
        )
    out.facts = {"refers_to": event.cancels_event_id}
    if receipt.receipt_key is not None:
        stock = order.lot_stock(receipt.lot)
        # NOTE: only a 102 removes received output today, and each receipt is reversed
        # at most once, so this guard holds unless the state was changed by hand.
        if stock.unrestricted + stock.blocked < receipt.good:
            raise NegativeStock(
                f"cancelling {event.cancels_event_id} would take {receipt.good} "
                f"{receipt.uom} of {order.material} out of lot "
                f"{receipt.lot or '(none)'} "
                f"of order {order.order_id}, which holds "
                f"{stock.unrestricted + stock.blocked}"
            )
    receipt.cancelled_by = event.event_id
    if receipt.receipt_key is not None:
        from_blocked = stock.unrestricted < receipt.good
        if from_blocked:
            stock.blocked -= receipt.good
        else:
            stock.unrestricted -= receipt.good
        out.postings.append(
            _movement(
                order,
                event,
                GOODS_RECEIPT_REVERSAL,
                posting_key(order.plant, GOODS_RECEIPT_REVERSAL, receipt.receipt_key),
                material=order.material,
                quantity=receipt.good,
                uom=receipt.uom,
                stock_type="blocked" if from_blocked else "unrestricted",
                batch=receipt.lot,
                storage_location=order.storage_location,
                reverses=receipt.receipt_key,
                reverses_event=event.cancels_event_id,
            )
        )
    out.postings.append(
        OrderConfirmation(
            key=posting_key(order.plant, "conf-cancel", receipt.confirmation_key),
            plant=order.plant,
            order=order.order_id,
            operation=receipt.operation,
            work_center=receipt.work_center,
            yield_quantity=receipt.good,
            scrap_quantity=receipt.scrap,
            rework_quantity=receipt.rework,
            uom=receipt.uom,
            final=False,
            started_at=None,
            finished_at=event.occurred_at,
            lineage=(event.event_id, event.cancels_event_id),
            reverses=receipt.confirmation_key,
        )
    )
    order.good -= receipt.good
    order.scrap -= receipt.scrap
    order.rework -= receipt.rework
    if receipt.final:
        _reopen_unless_final(order)
    out.add_row("production", _production_row(order, event.cancels_event_id, receipt))


def _reopen_unless_final(order: OrderState) -> None:
    """Reopen the order after a final confirmation was cancelled, unless another final
    confirmation is still in force. The order then stays completed as of the latest."""
    finals = [
        receipt.occurred_at
        for receipt in (order.receipts or {}).values()
        if receipt.final and receipt.cancelled_by is None
    ]
    order.completed_at = max(finals, default=None)
    if order.status != "on_hold":
        order.status = "completed" if order.completed_at else "in_progress"


def _consumed(order: OrderState, event: ev.MaterialConsumed, out: Outcome) -> None:
    component = order.components.get(event.material)
    if component is None:
        # Not on the BOM: still a real consumption, with a standard of zero.
        component = order.components[sys.intern(event.material)] = ComponentState(
            sys.intern(event.quantity.uom)
        )
    quantity = convert_quantity(
        event.quantity,
        component.uom,
        f"consumption {event.event_id} of {event.material} (BOM unit {component.uom})",
    )
    key = posting_key(order.plant, GOODS_ISSUE, event.event_id)
    if quantity:
        # A consumption of zero ("0", "-0") changes no stock, and ERPs reject a goods
        # movement without a quantity, so it is applied but posts nothing.
        out.postings.append(
            _movement(
                order,
                event,
                GOODS_ISSUE,
                key,
                material=event.material,
                quantity=quantity,
                uom=component.uom,
                stock_type="unrestricted",
                batch=event.lot,
                storage_location=event.storage_location,
            )
        )
    component.actual += quantity
    if order.consumptions is None:
        order.consumptions = {}
    order.consumptions[event.event_id] = Consumption(
        key,
        event.material,
        quantity,
        component.uom,
        event.lot,
        event.storage_location,
    )
    out.facts = {"material": event.material, "quantity": quantity, "uom": component.uom}


def _reversed(order: OrderState, event: ev.ConsumptionReversed, out: Outcome) -> None:
    consumption = (
        order.consumptions.get(event.reverses_event_id) if order.consumptions else None
    )
    if consumption is None:
        _reject_mismatched_kind(order, event)
        raise Unmatched(
            f"event:{event.reverses_event_id}",
            f"consumption {event.reverses_event_id} to reverse is not applied to order "
            f"{order.order_id}",
        )
    if consumption.reversed_by is not None:
        # Rejected for the reason given in _cancelled.
        raise UnmatchedReversal(
            _already_reversed_detail(order, event, consumption.reversed_by)
        )
    out.facts = {"refers_to": event.reverses_event_id}
    consumption.reversed_by = event.event_id
    if not consumption.quantity:
        return  # the consumption posted nothing, so there is nothing to reverse
    out.postings.append(
        _movement(
            order,
            event,
            GOODS_ISSUE_REVERSAL,
            posting_key(order.plant, GOODS_ISSUE_REVERSAL, consumption.key),
            material=consumption.material,
            quantity=consumption.quantity,
            uom=consumption.uom,
            stock_type="unrestricted",
            batch=consumption.lot,
            storage_location=consumption.storage_location,
            reverses=consumption.key,
            reverses_event=event.reverses_event_id,
        )
    )
    order.components[consumption.material].actual -= consumption.quantity


def apply_hold(
    order: OrderState,
    event: ev.Event,
    hold: HoldState,
    out: Outcome,
    *,
    record: bool = True,
) -> None:
    """Place `hold` on the order and move the unrestricted stock it covers to blocked.

    `record` adds the hold's row; a plant-wide hold records one row for the plant
    instead.
    """
    order.add_hold(hold)
    out.facts = hold_facts(hold)
    for lot, stock in order.stock_by_lot():
        if stock.unrestricted > 0 and _hold_covers(hold, lot, order.material):
            out.postings.append(
                _hold_transfer(order, event, hold, TO_BLOCKED, lot, stock.unrestricted)
            )
            stock.blocked += stock.unrestricted
            stock.unrestricted = ZERO
    _refresh_status(order)
    if record:
        out.add_row("holds", _hold_row(order, hold, released_at=None))


def _hold_transfer(
    order: OrderState,
    event: ev.Event,
    hold: HoldState,
    movement_type: str,
    lot: str,
    quantity: Decimal,
) -> GoodsMovement:
    """Return the transfer of one lot's stock into blocked stock (344) or back out of
    it (343), keyed by the hold event so that each lot moves once per event."""
    return _movement(
        order,
        event,
        movement_type,
        posting_key(order.plant, movement_type, event.event_id, order.order_id, lot),
        material=order.material,
        quantity=quantity,
        uom=order.uom,
        stock_type="blocked" if movement_type == TO_BLOCKED else "unrestricted",
        batch=lot,
        storage_location=order.storage_location,
        reason=hold.reason,
    )


def hold_facts(hold: HoldState) -> dict[str, object]:
    """Return the ledger facts of a hold: its id, scope, lot and material."""
    return {
        "hold_id": hold.hold_id,
        "hold_scope": hold.scope,
        "lot": hold.lot,
        "material": hold.material,
    }


def release_hold(
    order: OrderState,
    event: ev.QualityHoldReleased,
    out: Outcome,
    *,
    record: bool = True,
) -> HoldState | None:
    """Lift a hold and move the stock no other hold covers back to unrestricted."""
    hold = order.pop_hold(event.hold_id)
    if hold is None:
        return None
    for lot, stock in order.stock_by_lot():
        # Stock another active hold still covers stays blocked.
        if (
            stock.blocked > 0
            and _hold_covers(hold, lot, order.material)
            and not order.covered_by_hold(lot)
        ):
            out.postings.append(
                _hold_transfer(order, event, hold, FROM_BLOCKED, lot, stock.blocked)
            )
            stock.unrestricted += stock.blocked
            stock.blocked = ZERO
    _refresh_status(order)
    if record:
        out.add_row("holds", _hold_row(order, hold, released_at=event.occurred_at))
    return hold


def _released(order: OrderState, event: ev.QualityHoldReleased, out: Outcome) -> None:
    out.facts = {"hold_id": event.hold_id}
    if release_hold(order, event, out) is None:
        raise Unmatched(
            f"hold:{event.hold_id}",
            f"hold {event.hold_id} to release is not active on order {order.order_id}",
        )


def _refresh_status(order: OrderState) -> None:
    # An order is on hold while an order-wide hold is active or any of its stock is
    # blocked; a lot or material hold that covers none of its stock leaves it alone.
    held = order.has_order_hold() or order.blocked_quantity() > 0
    if held:
        order.status = "on_hold"
    elif order.status == "on_hold":
        order.status = "completed" if order.completed_at else "in_progress"


def _hold_row(
    order: OrderState, hold: HoldState, released_at: dt.datetime | None
) -> dict[str, object]:
    return {
        "plant": order.plant,
        "hold_id": hold.hold_id,
        "scope": hold.scope,
        "order_id": order.order_id,
        "lot": hold.lot,
        "material": hold.material,
        "reason": hold.reason,
        "applied_at": hold.applied_at,
        "released_at": released_at,
    }


def _inspected(order: OrderState, event: ev.InspectionRecorded, out: Outcome) -> None:
    out.add_row(
        "inspections",
        {
            "event_id": event.event_id,
            "plant": order.plant,
            "order_id": order.order_id,
            "lot": event.lot,
            "material": event.material,
            "result": event.result,
            "characteristic": event.characteristic,
            "occurred_at": event.occurred_at,
        },
    )
    if event.result == "fail":
        # A failed inspection blocks what it judged: its lot, or the whole order.
        hold = HoldState(
            hold_id=f"inspection-{event.event_id}",
            scope="lot" if event.lot else "order",
            lot=event.lot,
            material=event.material,
            reason=f"failed inspection {event.characteristic or ''}".strip(),
            applied_at=event.occurred_at,
            applied_by=event.event_id,
        )
        apply_hold(order, event, hold, out)


def hold_from_event(event: ev.QualityHoldApplied) -> HoldState:
    """Return the state of the hold that `event` applies."""
    return HoldState(
        hold_id=event.hold_id,
        scope=event.scope,
        lot=event.lot,
        material=event.material,
        reason=event.reason,
        applied_at=event.occurred_at,
        applied_by=event.event_id,
    )


def _hold_applied(
    order: OrderState, event: ev.QualityHoldApplied, out: Outcome
) -> None:
    apply_hold(order, event, hold_from_event(event), out)


def _no_change(order: OrderState, event: ev.Event, out: Outcome) -> None:
    pass  # the event only counts as the order's activity


_APPLY: dict[type, Callable[[OrderState, Any, Outcome], None]] = {
    ev.ProductionConfirmed: _confirmed,
    ev.ProductionCancelled: _cancelled,
    ev.MaterialConsumed: _consumed,
    ev.ConsumptionReversed: _reversed,
    ev.InspectionRecorded: _inspected,
    ev.QualityHoldApplied: _hold_applied,
    ev.QualityHoldReleased: _released,
    ev.OperationStarted: _no_change,
    ev.OperationCompleted: _no_change,
}
"""The order logic of each event type, found by the event's exact type: one dict
lookup in place of a match statement that tried each class in turn."""

_HOLD_NEUTRAL = frozenset(
    {
        ev.MaterialConsumed,
        ev.ConsumptionReversed,
        ev.OperationStarted,
        ev.OperationCompleted,
    }
)
"""Event types that change neither holds nor stock, so they leave the order on hold or
not as it was. _touch moves only a released order on, which has neither yet."""


def apply_order_event(order: OrderState, event: ev.PlantEvent) -> Outcome:
    """Apply one event of a released order; raise Unmatched or ValueError to reject."""
    apply = _APPLY.get(type(event))
    if apply is None:
        if isinstance(event, ev.WorkOrderReleased):
            raise ValueError(f"order {order.order_id} is already released")
        raise ValueError(f"event type {event.__struct_config__.tag} has no order logic")
    out = Outcome()
    apply(order, event, out)
    _touch(order, event)
    if type(event) not in _HOLD_NEUTRAL:
        # A receipt into blocked stock, or a cancellation that empties it, changes
        # whether the order is on hold, whatever order the hold and the receipt arrived
        # in.
        _refresh_status(order)
    return out
