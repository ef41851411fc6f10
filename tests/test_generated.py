"""Tests of the generated demo stream: its faults, its counts and its ground truth."""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter, defaultdict
from decimal import Decimal

import msgspec
import pytest

from contracts.codec import decode_event
from contracts.events import (
    ConsumptionReversed,
    DowntimeEnded,
    DowntimeStarted,
    InspectionRecorded,
    MaterialConsumed,
    PlantEvent,
    ProductionCancelled,
    ProductionConfirmed,
    QualityHoldApplied,
    QualityHoldReleased,
    Quantity,
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
from pipeline.sources.generated import (
    ANOMALY_REASONS,
    BAD_REASONS,
    DEFAULT_SEED,
    Expected,
    GeneratedMessage,
    StreamSpec,
    generate,
    iter_events,
)
from pipeline.subjects import event_subject, validate_token

Stream = tuple[list[GeneratedMessage], Expected]


@pytest.fixture(scope="module")
def stream() -> Stream:
    return generate(StreamSpec())


def _valid(
    messages: list[GeneratedMessage],
) -> list[tuple[GeneratedMessage, PlantEvent]]:
    return [
        (m, decode_event(m.data))
        for m in messages
        if not m.kind.startswith(("bad:", "anomaly:"))
    ]


def _in_bom_unit(quantity: Quantity) -> Decimal:
    # The generator reports some KG consumptions in G; 1 G is exactly 0.001 KG.
    return quantity.value.scaleb(-3) if quantity.uom == "G" else quantity.value


def _originals(messages: list[GeneratedMessage]) -> list[PlantEvent]:
    return [decode_event(m.data) for m in messages if m.kind == "event"]


def test_generate_same_seed_same_stream() -> None:
    spec = StreamSpec(orders_per_plant=40)
    first, first_expected = generate(spec)
    second, second_expected = generate(spec)
    assert first == second
    assert first_expected == second_expected


def test_generate_other_seed_other_stream() -> None:
    first, _ = generate(StreamSpec(orders_per_plant=40, seed=1))
    second, _ = generate(StreamSpec(orders_per_plant=40, seed=2))
    assert first != second


def test_other_seeds_share_no_ids() -> None:
    def ids(seed: int) -> tuple[set[str], set[str]]:
        events = _originals(generate(StreamSpec(orders_per_plant=20, seed=seed))[0])
        return {e.event_id for e in events}, {e.order for e in events if e.order}

    default_events, default_orders = ids(DEFAULT_SEED)
    other_events, other_orders = ids(11)
    assert "P01-E000000001" in default_events
    assert "P01-S11-E000000001" in other_events
    assert not default_events & other_events
    assert not default_orders & other_orders


def test_iter_events_matches_generate(stream: Stream) -> None:
    messages, expected = stream
    filled = Expected()
    assert list(iter_events(StreamSpec(), filled)) == messages
    assert filled == expected


def test_bad_every_reason_present(stream: Stream) -> None:
    messages, expected = stream
    kinds = {m.kind for m in messages if m.kind.startswith("bad:")}
    assert kinds == {f"bad:{reason}" for reason in BAD_REASONS}
    assert set(expected.bad) == set(BAD_REASONS)


def test_events_and_duplicates_decode(stream: Stream) -> None:
    messages, _ = stream
    for message in messages:
        if message.kind in ("event", "duplicate"):
            decode_event(message.data)


@pytest.mark.parametrize("reason", BAD_REASONS)
def test_bad_messages_fail_decode(stream: Stream, reason: str) -> None:
    messages, _ = stream
    bad = [m for m in messages if m.kind == f"bad:{reason}"]
    assert bad
    for message in bad:
        with pytest.raises(msgspec.DecodeError):
            decode_event(message.data)


def test_bad_messages_own_event_ids(stream: Stream) -> None:
    messages, _ = stream
    valid_ids = {event.event_id for event in _originals(messages)}
    for message in messages:
        if not message.kind.startswith("bad:") or message.kind == "bad:malformed_json":
            continue
        event_id = msgspec.json.decode(message.data)["event_id"]
        assert event_id not in valid_ids


def test_expected_message_counts(stream: Stream) -> None:
    messages, expected = stream
    kinds = Counter(m.kind for m in messages)
    assert expected.messages == len(messages)
    assert expected.events == kinds["event"]
    assert expected.duplicates == kinds["duplicate"]
    assert expected.bad_total == sum(
        n for k, n in kinds.items() if k.startswith("bad:")
    )
    for reason in BAD_REASONS:
        assert expected.bad[reason] == kinds[f"bad:{reason}"]


def test_expected_event_ids_unique(stream: Stream) -> None:
    messages, expected = stream
    ids = [event.event_id for event in _originals(messages)]
    assert len(set(ids)) == expected.events


def test_expected_counts_by_type(stream: Stream) -> None:
    messages, expected = stream
    originals = _originals(messages)
    by_type = Counter(type(e).__struct_config__.tag for e in originals)
    releases = Counter(e.plant for e in originals if isinstance(e, WorkOrderReleased))
    assert by_type == expected.events_by_type
    assert releases == expected.orders
    assert releases == {"P01": 200, "P02": 200, "P03": 200}


def test_duplicates_repeat_earlier_bytes(stream: Stream) -> None:
    messages, expected = stream
    sent: dict[bytes, tuple[int, str]] = {}
    other_subject = late = 0
    for position, message in enumerate(messages):
        if message.kind == "event":
            sent[message.data] = (position, message.subject)
        elif message.kind == "duplicate":
            assert message.data in sent
            original_position, original_subject = sent[message.data]
            other_subject += message.subject != original_subject
            late += position - original_position > 1
    assert other_subject == expected.duplicates_other_subject
    assert late == expected.duplicates_late
    assert expected.duplicates_other_subject > 0
    assert expected.duplicates_late > 0


def test_subjects_valid(stream: Stream) -> None:
    messages, _ = stream
    for message in messages:
        prefix, plant, event_type = message.subject.rsplit(".", 2)
        assert prefix == "plant.events"
        assert validate_token(plant, "plant") == plant
        assert validate_token(event_type, "event type") == event_type


def test_subjects_name_event_type(stream: Stream) -> None:
    messages, _ = stream
    for message, event in _valid(messages):
        subject = event_subject(event.plant, str(type(event).__struct_config__.tag))
        if message.kind == "event":
            assert message.subject == subject
        else:
            assert message.subject.replace("-", "_") == subject


def test_time_zones_vary_by_plant(stream: Stream) -> None:
    messages, _ = stream
    offsets: dict[str, set[dt.timedelta | None]] = defaultdict(set)
    for event in _originals(messages):
        offsets[event.plant].add(event.occurred_at.utcoffset())
    assert all(len(plant_offsets) == 1 for plant_offsets in offsets.values())
    assert len({next(iter(o)) for o in offsets.values()}) == 3


def test_json_number_quantity_exact(stream: Stream) -> None:
    messages, expected = stream
    number = re.compile(rb'"value":([0-9][0-9.]*)[,}]')
    searched = [(m, number.search(m.data)) for m in messages if m.kind == "event"]
    found = [(m, match) for m, match in searched if match is not None]
    assert len(found) == expected.json_number_quantities
    assert found
    for message, match in found:
        event = decode_event(message.data)
        assert isinstance(event, MaterialConsumed)
        written = Decimal(match.group(1).decode())
        assert event.quantity.value == written
        assert str(event.quantity.value) == match.group(1).decode()


def test_json_number_fraction_decodes_exact() -> None:
    # 0.1 has no exact float, so a float detour would show in the Decimal.
    messages, _ = generate(StreamSpec(orders_per_plant=40))
    message = next(m for m in messages if m.kind == "event" and b'"value":"' in m.data)
    raw = re.sub(rb'"value":"[0-9.]+"', b'"value":0.1', message.data, count=1)
    event = decode_event(raw)
    quantities = [getattr(event, name, None) for name in ("quantity", "good")]
    values = [q.value for q in quantities if q is not None]
    assert values[0] == Decimal("0.1")


def test_out_of_order_before_release(stream: Stream) -> None:
    messages, expected = stream
    released: set[tuple[str, str]] = set()
    early_orders: set[tuple[str, str]] = set()
    early_events = 0
    for event in _originals(messages):
        if event.order is None:
            continue
        key = (event.plant, event.order)
        if isinstance(event, WorkOrderReleased):
            released.add(key)
        elif key not in released:
            assert isinstance(event, ProductionConfirmed | MaterialConsumed)
            early_orders.add(key)
            early_events += 1
    assert early_events == expected.out_of_order_events
    assert len(early_orders) == expected.out_of_order_orders
    assert expected.out_of_order_orders > 0


def test_events_in_time_order(stream: Stream) -> None:
    messages, _ = stream
    released: set[tuple[str, str]] = set()
    previous = dt.datetime.min.replace(tzinfo=dt.UTC)
    for event in _originals(messages):
        if event.order is not None:
            key = (event.plant, event.order)
            if isinstance(event, WorkOrderReleased):
                released.add(key)
            elif key not in released:
                continue  # sent early on purpose
        assert event.occurred_at >= previous
        previous = event.occurred_at


def test_last_confirmation_final(stream: Stream) -> None:
    messages, _ = stream
    reports: dict[tuple[str, str], list[ProductionConfirmed]] = defaultdict(list)
    for event in _originals(messages):
        if isinstance(event, ProductionConfirmed):
            reports[(event.plant, event.order or "")].append(event)
    assert len(reports) == 600
    for order_reports in reports.values():
        order_reports.sort(key=lambda e: e.occurred_at)
        assert order_reports[-1].final
        assert sum(e.final for e in order_reports) == 1


def test_consumption_near_standard(stream: Stream) -> None:
    messages, _ = stream
    standard: dict[tuple[str, str, str], Decimal] = {}
    actual: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for event in _originals(messages):
        if isinstance(event, WorkOrderReleased):
            for component in event.components:
                key = (event.plant, event.order or "", component.material)
                standard[key] = component.quantity.value
        elif isinstance(event, MaterialConsumed):
            key = (event.plant, event.order or "", event.material)
            actual[key] += _in_bom_unit(event.quantity)
    ratios = [actual[key] / standard[key] for key in standard]
    close = sum(Decimal("0.94") <= r <= Decimal("1.06") for r in ratios)
    assert close / len(ratios) > 0.9
    assert close < len(ratios)


def test_failed_inspections_counted(stream: Stream) -> None:
    messages, expected = stream
    originals = _originals(messages)
    inspections = [e for e in originals if isinstance(e, InspectionRecorded)]
    failed = sum(e.result == "fail" for e in inspections)
    assert failed == expected.failed_inspections
    assert 0 < failed < len(inspections) * 0.06


def test_lot_holds_name_order_lot(stream: Stream) -> None:
    messages, _ = stream
    originals = _originals(messages)
    lots = {
        (e.plant, e.order): e.lot
        for e in originals
        if isinstance(e, ProductionConfirmed)
    }
    holds = [e for e in originals if isinstance(e, QualityHoldApplied)]
    lot_holds = [e for e in holds if e.scope == "lot"]
    assert lot_holds
    for hold in lot_holds:
        assert hold.lot == lots[(hold.plant, hold.order)]


def test_overlapping_downtimes_counted(stream: Stream) -> None:
    messages, expected = stream
    started: dict[str, DowntimeStarted] = {}
    intervals: dict[tuple[str, str], list[tuple[dt.datetime, dt.datetime]]] = (
        defaultdict(list)
    )
    for event in _originals(messages):
        if isinstance(event, DowntimeStarted):
            started[event.downtime_id] = event
        elif isinstance(event, DowntimeEnded):
            begin = started.pop(event.downtime_id).occurred_at
            intervals[(event.plant, event.machine)].append((begin, event.occurred_at))
    overlapping = 0
    for machine_intervals in intervals.values():
        machine_intervals.sort()
        for (_, end), (begin, _) in zip(
            machine_intervals, machine_intervals[1:], strict=False
        ):
            overlapping += begin < end
    assert started == {}
    assert overlapping == expected.overlapping_downtimes
    assert overlapping > 0


def _replay(messages: list[GeneratedMessage]) -> Expected:
    """Apply the posting rules of the module docstring to the messages in list order."""
    truth = Expected()
    now = dt.datetime.now(dt.UTC)
    seen: set[str] = set()
    released: dict[tuple[str, str], str] = {}
    parked: dict[tuple[str, str], list[PlantEvent]] = defaultdict(list)
    unrestricted: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    blocked: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    active: Counter[tuple[str, str]] = Counter()
    hold_orders: dict[str, tuple[str, str]] = {}
    applied: dict[str, PlantEvent] = {}

    def post(plant: str, material: str, movement: str, quantity: Decimal) -> None:
        key = (plant, material, movement)
        truth.movements[key] = truth.movements.get(key, Decimal(0)) + quantity

    def hold(order: tuple[str, str]) -> None:
        active[order] += 1
        if active[order] == 1 and unrestricted[order]:
            post(order[0], released[order], TO_BLOCKED, unrestricted[order])
            blocked[order] += unrestricted.pop(order)

    def release(order: tuple[str, str]) -> None:
        active[order] -= 1
        if active[order] == 0 and blocked[order]:
            post(order[0], released[order], FROM_BLOCKED, blocked[order])
            unrestricted[order] += blocked.pop(order)

    def apply(event: PlantEvent) -> None:
        order = (event.plant, event.order or "")
        applied[event.event_id] = event
        if isinstance(event, ProductionConfirmed) and event.good.value > 0:
            post(event.plant, released[order], GOODS_RECEIPT, event.good.value)
            if active[order]:
                blocked[order] += event.good.value
                key = (event.plant, released[order])
                truth.blocked_receipts[key] = (
                    truth.blocked_receipts.get(key, Decimal(0)) + event.good.value
                )
            else:
                unrestricted[order] += event.good.value
        elif isinstance(event, ProductionCancelled):
            cancelled = applied[event.cancels_event_id]
            assert isinstance(cancelled, ProductionConfirmed)
            post(
                event.plant,
                released[order],
                GOODS_RECEIPT_REVERSAL,
                cancelled.good.value,
            )
            unrestricted[order] -= cancelled.good.value
        elif isinstance(event, MaterialConsumed):
            post(event.plant, event.material, GOODS_ISSUE, _in_bom_unit(event.quantity))
        elif isinstance(event, ConsumptionReversed):
            reversed_ = applied[event.reverses_event_id]
            assert isinstance(reversed_, MaterialConsumed)
            post(
                event.plant,
                reversed_.material,
                GOODS_ISSUE_REVERSAL,
                _in_bom_unit(reversed_.quantity),
            )
        elif isinstance(event, InspectionRecorded) and event.result == "fail":
            hold(order)
        elif isinstance(event, QualityHoldApplied):
            hold_orders[event.hold_id] = order
            hold(order)
        elif isinstance(event, QualityHoldReleased):
            release(hold_orders[event.hold_id])

    for message in messages:
        try:
            event = decode_event(message.data)
        except msgspec.DecodeError:
            continue
        if event.occurred_at > now + dt.timedelta(minutes=5):
            continue  # dead-lettered as future_time
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        if event.order is None:
            continue
        order = (event.plant, event.order)
        if isinstance(event, WorkOrderReleased):
            released[order] = event.material
            for waiting in parked.pop(order, []):
                apply(waiting)
        elif order not in released:
            parked[order].append(event)
        else:
            apply(event)
    assert not parked
    for order, quantity in blocked.items():
        if quantity:
            key = (order[0], released[order])
            truth.blocked_at_end[key] = (
                truth.blocked_at_end.get(key, Decimal(0)) + quantity
            )
    return truth


def test_expected_movements_match_replay(stream: Stream) -> None:
    messages, expected = stream
    replayed = _replay(messages)
    assert replayed.movements == expected.movements
    assert replayed.blocked_receipts == expected.blocked_receipts
    assert replayed.blocked_at_end == expected.blocked_at_end


@pytest.mark.parametrize(
    "movement",
    [
        GOODS_RECEIPT,
        GOODS_RECEIPT_REVERSAL,
        GOODS_ISSUE,
        GOODS_ISSUE_REVERSAL,
        TO_BLOCKED,
    ],
)
def test_expected_movements_present(stream: Stream, movement: str) -> None:
    _, expected = stream
    assert any(key[2] == movement for key in expected.movements)


def test_expected_movements_larger_spec_replay() -> None:
    messages, expected = generate(StreamSpec(plants=5, orders_per_plant=400, seed=11))
    replayed = _replay(messages)
    assert replayed.movements == expected.movements
    assert replayed.blocked_at_end == expected.blocked_at_end


def test_net_receipts_subtracts_reversals(stream: Stream) -> None:
    _, expected = stream
    plant, material, _ = next(
        key for key in expected.movements if key[2] == GOODS_RECEIPT_REVERSAL
    )
    received = expected.movements[(plant, material, GOODS_RECEIPT)]
    reversed_ = expected.movements[(plant, material, GOODS_RECEIPT_REVERSAL)]
    assert expected.net_receipts(plant, material) == received - reversed_


def test_quantities_have_at_most_three_decimals(stream: Stream) -> None:
    _, expected = stream
    for value in expected.movements.values():
        assert value.as_tuple().exponent >= -3  # type: ignore[operator]


def test_zero_rates_no_faults() -> None:
    spec = StreamSpec(
        orders_per_plant=50,
        duplicate_rate=0,
        out_of_order_rate=0,
        bad_rate=0,
        anomaly_rate=0,
        gram_rate=0,
    )
    messages, expected = generate(spec)
    assert {m.kind for m in messages} == {"event"}
    assert expected.duplicates == 0
    assert expected.out_of_order_events == 0
    assert expected.gram_quantities == 0


def test_anomalies_every_kind(stream: Stream) -> None:
    messages, expected = stream
    kinds = Counter(m.kind for m in messages if m.kind.startswith("anomaly:"))
    assert set(kinds) == {f"anomaly:{reason}" for reason in ANOMALY_REASONS}
    for reason in ANOMALY_REASONS:
        assert expected.anomalies[reason] == kinds[f"anomaly:{reason}"]


def test_gram_quantities_present(stream: Stream) -> None:
    messages, expected = stream
    grams = [m for m in messages if m.kind == "event" and b'"uom":"G"' in m.data]
    assert expected.gram_quantities > 0
    assert len(grams) == expected.gram_quantities


def test_large_spec_generates() -> None:
    _, expected = generate(StreamSpec(plants=30, orders_per_plant=100))
    assert len(expected.orders) == 30
    assert expected.orders["P30"] == 100


@pytest.mark.parametrize(
    "changes",
    [
        {"plants": 0},
        {"bad_rate": 1.5},
        {"hold_rate": -0.1},
        {"start": dt.datetime(2026, 1, 5)},
    ],
)
def test_spec_rejects_invalid(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        StreamSpec(**changes)  # type: ignore[arg-type]
