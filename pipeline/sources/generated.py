"""A reproducible multi-plant demo feed that carries the faults real plant feeds carry.

`generate(spec)` returns the messages of a stream, ready to publish in list order, and
`Expected`, the ground truth that the generator computed from its own model of each
order, not by replaying the pipeline. `iter_events(spec)` yields the same messages one
at a time, for benchmarks that publish millions of them.

What a stream contains
----------------------
Each plant ("P01", "P02", ...) writes its timestamps with its own UTC offset and
releases production orders at random intervals. Each order has a bill of material (2 to
5 components) and a routing (1 to 3 operations, each on one of the plant's machines with
the product's ideal cycle time for that operation, which is master data and so the same
for every order of the product). It produces one `work_order_released`, an
`operation_started` and an `operation_completed` per operation, and one or two
`material_consumed` per component. The last operation reports 1 to 4
`production_confirmed`, the last one with `final=True`. An `inspection_recorded`
follows the first report and, for half the orders, the last one. Some orders also get
quality holds, cancellations, reversals or a `shipment_confirmed`. Machines send
`machine_state_changed` (setup, running, idle, down, maintenance) and
`downtime_started`/`downtime_ended` pairs, planned (breaks, planned maintenance) and
unplanned (breakdowns), a few of them overlapping on the same machine.
Machine events carry no order, so they route to their machine. Messages are in stream
time order, apart from the faults below.

Faults
------
- Duplicates: the same bytes sent again, right after the original on the same subject,
  right after it on a second subject spelling (the event type with hyphens, as an older
  edge gateway writes it), or 1 to 12 hours of stream time later.
- Out of order: for some orders, one or two `production_confirmed` or
  `material_consumed` messages come before the order's release. Their timestamps stay
  true.
- Bad messages: extra messages with event ids of their own, so none of them carries a
  fact the truth needs. They take the kinds in `BAD_REASONS` in turn, so each kind
  appears once a stream has about 6 / `bad_rate` valid messages.
- Some `material_consumed` quantities are JSON numbers (`"value":12.345`) instead of
  strings. They must still decode to the exact Decimal.
- Some `material_consumed` quantities of components kept in KG are reported in G, as a
  scale at the line would; the pipeline converts them back to the BOM unit exactly.
- Anomalies: valid messages that must still be dead-lettered, in turn the kinds in
  `ANOMALY_REASONS`. A "reused_id" message repeats the event id of the message just
  before it with another payload (another `source`), as a gateway that restarts its id
  counter would. A "future_time" message is a copy with an id of its own whose
  occurred_at lies decades ahead, as from a plant clock gone wrong.

What the pipeline should produce (`Expected.movements`)
--------------------------------------------------------
Duplicates are dropped by event id, and bad messages and anomalies are dead-lettered.
Out-of-order messages wait for their release and are applied right after it. Then:

- 101: a goods receipt of `good` of the order's material per `production_confirmed` with
  good > 0. It goes to blocked stock while a hold on the order or its lot is active, and
  to unrestricted stock otherwise. `Expected.blocked_receipts` holds the blocked part.
- 261: a goods issue of `quantity` of the component per `material_consumed`.
- 102 and 262: the inverse of the confirmation that a `production_cancelled` names, or
  of the consumption that a `consumption_reversed` names.
- 344: when an order or its lot goes from no active hold to one, the order's
  unrestricted received quantity moves to blocked stock. Nothing is posted when that
  quantity is zero.
- 343: when the last active hold of an order or its lot is released, the order's
  blocked quantity moves back to unrestricted stock.
- A failed `inspection_recorded` applies a hold on its lot. Every generated inspection
  names both the order and its lot, and the stream never releases such a hold.

Every confirmation names the order's lot, and a lot hold names the lot of its order, so
an order hold and a lot hold block the same quantities. Cancellations and reversals
happen only in orders without holds or failed inspections. So a 102 always takes back
unrestricted stock, and the transfer totals stay exact. `Expected.blocked_at_end` is the
quantity per plant and material that stays blocked after the last message.
"""

from __future__ import annotations

import datetime as dt
import heapq
import random
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

import msgspec

from contracts.codec import encode
from contracts.events import (
    Component,
    ConsumptionReversed,
    DowntimeEnded,
    DowntimeStarted,
    Event,
    InspectionRecorded,
    MachineStateChanged,
    MaterialConsumed,
    OperationCompleted,
    OperationSpec,
    OperationStarted,
    ProductionCancelled,
    ProductionConfirmed,
    QualityHoldApplied,
    QualityHoldReleased,
    Quantity,
    ShipmentConfirmed,
    WorkOrderReleased,
)
from contracts.postings import (
    FROM_BLOCKED,
    GOODS_ISSUE,
    GOODS_ISSUE_REVERSAL,
    GOODS_RECEIPT,
    GOODS_RECEIPT_REVERSAL,
    TO_BLOCKED,
)
from pipeline.subjects import event_subject

__all__ = [
    "ANOMALY_REASONS",
    "BAD_REASONS",
    "DEFAULT_SEED",
    "Expected",
    "GeneratedMessage",
    "StreamSpec",
    "generate",
    "iter_events",
]

BAD_REASONS: tuple[str, ...] = (
    "malformed_json",
    "unknown_event_type",
    "missing_field",
    "naive_timestamp",
    "nan_quantity",
    "negative_quantity",
)
"""Kinds of bad message. A bad message's `kind` is "bad:" followed by one of these."""

ANOMALY_REASONS: tuple[str, ...] = ("reused_id", "future_time")
"""Kinds of anomaly: valid JSON events the pipeline must dead-letter with this reason.
An anomaly's `kind` is "anomaly:" followed by one of these."""

UNKNOWN_EVENT_TYPE = "tool_wear_measured"

_MINUTE = 60_000  # stream time is in integer milliseconds since the Unix epoch
_HOUR = 60 * _MINUTE

# UTC offsets in minutes, handed to plants in turn. They include half- and
# quarter-hour offsets and UTC itself, which msgspec writes as "Z".
_OFFSETS_MIN = (60, -300, 480, 330, -180, 0, 540, -480, 120, 345, -210, 600)

_MACHINE_KINDS = ("CNC", "PRESS", "LATHE", "WELD", "MIX", "PACK", "MILL", "PAINT")
_BREAKDOWNS = (
    "spindle_fault",
    "material_jam",
    "tool_break",
    "hydraulic_leak",
    "sensor",
)
_OVERLAP_REASONS = ("waiting_for_technician", "waiting_for_spare_part")
_CHARACTERISTICS = ("diameter", "weight", "surface", "hardness", "torque")
_HOLD_REASONS = ("customer_complaint", "supplier_deviation", "contamination_suspected")

# Quantities are kept as integer counts of the smallest step of their unit, so sums in
# the truth are exact and cheap: KG has 3 decimal places, EA is whole pieces.
_DECIMALS = {"KG": 3, "EA": 0}
_QUANTUM_PER_UNIT = {"KG": 1000, "EA": 1}

_NUMBER_VALUE = re.compile(rb'"value":"([0-9.]+)"')
_OFFSET_SUFFIX = re.compile(r"(Z|[+-]\d\d:\d\d)$")
_generic_decoder = msgspec.json.Decoder(float_hook=Decimal)

# A required field of each event type, removed by the "missing_field" bad message.
_REQUIRED_FIELD = {
    "work_order_released": "material",
    "operation_started": "operation",
    "operation_completed": "operation",
    "production_confirmed": "good",
    "production_cancelled": "cancels_event_id",
    "material_consumed": "quantity",
    "consumption_reversed": "reverses_event_id",
    "inspection_recorded": "result",
    "quality_hold_applied": "hold_id",
    "quality_hold_released": "hold_id",
    "machine_state_changed": "state",
    "downtime_started": "downtime_id",
    "downtime_ended": "downtime_id",
    "shipment_confirmed": "delivery",
}
_QUANTITY_FIELDS = ("quantity", "good")


DEFAULT_SEED = 7
"""The seed of `plantstream demo` and of the ids without a seed in them."""


@dataclass(frozen=True)
class StreamSpec:
    """Size, fault rates and seed of a generated stream.

    The defaults give about 13,000 messages, which a local NATS server takes in seconds.
    """

    plants: int = 3
    orders_per_plant: int = 200
    machines_per_plant: int = 4
    duplicate_rate: float = 0.03
    """Share of valid messages sent a second time."""
    out_of_order_rate: float = 0.02
    """Share of orders with consumption or production sent before the release."""
    bad_rate: float = 0.005
    """Bad messages added per valid message."""
    anomaly_rate: float = 0.002
    """Anomalies (reused ids, far-future timestamps) added per valid message."""
    gram_rate: float = 0.1
    """Share of KG consumptions reported in G."""
    hold_rate: float = 0.05
    """Share of orders that get a quality hold; 85% of those holds are released."""
    reversal_rate: float = 0.01
    """Share of confirmations and consumptions later cancelled or reversed, counted
    over orders without holds or failed inspections."""
    seed: int = DEFAULT_SEED
    """Random seed. Event, order, lot, hold, delivery and downtime ids of any other
    seed carry it (`P01-S11-E000000001`), so that streams of two seeds published to
    one server share no ids."""
    start: dt.datetime = dt.datetime(2026, 1, 5, 6, 0, tzinfo=dt.UTC)

    def __post_init__(self) -> None:
        for name in ("plants", "orders_per_plant", "machines_per_plant"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"StreamSpec.{name} must be at least 1, got {getattr(self, name)}"
                )
        for name in (
            "duplicate_rate",
            "out_of_order_rate",
            "bad_rate",
            "anomaly_rate",
            "gram_rate",
            "hold_rate",
            "reversal_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"StreamSpec.{name} must be between 0 and 1, got {value}"
                )
        if self.start.tzinfo is None:
            raise ValueError(
                "StreamSpec.start must carry a UTC offset, got naive "
                f"{self.start.isoformat()}"
            )


class GeneratedMessage(NamedTuple):
    subject: str
    data: bytes
    kind: str
    """"event", "duplicate", "bad:<reason>" with a reason from `BAD_REASONS`, or
    "anomaly:<reason>" with a reason from `ANOMALY_REASONS`."""


@dataclass
class Expected:
    """Ground truth of a generated stream. The module docstring gives the posting rules.

    Quantities in `movements`, `blocked_receipts` and `blocked_at_end` are in the unit
    `uoms` gives for the material.
    """

    messages: int = 0
    events: int = 0
    """Distinct valid events, each counted once however often it was sent."""
    duplicates: int = 0
    duplicates_other_subject: int = 0
    duplicates_late: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    out_of_order_orders: int = 0
    out_of_order_events: int = 0
    json_number_quantities: int = 0
    gram_quantities: int = 0
    anomalies: Counter[str] = field(default_factory=Counter)
    orders: Counter[str] = field(default_factory=Counter)
    """Released orders per plant."""
    events_by_type: Counter[str] = field(default_factory=Counter)
    holds_applied: int = 0
    holds_released: int = 0
    failed_inspections: int = 0
    cancellations: int = 0
    reversals: int = 0
    shipments: int = 0
    downtimes: int = 0
    overlapping_downtimes: int = 0
    uoms: dict[str, str] = field(default_factory=dict)
    movements: dict[tuple[str, str, str], Decimal] = field(default_factory=dict)
    """Total quantity per (plant, material, movement type), always positive."""
    blocked_receipts: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    """The part of the 101 quantity per (plant, material) that went to blocked stock."""
    blocked_at_end: dict[tuple[str, str], Decimal] = field(default_factory=dict)

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    @property
    def anomaly_total(self) -> int:
        return sum(self.anomalies.values())

    def net_receipts(self, plant: str, material: str) -> Decimal:
        """Return the goods receipts (101) minus their reversals (102)."""
        received = self.movements.get((plant, material, GOODS_RECEIPT), Decimal(0))
        reversed_ = self.movements.get(
            (plant, material, GOODS_RECEIPT_REVERSAL), Decimal(0)
        )
        return received - reversed_

    def net_issues(self, plant: str, material: str) -> Decimal:
        """Return the goods issues (261) minus their reversals (262)."""
        issued = self.movements.get((plant, material, GOODS_ISSUE), Decimal(0))
        reversed_ = self.movements.get(
            (plant, material, GOODS_ISSUE_REVERSAL), Decimal(0)
        )
        return issued - reversed_


def generate(spec: StreamSpec | None = None) -> tuple[list[GeneratedMessage], Expected]:
    """Generate a whole stream and its ground truth."""
    expected = Expected()
    messages = list(iter_events(spec or StreamSpec(), expected))
    return messages, expected


def iter_events(
    spec: StreamSpec, expected: Expected | None = None
) -> Iterator[GeneratedMessage]:
    """Yield the messages of `generate(spec)` one at a time, in the same order.

    Memory stays bounded by the orders in progress at one moment of stream time, so
    this can produce millions of messages. `expected`, when given, is filled in as the
    messages are produced, and is complete once the iterator is exhausted.
    """
    builder = _StreamBuilder(spec, expected if expected is not None else Expected())
    return builder.messages()


class _Material(NamedTuple):
    id: str
    uom: str


_PRODUCTS = tuple(
    _Material(f"FG-{1001 + k}", "KG" if k % 4 == 3 else "EA") for k in range(16)
)
_COMPONENTS = tuple(
    _Material(f"RM-{2001 + k}", "EA" if k % 3 == 2 else "KG") for k in range(40)
)


_MEAN_CYCLE_S = {"EA": 4.6, "KG": 0.94}
"""Mean ideal cycle time per unit, chosen so that an operation of an order of average
size takes about 25 minutes and the plant's machines keep up with its releases."""


def _ideal_cycle_time(product: _Material, number: int) -> Decimal:
    """Return the ideal cycle time of operation `number` of `product`'s routing.

    Derived from the product and the operation, not drawn per order, because it is
    routing master data: every order of a product has the same standard values.
    """
    spread = zlib.crc32(f"{product.id}/{number}".encode()) % 1001 / 1000  # 0 to 1
    seconds = _MEAN_CYCLE_S[product.uom] * (0.5 + spread)
    return max(Decimal("0.01"), Decimal(f"{seconds:.2f}"))


def _quantity(amount: int, uom: str) -> Quantity:
    """Build a Quantity from an integer count of the unit's smallest step."""
    return Quantity(Decimal(amount).scaleb(-_DECIMALS[uom]), uom)


@dataclass
class _Plant:
    id: str
    prefix: str
    """The start of the ids of the plant's events, orders and so on: "P01-", or
    "P01-S11-" for a seed other than the default."""
    epoch: dt.datetime
    """The Unix epoch in the plant's UTC offset: a local timestamp is epoch + delta."""
    machines: list[str]
    products: list[_Material]
    release_interval_ms: int
    next_release: int
    machine_free: dict[str, int]
    orders: int = 0
    events: int = 0
    downtimes: int = 0
    holds: int = 0
    deliveries: int = 0
    bad: int = 0


class _Record(NamedTuple):
    """A planned event of one order with its effect on stock, for the truth pass."""

    t: int
    event: Event
    effect: str  # "", "receipt", "cancel", "issue", "reverse", "hold", "release"
    material: str
    amount: int


class _StreamBuilder:
    def __init__(self, spec: StreamSpec, expected: Expected) -> None:
        self.spec = spec
        self.expected = expected
        self.rng = random.Random(spec.seed)
        self.heap: list[tuple[int, int, str, bytes, str]] = []
        self.seq = 0
        # Starting half way gives a short stream its first bad message early.
        self.bad_credit = 0.5
        self.next_bad = 0
        self.anomaly_credit = 0.5
        self.next_anomaly = 0
        self.subjects: dict[tuple[str, str], str] = {}
        self.plants = [self._plant(index) for index in range(spec.plants)]

    def _plant(self, index: int) -> _Plant:
        rng = self.rng
        plant_id = f"P{index + 1:02d}"
        offset = dt.timezone(
            dt.timedelta(minutes=_OFFSETS_MIN[index % len(_OFFSETS_MIN)])
        )
        kinds = rng.sample(
            _MACHINE_KINDS, k=min(len(_MACHINE_KINDS), self.spec.machines_per_plant)
        )
        machines = [
            f"{plant_id}-{kinds[m % len(kinds)]}{m // len(kinds) + 1:02d}"
            for m in range(self.spec.machines_per_plant)
        ]
        start = int(self.spec.start.timestamp() * 1000)
        # An operation keeps its machine busy for about 50 minutes on average (setup,
        # run and stops), and an order has 2 operations on average. One release every
        # 170 / machines minutes loads each machine to about 60%, so queues stay short.
        interval = int(170 * _MINUTE / self.spec.machines_per_plant)
        return _Plant(
            id=plant_id,
            prefix=(
                f"{plant_id}-"
                if self.spec.seed == DEFAULT_SEED
                else f"{plant_id}-S{self.spec.seed}-"
            ),
            epoch=dt.datetime(1970, 1, 1, tzinfo=dt.UTC).astimezone(offset),
            machines=machines,
            products=rng.sample(_PRODUCTS, k=5),
            release_interval_ms=interval,
            next_release=start + rng.randrange(interval),
            machine_free=dict.fromkeys(machines, start),
        )

    # -- emitting -------------------------------------------------------------------

    def messages(self) -> Iterator[GeneratedMessage]:
        spec = self.spec
        for _ in range(spec.orders_per_plant):
            for plant in self.plants:
                released = plant.next_release
                gap = self.rng.uniform(0.3, 1.7) * plant.release_interval_ms
                plant.next_release = released + int(gap)
                self._order(plant, released)
            # Later orders release no earlier than this. Every event of an order comes
            # after its release, except out-of-order ones, which go in just before it.
            horizon = min(plant.next_release for plant in self.plants) - 10 * _MINUTE
            while self.heap and self.heap[0][0] < horizon:
                yield from self._pop()
        while self.heap:
            yield from self._pop()

    def _push(self, key: int, subject: str, data: bytes, kind: str) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (key, self.seq, subject, data, kind))

    def _pop(self) -> Iterator[GeneratedMessage]:
        key, _, subject, data, kind = heapq.heappop(self.heap)
        expected = self.expected
        expected.messages += 1
        yield GeneratedMessage(subject, data, kind)
        if kind != "event":
            return
        rng = self.rng
        if rng.random() < self.spec.duplicate_rate:
            expected.duplicates += 1
            roll = rng.random()
            if roll < 0.2:
                # The same bytes much later, as when an edge buffer replays.
                expected.duplicates_late += 1
                self._push(
                    key + rng.randint(1 * _HOUR, 12 * _HOUR), subject, data, "duplicate"
                )
            else:
                again = subject
                if roll < 0.45:
                    expected.duplicates_other_subject += 1
                    again = _other_spelling(subject)
                expected.messages += 1
                yield GeneratedMessage(again, data, "duplicate")
        self.bad_credit += self.spec.bad_rate
        if self.bad_credit >= 1.0:
            bad = self._bad(subject, data)
            if bad is not None:
                self.bad_credit -= 1.0
                expected.messages += 1
                expected.bad[bad.kind.removeprefix("bad:")] += 1
                yield bad
        self.anomaly_credit += self.spec.anomaly_rate
        if self.anomaly_credit >= 1.0:
            self.anomaly_credit -= 1.0
            anomaly = self._anomaly(subject, data)
            expected.messages += 1
            expected.anomalies[anomaly.kind.removeprefix("anomaly:")] += 1
            yield anomaly

    def _anomaly(self, subject: str, data: bytes) -> GeneratedMessage:
        """Build the next kind of anomaly from the valid message just yielded."""
        reason = ANOMALY_REASONS[self.next_anomaly % len(ANOMALY_REASONS)]
        self.next_anomaly += 1
        body = _generic_decoder.decode(data)
        if reason == "reused_id":
            body["source"] = f"{body['source']}-restarted"
        else:
            plant = next(p for p in self.plants if p.id == body["plant"])
            plant.bad += 1
            body["event_id"] = f"{plant.prefix}F{plant.bad:07d}"
            body["occurred_at"] = "2099" + body["occurred_at"][4:]
        return GeneratedMessage(subject, encode(body), f"anomaly:{reason}")

    def _bad(self, subject: str, data: bytes) -> GeneratedMessage | None:
        """Build the next kind of bad message from a valid one, or None if it cannot."""
        reason = BAD_REASONS[self.next_bad % len(BAD_REASONS)]
        body = _generic_decoder.decode(data)
        quantity_field = next((name for name in _QUANTITY_FIELDS if name in body), None)
        if reason in ("nan_quantity", "negative_quantity") and quantity_field is None:
            return None  # wait for a message with a quantity
        self.next_bad += 1
        plant = next(p for p in self.plants if p.id == body["plant"])
        plant.bad += 1
        body["event_id"] = f"{plant.prefix}X{plant.bad:07d}"
        if reason == "malformed_json":
            raw = encode(body)
            return GeneratedMessage(subject, raw[: len(raw) * 2 // 3], f"bad:{reason}")
        if reason == "unknown_event_type":
            body["event_type"] = UNKNOWN_EVENT_TYPE
            subject = event_subject(plant.id, UNKNOWN_EVENT_TYPE)
        elif reason == "missing_field":
            del body[_REQUIRED_FIELD[body["event_type"]]]
        elif reason == "naive_timestamp":
            body["occurred_at"] = _OFFSET_SUFFIX.sub("", body["occurred_at"])
        elif reason == "nan_quantity":
            body[quantity_field]["value"] = "NaN"
        else:
            value = Decimal(body[quantity_field]["value"])
            body[quantity_field]["value"] = str(-value if value else Decimal(-1))
        return GeneratedMessage(subject, encode(body), f"bad:{reason}")

    # -- one order --------------------------------------------------------------------

    def _subject(self, plant: str, event_type: str) -> str:
        subject = self.subjects.get((plant, event_type))
        if subject is None:
            subject = self.subjects[(plant, event_type)] = event_subject(
                plant, event_type
            )
        return subject

    def _order(self, plant: _Plant, released: int) -> None:
        rng = self.rng
        spec = self.spec
        plant.orders += 1
        records = _OrderWriter(self, plant, released).write()

        # Some releases come late: one or two early consumptions or reports go in ahead
        # of the release. Only those before any hold are moved, so the order in which
        # the pipeline applies them (release, then the parked ones) keeps the truth.
        ahead: set[int] = set()
        if rng.random() < spec.out_of_order_rate:
            first_hold = min((r.t for r in records if r.effect == "hold"), default=None)
            movable = [
                i
                for i, r in enumerate(records)
                if r.effect in ("receipt", "issue")
                and (first_hold is None or r.t < first_hold)
            ]
            if movable:
                ahead = set(rng.sample(movable, k=min(len(movable), rng.randint(1, 2))))
                self.expected.out_of_order_orders += 1
                self.expected.out_of_order_events += len(ahead)

        for index, record in enumerate(records):
            event = record.event
            event_type = str(event.__struct_config__.tag)
            data = encode(event)
            if (
                isinstance(event, MaterialConsumed)
                and event.quantity.uom == "KG"
                and rng.random() < spec.gram_rate
            ):
                grams = Quantity(event.quantity.value.scaleb(3), "G")
                data = encode(msgspec.structs.replace(event, quantity=grams))
                self.expected.gram_quantities += 1
            if event_type == "material_consumed" and rng.random() < 0.15:
                data = _NUMBER_VALUE.sub(rb'"value":\1', data, count=1)
                self.expected.json_number_quantities += 1
            key = (
                released - rng.randint(1_000, 5 * _MINUTE)
                if index in ahead
                else record.t
            )
            self._push(key, self._subject(plant.id, event_type), data, "event")
            self.expected.events += 1
            self.expected.events_by_type[event_type] += 1

        self._account(plant.id, records)

    def _account(self, plant: str, records: list[_Record]) -> None:
        """Add one order's stock effects, in event time order, to the truth."""
        expected = self.expected
        movements = expected.movements
        unrestricted = blocked = active_holds = 0
        product = ""
        uom = ""
        for record in sorted(records, key=lambda r: r.t):
            effect = record.effect
            if not effect:
                continue
            material = record.material
            if effect == "receipt":
                product = material
                uom = expected.uoms[material]
                _add_total(
                    movements, (plant, material, GOODS_RECEIPT), record.amount, uom
                )
                if active_holds:
                    blocked += record.amount
                    _add_total(
                        expected.blocked_receipts, (plant, material), record.amount, uom
                    )
                else:
                    unrestricted += record.amount
            elif effect == "cancel":
                unrestricted -= record.amount
                uom = expected.uoms[material]
                _add_total(
                    movements,
                    (plant, material, GOODS_RECEIPT_REVERSAL),
                    record.amount,
                    uom,
                )
            elif effect == "issue":
                _add_total(
                    movements,
                    (plant, material, GOODS_ISSUE),
                    record.amount,
                    expected.uoms[material],
                )
            elif effect == "reverse":
                _add_total(
                    movements,
                    (plant, material, GOODS_ISSUE_REVERSAL),
                    record.amount,
                    expected.uoms[material],
                )
            elif effect == "hold":
                active_holds += 1
                if active_holds == 1 and unrestricted:
                    _add_total(
                        movements, (plant, product, TO_BLOCKED), unrestricted, uom
                    )
                    blocked += unrestricted
                    unrestricted = 0
            elif effect == "release":
                active_holds -= 1
                if active_holds == 0 and blocked:
                    _add_total(movements, (plant, product, FROM_BLOCKED), blocked, uom)
                    unrestricted += blocked
                    blocked = 0
        if blocked:
            _add_total(expected.blocked_at_end, (plant, product), blocked, uom)


def _add_total(
    totals: dict[Any, Decimal], key: tuple[str, ...], amount: int, uom: str
) -> None:
    value = Decimal(amount).scaleb(-_DECIMALS[uom])
    totals[key] = totals.get(key, Decimal(0)) + value


def _other_spelling(subject: str) -> str:
    prefix, _, event_type = subject.rpartition(".")
    return f"{prefix}.{event_type.replace('_', '-')}"


class _OrderWriter:
    """Plans the events of one production order and the machine events around it."""

    def __init__(self, builder: _StreamBuilder, plant: _Plant, released: int) -> None:
        self.builder = builder
        self.rng = builder.rng
        self.spec = builder.spec
        self.expected = builder.expected
        self.plant = plant
        self.released = released
        self.order = f"{plant.prefix}WO{plant.orders:07d}"
        self.lot = f"{plant.prefix}L{plant.orders:07d}"
        self.records: list[_Record] = []

    def _base(
        self,
        t: int,
        source: str,
        order: str | None = None,
        work_center: str | None = None,
    ) -> dict[str, Any]:
        plant = self.plant
        plant.events += 1
        return {
            "event_id": f"{plant.prefix}E{plant.events:09d}",
            "plant": plant.id,
            "occurred_at": plant.epoch + dt.timedelta(milliseconds=t),
            "source": source,
            "order": order,
            "work_center": work_center,
        }

    def _add(
        self,
        t: int,
        event: Event,
        effect: str = "",
        material: str = "",
        amount: int = 0,
    ) -> None:
        self.records.append(_Record(t, event, effect, material, amount))

    def write(self) -> list[_Record]:
        rng = self.rng
        spec = self.spec
        expected = self.expected
        plant = self.plant
        order = self.order
        expected.orders[plant.id] += 1

        product = rng.choice(plant.products)
        expected.uoms.setdefault(product.id, product.uom)
        scale = _QUANTUM_PER_UNIT[product.uom]
        if product.uom == "EA":
            planned = rng.randint(5, 60) * 10
        else:
            planned = rng.randint(200, 3000) * scale + rng.randrange(scale)
        planned_units = planned / scale

        components = []
        for material in rng.sample(_COMPONENTS, k=rng.randint(2, 5)):
            expected.uoms.setdefault(material.id, material.uom)
            per_unit = (
                rng.uniform(0.02, 1.5) if material.uom == "KG" else rng.randint(1, 6)
            )
            if product.uom == "KG":
                per_unit *= 0.1
            standard = max(
                1, round(planned_units * per_unit * _QUANTUM_PER_UNIT[material.uom])
            )
            components.append((material, standard))

        # Routing picks the machines that free up first, as a planner would. A random
        # pick leaves idle gaps that nothing fills, so queues would grow without end.
        by_free = sorted(
            plant.machines, key=lambda m: (plant.machine_free[m], rng.random())
        )
        operations = []
        for number in range(rng.randint(1, 3)):
            cycle = _ideal_cycle_time(product, number)
            machine = by_free[number % len(by_free)]
            operations.append((f"{(number + 1) * 10:04d}", machine, cycle))

        self._add(
            self.released,
            WorkOrderReleased(
                **self._base(self.released, "erp", order),
                material=product.id,
                quantity=_quantity(planned, product.uom),
                components=[
                    Component(
                        material=material.id,
                        quantity=_quantity(standard, material.uom),
                        operation=operations[0][0],
                        storage_location="0001",
                    )
                    for material, standard in components
                ],
                operations=[
                    OperationSpec(
                        operation=op, work_center=machine, ideal_cycle_time_s=cycle
                    )
                    for op, machine, cycle in operations
                ],
                storage_location="0002",
            ),
        )

        has_hold = rng.random() < spec.hold_rate
        inspection_fails = [rng.random() < 0.03, rng.random() < 0.03]
        final_inspection = rng.random() < 0.5
        # Cancellations and reversals only in orders that never block stock, which keeps
        # the transfer totals exact (see the module docstring).
        may_reverse = (
            not has_hold
            and not inspection_fails[0]
            and not (final_inspection and inspection_fails[1])
        )

        ready = self.released + rng.randint(5 * _MINUTE, 45 * _MINUTE)
        first_start = 0
        reports: list[tuple[int, int]] = []
        for index, (op, machine, cycle) in enumerate(operations):
            last = index == len(operations) - 1
            start, run_start, end, pauses = self._operation(
                op, machine, cycle, planned_units, ready
            )
            if index == 0:
                first_start = start
            if last:
                reports = self._reports(
                    op, machine, product, planned, run_start, end, pauses, may_reverse
                )
            ready = end + rng.randint(2 * _MINUTE, 20 * _MINUTE)

        end = reports[-1][0]
        self._consumption(components, operations[0][0], first_start, end, may_reverse)

        first_report = reports[0][0]
        self._inspection(
            first_report + rng.randint(2 * _MINUTE, 20 * _MINUTE),
            product,
            inspection_fails[0],
        )
        if final_inspection:
            self._inspection(
                end + rng.randint(10 * _MINUTE, 60 * _MINUTE),
                product,
                inspection_fails[1],
            )
        if has_hold:
            self._hold(rng.randint(first_report + 1_000, end + 2 * _HOUR))

        holds = sum(1 for record in self.records if record.effect == "hold")
        releases = sum(1 for record in self.records if record.effect == "release")
        if holds == releases and rng.random() < 0.3:
            self._shipment(
                end + rng.randint(1 * _HOUR, 24 * _HOUR),
                product,
                sum(good for _, good in reports),
            )
        return self.records

    def _operation(
        self, op: str, machine: str, cycle: Decimal, planned_units: float, ready: int
    ) -> tuple[int, int, int, list[tuple[int, int]]]:
        """Plan one operation and return its start, run start, end and pauses."""
        rng = self.rng
        plant = self.plant
        start = max(ready, plant.machine_free[machine])
        if rng.random() < 0.1:
            start = self._planned_stop(machine, start)

        setup = rng.randint(5 * _MINUTE, 20 * _MINUTE)
        run_start = start + setup
        # Machines run slower than the ideal cycle time: that loss is OEE's performance.
        active = int(planned_units * float(cycle) * rng.uniform(1.05, 1.4) * 1000)
        pauses: list[tuple[int, int]] = []

        self._add(
            start,
            OperationStarted(
                **self._base(start, "mes", self.order, machine), operation=op
            ),
        )
        self._machine_state(start, machine, "setup")
        self._machine_state(run_start + 1, machine, "running")
        end = run_start + active
        if rng.random() < 0.1:
            stop_at = run_start + int(active * rng.uniform(0.1, 0.9))
            length = self._breakdown(machine, stop_at)
            pauses.append((stop_at, length))
            end += length

        self._add(
            end,
            OperationCompleted(
                **self._base(end, "mes", self.order, machine), operation=op
            ),
        )
        self._machine_state(end + 1_000, machine, "idle")
        plant.machine_free[machine] = end + 1_000
        return start, run_start, end, pauses

    def _reports(
        self,
        op: str,
        machine: str,
        product: _Material,
        planned: int,
        run_start: int,
        end: int,
        pauses: list[tuple[int, int]],
        may_reverse: bool,
    ) -> list[tuple[int, int]]:
        """Plan the reports of the last operation and return (time, good) pairs."""
        rng = self.rng
        uom = product.uom
        count = 1 if planned < 50 * _QUANTUM_PER_UNIT[uom] else rng.randint(1, 4)
        paused = sum(length for _, length in pauses)
        span = end - run_start - paused
        times = []
        for index in range(count):
            t = run_start + span * (index + 1) // count
            t += sum(length for at, length in pauses if at <= t)
            times.append(min(t, end - 500))

        reports: list[tuple[int, int]] = []
        previous = run_start
        for index, t in enumerate(times):
            final = index == count - 1
            share = planned / count
            if not final and rng.random() < 0.02:
                good = 0  # a report of scrap only, which posts no goods receipt
            else:
                good = max(1, round(share * rng.uniform(0.95, 1.01)))
            scrap = round(share * rng.uniform(0.0, 0.03)) if rng.random() < 0.7 else 0
            if good == 0:
                scrap = max(scrap, 1)
            rework = (
                round(share * rng.uniform(0.005, 0.02)) if rng.random() < 0.05 else 0
            )

            event = self._confirmation(
                t, op, machine, uom, good, scrap, rework, final, previous
            )
            self._add(t, event, "receipt" if good else "", product.id, good)
            reports.append((t, good))

            if (
                may_reverse
                and good
                and not final
                and rng.random() < self.spec.reversal_rate
            ):
                # Reported by mistake: cancel it before the next report, report again.
                cancel_at = (t + times[index + 1]) // 2
                self.expected.cancellations += 1
                self._add(
                    cancel_at,
                    ProductionCancelled(
                        **self._base(cancel_at, "mes", self.order, machine),
                        cancels_event_id=event.event_id,
                    ),
                    "cancel",
                    product.id,
                    good,
                )
                again = max(1, round(good * rng.uniform(0.9, 1.0)))
                redo_at = cancel_at + 1_000
                redo = self._confirmation(
                    redo_at, op, machine, uom, again, 0, 0, False, previous
                )
                self._add(redo_at, redo, "receipt", product.id, again)
                reports.append((redo_at, again - good))
            previous = t
        return reports

    def _confirmation(
        self,
        t: int,
        op: str,
        machine: str,
        uom: str,
        good: int,
        scrap: int,
        rework: int,
        final: bool,
        started: int,
    ) -> ProductionConfirmed:
        plant = self.plant
        return ProductionConfirmed(
            **self._base(t, "mes", self.order, machine),
            good=_quantity(good, uom),
            scrap=_quantity(scrap, uom) if scrap else None,
            rework=_quantity(rework, uom) if rework else None,
            operation=op,
            lot=self.lot,
            final=final,
            started_at=plant.epoch + dt.timedelta(milliseconds=started),
        )

    def _consumption(
        self,
        components: list[tuple[_Material, int]],
        op: str,
        first: int,
        last: int,
        may_reverse: bool,
    ) -> None:
        rng = self.rng
        for material, standard in components:
            if rng.random() < 0.04:
                factor = 1 + rng.choice((-1, 1)) * rng.uniform(0.08, 0.25)
            else:
                factor = 1 + rng.uniform(-0.05, 0.05)
            actual = max(1, round(standard * factor))
            parts = [actual]
            if actual > 1 and rng.random() < 0.2:
                first_part = rng.randint(1, actual - 1)
                parts = [first_part, actual - first_part]
            for amount in parts:
                t = rng.randint(first + 1_000, last)
                event = MaterialConsumed(
                    **self._base(t, "mes", self.order),
                    material=material.id,
                    quantity=_quantity(amount, material.uom),
                    lot=f"{material.id}-B{rng.randint(100, 999)}",
                    storage_location="0001",
                    operation=op,
                )
                self._add(t, event, "issue", material.id, amount)
                if may_reverse and rng.random() < self.spec.reversal_rate:
                    back = t + rng.randint(5 * _MINUTE, 30 * _MINUTE)
                    self.expected.reversals += 1
                    self._add(
                        back,
                        ConsumptionReversed(
                            **self._base(back, "mes", self.order),
                            reverses_event_id=event.event_id,
                        ),
                        "reverse",
                        material.id,
                        amount,
                    )
                    corrected = max(1, round(amount * rng.uniform(0.9, 1.0)))
                    redo = back + 1_000
                    self._add(
                        redo,
                        MaterialConsumed(
                            **self._base(redo, "mes", self.order),
                            material=material.id,
                            quantity=_quantity(corrected, material.uom),
                            storage_location="0001",
                            operation=op,
                        ),
                        "issue",
                        material.id,
                        corrected,
                    )

    def _inspection(self, t: int, product: _Material, failed: bool) -> None:
        if failed:
            self.expected.failed_inspections += 1
        event = InspectionRecorded(
            **self._base(t, "qms", self.order),
            result="fail" if failed else "pass",
            lot=self.lot,
            material=product.id,
            characteristic=self.rng.choice(_CHARACTERISTICS),
        )
        self._add(t, event, "hold" if failed else "")

    def _hold(self, t: int) -> None:
        rng = self.rng
        plant = self.plant
        plant.holds += 1
        hold_id = f"{plant.prefix}QH{plant.holds:06d}"
        by_lot = rng.random() < 0.25
        self.expected.holds_applied += 1
        self._add(
            t,
            QualityHoldApplied(
                **self._base(t, "qms", self.order),
                hold_id=hold_id,
                scope="lot" if by_lot else "order",
                lot=self.lot if by_lot else None,
                reason=rng.choice(_HOLD_REASONS),
            ),
            "hold",
        )
        if rng.random() < 0.85:
            released = t + rng.randint(30 * _MINUTE, 10 * _HOUR)
            self.expected.holds_released += 1
            self._add(
                released,
                QualityHoldReleased(
                    **self._base(released, "qms", self.order), hold_id=hold_id
                ),
                "release",
            )

    def _shipment(self, t: int, product: _Material, good: int) -> None:
        rng = self.rng
        plant = self.plant
        if good <= 0:
            return
        plant.deliveries += 1
        shipped = good if rng.random() < 0.6 else max(1, good // 2)
        self.expected.shipments += 1
        self._add(
            t,
            ShipmentConfirmed(
                **self._base(t, "wms"),
                delivery=f"{plant.prefix}DL{plant.deliveries:07d}",
                material=product.id,
                quantity=_quantity(shipped, product.uom),
                customer=f"C{rng.randint(10001, 10250)}",
            ),
        )

    # -- machine events ---------------------------------------------------------------

    def _machine_state(
        self,
        t: int,
        machine: str,
        state: str,
        reason: str | None = None,
        planned: bool = False,
    ) -> None:
        event = MachineStateChanged(
            **self._base(t, "scada", work_center=machine),
            machine=machine,
            state=state,  # type: ignore[arg-type]
            reason=reason,
            planned=planned,
        )
        self._add(t, event)

    def _downtime(
        self, start: int, end: int, machine: str, reason: str, planned: bool
    ) -> None:
        plant = self.plant
        plant.downtimes += 1
        self.expected.downtimes += 1
        downtime_id = f"{plant.prefix}DT{plant.downtimes:07d}"
        self._add(
            start,
            DowntimeStarted(
                **self._base(start, "cmms", work_center=machine),
                machine=machine,
                downtime_id=downtime_id,
                reason=reason,
                planned=planned,
            ),
        )
        self._add(
            end,
            DowntimeEnded(
                **self._base(end, "cmms", work_center=machine),
                machine=machine,
                downtime_id=downtime_id,
            ),
        )

    def _planned_stop(self, machine: str, at: int) -> int:
        """Plan a break or planned maintenance on an idle machine and return its end."""
        rng = self.rng
        if rng.random() < 0.6:
            reason, state, length = (
                "break",
                "down",
                rng.randint(15 * _MINUTE, 30 * _MINUTE),
            )
        else:
            reason, state, length = (
                "planned_maintenance",
                "maintenance",
                rng.randint(45 * _MINUTE, 2 * _HOUR),
            )
        end = at + length
        self._machine_state(at, machine, state, reason, planned=True)
        self._downtime(at, end, machine, reason, planned=True)
        self._machine_state(end + 1, machine, "idle")
        return end + 1_000

    def _breakdown(self, machine: str, at: int) -> int:
        """Plan an unplanned stop in an operation; return its length (overlaps once)."""
        rng = self.rng
        reason = rng.choice(_BREAKDOWNS)
        length = rng.randint(5 * _MINUTE, 45 * _MINUTE)
        end = at + length
        self._machine_state(at, machine, "down", reason)
        self._downtime(at, end, machine, reason, planned=False)
        if rng.random() < 0.15:
            # A second record for the same stop, as when operator and maintenance each
            # log one: down time is the union, never the sum.
            self.expected.overlapping_downtimes += 1
            second_start = at + rng.randint(
                1 * _MINUTE, max(length - _MINUTE, _MINUTE + 1)
            )
            second_end = second_start + rng.randint(5 * _MINUTE, 40 * _MINUTE)
            self._downtime(
                second_start,
                second_end,
                machine,
                rng.choice(_OVERLAP_REASONS),
                planned=False,
            )
            end = max(end, second_end)
        self._machine_state(end + 1, machine, "running")
        return end + 1_000 - at
