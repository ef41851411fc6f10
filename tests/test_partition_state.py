"""Partition state rules, run in-process and inside a real Ray actor."""

from __future__ import annotations

import datetime as dt
import random
from collections import OrderedDict
from collections.abc import Callable
from decimal import Decimal

import msgspec
import pytest
import ray

from actors.id_table import IdTable, IdTableChanges, add_packed_id, find_packed_id
from actors.partition import PartitionActor
from actors.partition_state import (
    BatchResult,
    Checkpoint,
    CheckpointFormatError,
    OrdersCheckpoint,
    PartitionState,
    SourceMessage,
)
from actors.repartition import take_share
from actors.settings import StateSettings
from contracts import events as ev
from contracts.codec import decode_posting, encode
from contracts.postings import GoodsMovement, OrderConfirmation
from pipeline.subjects import event_subject

T0 = dt.datetime(2026, 3, 2, 8, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))


def at(minutes: int) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def qty(value: str, uom: str = "EA") -> ev.Quantity:
    return ev.Quantity(Decimal(value), uom)


def release(order: str = "O1", minutes: int = 0) -> ev.WorkOrderReleased:
    return ev.WorkOrderReleased(
        event_id=f"{order}-rel",
        plant="P1",
        order=order,
        occurred_at=at(minutes),
        source="mes",
        material="FG-1",
        quantity=qty("100"),
        components=[
            ev.Component(material="RM-1", quantity=qty("50", "KG")),
            ev.Component(material="RM-1", quantity=qty("25", "KG"), operation="20"),
        ],
        operations=[
            ev.OperationSpec(
                operation="10", work_center="M1", ideal_cycle_time_s=Decimal(30)
            )
        ],
    )


def confirm(
    event_id: str, good: str, order: str = "O1", **kw: object
) -> ev.ProductionConfirmed:
    return ev.ProductionConfirmed(
        event_id=event_id,
        plant="P1",
        order=order,
        occurred_at=at(10),
        source="mes",
        good=qty(good),
        operation="10",
        **kw,  # type: ignore[arg-type]
    )


def consume(event_id: str, amount: str, order: str = "O1") -> ev.MaterialConsumed:
    return ev.MaterialConsumed(
        event_id=event_id,
        plant="P1",
        order=order,
        occurred_at=at(5),
        source="mes",
        material="RM-1",
        quantity=qty(amount, "KG"),
    )


def hold(event_id: str, hold_id: str, order: str = "O1") -> ev.QualityHoldApplied:
    return ev.QualityHoldApplied(
        event_id=event_id, plant="P1", order=order, occurred_at=at(20), source="qm",
        hold_id=hold_id,
    )  # fmt: skip


def unhold(event_id: str, hold_id: str, order: str = "O1") -> ev.QualityHoldReleased:
    return ev.QualityHoldReleased(
        event_id=event_id, plant="P1", order=order, occurred_at=at(30), source="qm",
        hold_id=hold_id,
    )  # fmt: skip


def messages(*events: ev.PlantEvent | bytes, after: int = 0) -> list[SourceMessage]:
    """Messages at stream sequences after `after`; a state takes a message at or
    before its last sequence as a redelivery."""
    out = []
    for seq, item in enumerate(events, start=after + 1):
        if isinstance(item, bytes):
            out.append(SourceMessage(seq, "plant.events.P1.x", item))
        else:
            subject = event_subject(item.plant, str(item.__struct_config__.tag))
            out.append(SourceMessage(seq, subject, encode(item)))
    return out


Apply = Callable[[list[SourceMessage]], BatchResult]


@pytest.fixture(params=["in_process", "ray_actor"])
def apply(request: pytest.FixtureRequest) -> Apply:
    """The same rules, applied by a plain PartitionState and by a real Ray actor."""
    if request.param == "in_process":
        return PartitionState(0).apply_batch
    request.getfixturevalue("ray_local")
    actor = PartitionActor.remote(0)  # type: ignore[attr-defined]
    request.addfinalizer(lambda: ray.kill(actor))
    return lambda batch: ray.get(actor.apply.remote(batch))


def movements(result: BatchResult) -> list[GoodsMovement]:
    decoded = [decode_posting(p.data) for p in result.postings]
    return [p for p in decoded if isinstance(p, GoodsMovement)]


def test_receipt_issue_and_confirmation(apply: Apply) -> None:
    result = apply(messages(release(), consume("c1", "12.125"), confirm("p1", "40")))
    kinds = sorted(p.movement for p in result.postings)
    assert kinds == ["101", "261", "conf"]
    issue = next(m for m in movements(result) if m.movement_type == "261")
    assert issue.quantity == Decimal("12.125")
    assert issue.uom == "KG"
    receipt = next(m for m in movements(result) if m.movement_type == "101")
    assert receipt.stock_type == "unrestricted"
    assert receipt.lineage == ("p1",)


def test_posted_quantities_have_no_exponent(apply: Apply) -> None:
    result = apply(
        messages(release(), consume("c1", "0.00000001"), confirm("p1", "1000"))
    )
    by_movement = {p.movement: p.data for p in result.postings}
    assert b'"quantity":"0.00000001"' in by_movement["261"]
    assert b'"quantity":"1000"' in by_movement["101"]
    assert b'"yield_quantity":"1000"' in by_movement["conf"]


def test_duplicate_dropped(apply: Apply) -> None:
    result = apply(messages(release(), confirm("p1", "5"), confirm("p1", "5")))
    assert result.counts["duplicates"] == 1
    assert sum(1 for p in result.postings if p.movement == "101") == 1


def test_reused_id_dead_lettered(apply: Apply) -> None:
    result = apply(messages(release(), confirm("p1", "5"), confirm("p1", "6")))
    assert [d.reason for d in result.dead_letters] == ["reused_id"]
    assert result.dead_letters[0].stream_seq == 3
    assert sum(1 for p in result.postings if p.movement == "101") == 1


def test_parked_until_release(apply: Apply) -> None:
    result = apply(messages(consume("c1", "3"), confirm("p1", "5"), release()))
    assert result.counts["parked"] == 2
    assert result.counts["unparked"] == 2
    assert sorted(p.movement for p in result.postings) == ["101", "261", "conf"]


def test_cancellation_inverts_once(apply: Apply) -> None:
    cancel = ev.ProductionCancelled(
        event_id="x1", plant="P1", order="O1", occurred_at=at(40), source="mes",
        cancels_event_id="p1",
    )  # fmt: skip
    again = msgspec.structs.replace(cancel, event_id="x2")
    result = apply(messages(release(), confirm("p1", "5"), cancel, again))
    reversal = [m for m in movements(result) if m.movement_type == "102"]
    receipt = next(m for m in movements(result) if m.movement_type == "101")
    assert len(reversal) == 1
    assert reversal[0].reverses == receipt.key
    assert reversal[0].quantity == Decimal(5)


def test_cancelled_final_confirmation_reopens_the_order() -> None:
    state = PartitionState(0)
    cancel = ev.ProductionCancelled(
        event_id="x1", plant="P1", order="O1", occurred_at=at(40), source="mes",
        cancels_event_id="p2",
    )  # fmt: skip
    first_final = msgspec.structs.replace(
        confirm("p1", "5", final=True), occurred_at=at(20)
    )
    state.apply_batch(messages(release(), first_final, confirm("p2", "3", final=True)))
    order = state.orders["P1\x1fO1"]
    assert (order.status, order.completed_at) == ("completed", at(10))

    # p1 is still final, so the order stays completed, as of p1.
    state.apply_batch(messages(cancel, after=state.last_seq))
    assert (order.status, order.completed_at) == ("completed", at(20))

    again = msgspec.structs.replace(cancel, event_id="x2", cancels_event_id="p1")
    state.apply_batch(messages(again, after=state.last_seq))
    assert (order.status, order.completed_at) == ("in_progress", None)


def cancellation(
    event_id: str, cancels: str, order: str = "O1"
) -> ev.ProductionCancelled:
    return ev.ProductionCancelled(
        event_id=event_id, plant="P1", order=order, occurred_at=at(40), source="mes",
        cancels_event_id=cancels,
    )  # fmt: skip


def reversal(event_id: str, reverses: str, order: str = "O1") -> ev.ConsumptionReversed:
    return ev.ConsumptionReversed(
        event_id=event_id, plant="P1", order=order, occurred_at=at(40), source="mes",
        reverses_event_id=reverses,
    )  # fmt: skip


def test_second_reversal_dead_lettered(apply: Apply) -> None:
    result = apply(
        messages(
            release(),
            confirm("p1", "5"),
            consume("c1", "2"),
            cancellation("x1", "p1"),
            cancellation("x2", "p1"),
            reversal("r1", "c1"),
            reversal("r2", "c1"),
        )
    )
    letters = {d.event_id: d for d in result.dead_letters}
    assert set(letters) == {"r2", "x2"}
    assert letters["x2"].reason == "unmatched"
    assert "names event p1, which event x1 took back already" in letters["x2"].detail
    assert letters["r2"].reason == "unmatched"
    assert "names event c1, which event r1 took back already" in letters["r2"].detail
    assert result.counts["applied"] == 5
    posted = [p.movement for p in result.postings]
    assert posted.count("102") == 1
    assert posted.count("262") == 1


def test_second_reversal_not_applied_in_ledger() -> None:
    state = PartitionState(0)
    batch: list[ev.PlantEvent] = [release(), confirm("p1", "5")]
    batch += [cancellation("x1", "p1"), cancellation("x2", "p1")]
    state.apply_batch(messages(*batch))
    rows = state.take_snapshot()["events"].to_pylist()
    ledger = {row["event_id"]: row for row in rows}
    assert ledger["x1"]["status"] == "applied"
    assert ledger["x1"]["refers_to"] == "p1"
    assert ledger["x2"]["status"] == "dead_letter"
    assert ledger["x2"]["reason"] == "unmatched"
    assert ledger["x2"]["refers_to"] is None


def test_reversal_of_wrong_kind_rejected(apply: Apply) -> None:
    result = apply(
        messages(
            release(),
            confirm("p1", "5"),
            consume("c1", "2"),
            reversal("r1", "p1"),
            cancellation("x1", "c1"),
            cancellation("x2", "O1-rel"),
        )
    )
    assert result.counts.get("parked") is None
    letters = {d.event_id: d for d in result.dead_letters}
    assert set(letters) == {"r1", "x1", "x2"}
    assert {d.reason for d in letters.values()} == {"unmatched"}

    assert (
        "consumption_reversed r1 of order O1 names event p1, which is a "
        "production_confirmed event of order O1" in letters["r1"].detail
    )
    assert "send a production_cancelled with order O1" in letters["r1"].detail

    assert (
        "production_cancelled x1 of order O1 names event c1, which is a "
        "material_consumed event of order O1" in letters["x1"].detail
    )
    assert "send a consumption_reversed with order O1" in letters["x1"].detail

    assert "neither production_confirmed nor material_consumed" in (
        letters["x2"].detail
    )
    # The same id resolves the letter once the corrected event applies.
    assert (
        "send the production_cancelled again under event id x2, naming a "
        "production_confirmed event of order O1" in letters["x2"].detail
    )

    posted = [p.movement for p in result.postings]
    assert "102" not in posted
    assert "262" not in posted


def test_reversal_of_other_order_rejected(apply: Apply) -> None:
    result = apply(
        messages(
            release("O1"),
            release("O2"),
            consume("c2", "2", order="O2"),
            reversal("r1", "c2", order="O1"),
        )
    )
    assert result.counts.get("parked") is None
    [letter] = result.dead_letters
    assert letter.reason == "unmatched"
    assert letter.event_id == "r1"
    assert (
        "consumption_reversed r1 of order O1 names event c2, which is a "
        "material_consumed event of order O2" in letter.detail
    )
    assert "send a consumption_reversed with order O2" in letter.detail
    assert [p.movement for p in result.postings] == ["261"]


def test_reversal_parked_until_named_event_arrives() -> None:
    # Before c2 arrives the partition cannot tell whose it is, so r1 waits for it,
    # and is rejected as soon as c2 turns out to belong to another order.
    state = PartitionState(0)
    early = state.apply_batch(
        messages(release("O1"), release("O2"), reversal("r1", "c2", order="O1"))
    )
    assert early.counts["parked"] == 1
    assert early.dead_letters == []
    consumption = consume("c2", "2", order="O2")
    subject = event_subject("P1", "material_consumed")
    late = state.apply_batch([SourceMessage(4, subject, encode(consumption))])
    assert [(d.event_id, d.reason) for d in late.dead_letters] == [("r1", "unmatched")]
    assert state.parked == {}


def test_expired_reversal_names_wrong_order() -> None:
    # c2 belongs to an order of another partition, so this one never receives it.
    state = PartitionState(0, StateSettings(park_timeout_s=0))
    state.apply_batch(messages(release("O1"), reversal("r1", "c2", order="O1")))
    state._last_expiry_scan = 0.0  # the next batch scans for expired events
    [letter] = state.apply_batch([]).dead_letters
    assert letter.reason == "parked_expired"
    assert "If c2 was applied to another order" in letter.detail
    assert "names the wrong order (O1)" in letter.detail


def test_expired_consumption_gets_no_reversal_hint() -> None:
    state = PartitionState(0, StateSettings(park_timeout_s=0))
    state.apply_batch(messages(consume("c1", "2", order="O9")))
    state._last_expiry_scan = 0.0
    [letter] = state.apply_batch([]).dead_letters
    assert letter.reason == "parked_expired"
    assert "wrong order" not in letter.detail


def test_second_parked_reversal_listed_as_rejected() -> None:
    state = PartitionState(0)
    early = state.apply_batch(
        messages(release("O1"), reversal("r1", "c1"), reversal("r2", "c1"))
    )
    assert early.counts["parked"] == 2
    subject = event_subject("P1", "material_consumed")
    late = state.apply_batch([SourceMessage(4, subject, encode(consume("c1", "2")))])

    assert [(d.event_id, d.reason) for d in late.dead_letters] == [("r2", "unmatched")]
    rows = state.take_snapshot()["parked_events"].to_pylist()
    assert {row["event_id"]: row["status"] for row in rows} == {
        "r1": "applied",
        "r2": "dead_letter",
    }


def test_hold_moves_stock_to_blocked_and_back(apply: Apply) -> None:
    result = apply(
        messages(
            release(),
            confirm("p1", "5"),
            hold("h1", "H"),
            confirm("p2", "2"),
            unhold("u1", "H"),
        )
    )
    by_type = {(m.movement_type, m.stock_type): m.quantity for m in movements(result)}
    assert by_type[("344", "blocked")] == Decimal(5)
    assert by_type[("101", "blocked")] == Decimal(2)
    assert by_type[("343", "unrestricted")] == Decimal(7)


def test_failed_inspection_blocks_lot(apply: Apply) -> None:
    inspection = ev.InspectionRecorded(
        event_id="i1", plant="P1", order="O1", occurred_at=at(15), source="qm",
        result="fail", lot="L1",
    )  # fmt: skip
    result = apply(
        messages(
            release(),
            confirm("p1", "5", lot="L1"),
            confirm("p2", "4", lot="L2"),
            inspection,
        )
    )
    transfers = [m for m in movements(result) if m.movement_type == "344"]
    assert len(transfers) == 1
    assert transfers[0].batch == "L1"
    assert transfers[0].quantity == Decimal(5)


def test_bad_message_dead_lettered(apply: Apply) -> None:
    naive = encode(consume("c9", "1")).replace(b"+01:00", b"")
    result = apply(messages(release(), b"{not json", naive, consume("c1", "1")))
    reasons = sorted(d.reason for d in result.dead_letters)
    assert reasons == ["invalid", "malformed"]
    invalid = next(d for d in result.dead_letters if d.reason == "invalid")
    assert invalid.event_id == "c9"
    assert invalid.data == naive
    assert "timezone" in invalid.detail
    assert "timestamps need a UTC offset" in invalid.detail
    malformed = next(d for d in result.dead_letters if d.reason == "malformed")
    assert "the body is not valid JSON" in malformed.detail
    assert result.counts["applied"] == 2


def test_zero_consumption_posts_nothing() -> None:
    # ERPs reject a goods movement without a quantity, and "-0" decodes to zero too.
    state = PartitionState(0)
    reversal = ev.ConsumptionReversed(
        event_id="r1", plant="P1", order="O1", occurred_at=at(6), source="mes",
        reverses_event_id="c0",
    )  # fmt: skip
    result = state.apply_batch(
        messages(release(), consume("c0", "-0"), reversal, consume("c1", "2"))
    )
    assert result.dead_letters == []
    assert result.counts["applied"] == 4
    assert [(m.movement_type, m.quantity) for m in movements(result)] == [
        ("261", Decimal(2))
    ]


def test_consumption_that_converts_to_nothing_dead_lettered() -> None:
    state = PartitionState(0)
    tiny = msgspec.structs.replace(consume("c1", "1"), quantity=qty("0.000000001", "G"))
    result = state.apply_batch(messages(release(), tiny, consume("c2", "2")))
    (letter,) = result.dead_letters
    assert letter.reason == "invalid"
    assert "0.000000001 G is 0.000000000001 KG, which rounds to 0" in letter.detail
    assert [(m.movement_type, m.quantity) for m in movements(result)] == [
        ("261", Decimal(2))
    ]


def test_future_timestamp_rejected(apply: Apply) -> None:
    future = msgspec.structs.replace(
        consume("c1", "1"), occurred_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    )
    result = apply(messages(release(), future))
    assert [d.reason for d in result.dead_letters] == ["future_time"]


def test_machine_intervals_and_early_end() -> None:
    state = PartitionState(0)
    ended = ev.DowntimeEnded(
        event_id="d1-end", plant="P1", occurred_at=at(30), source="pm", machine="M1",
        downtime_id="D1",
    )  # fmt: skip
    started = ev.DowntimeStarted(
        event_id="d1", plant="P1", occurred_at=at(10), source="pm", machine="M1",
        downtime_id="D1", reason="jam",
    )  # fmt: skip
    result = state.apply_batch(messages(ended, started))
    assert result.counts["parked"] == 1
    rows = state.take_snapshot()["machine_states"].to_pylist()
    assert len(rows) == 1
    assert rows[0]["ended_at"] == at(30)
    assert rows[0]["state"] == "down"


def test_checkpoint_round_trip() -> None:
    state = PartitionState(3)
    state.apply_batch(
        messages(release(), consume("c1", "2"), confirm("p1", "5"), hold("h", "H"))
    )
    restored = PartitionState.restore(state.checkpoint())
    assert restored.checkpoint() == state.checkpoint()
    resent = SourceMessage(
        10, "plant.events.P1.material_consumed", encode(consume("c1", "2"))
    )
    again = restored.apply_batch([resent])
    assert again.counts["duplicates"] == 1
    assert again.postings == []


def test_redelivery_not_a_duplicate() -> None:
    """A message delivered again keeps the ledger row of its first delivery."""
    state = PartitionState(0)
    batch = messages(release(), consume("c1", "2"))
    state.apply_batch(batch)
    again = state.apply_batch(batch[1:])
    assert again.counts == {"events_in": 1, "redelivered": 1}
    ledger = state.take_snapshot()["events"].to_pylist()
    statuses = {(row["stream_seq"], row["status"]) for row in ledger}
    assert statuses == {(1, "applied"), (2, "applied")}


def test_snapshot_rows_match_schema() -> None:
    state = PartitionState(0)
    state.apply_batch(messages(release(), consume("c1", "2.5"), confirm("p1", "5")))
    tables = state.take_snapshot()
    orders = tables["orders"].to_pylist()
    assert orders[0]["good_quantity"] == Decimal(5)
    assert orders[0]["status"] == "in_progress"
    components = tables["order_components"].to_pylist()
    assert components[0]["standard_quantity"] == Decimal(75)
    assert components[0]["actual_quantity"] == Decimal("2.5")
    postings = tables["postings"].to_pylist()
    assert {p["posting_type"] for p in postings} == {
        "goods_movement",
        "order_confirmation",
    }
    assert state.take_snapshot() == {}


def test_confirmation_posting_fields() -> None:
    state = PartitionState(0)
    result = state.apply_batch(messages(release(), confirm("p1", "5", final=True)))
    confirmation = next(
        p for p in map(decode_posting, (x.data for x in result.postings))
        if isinstance(p, OrderConfirmation)
    )  # fmt: skip
    assert confirmation.work_center == "M1"
    assert confirmation.final is True
    assert state.orders["P1\x1fO1"].status == "completed"


def test_plant_wide_lot_hold() -> None:
    state = PartitionState(0)
    lot_hold = ev.QualityHoldApplied(
        event_id="h1", plant="P1", occurred_at=at(20), source="qm", hold_id="LH",
        scope="lot", lot="L1",
    )  # fmt: skip
    lot_release = ev.QualityHoldReleased(
        event_id="u1", plant="P1", occurred_at=at(30), source="qm", hold_id="LH"
    )
    first = state.apply_batch(
        messages(
            release("O1"),
            confirm("p1", "5", lot="L1"),
            lot_hold,
            release("O2"),
            confirm("p2", "3", order="O2", lot="L1"),
            confirm("p3", "4", order="O2", lot="L2"),
        )
    )
    by_key = {
        (m.order, m.movement_type, m.batch, m.stock_type) for m in movements(first)
    }
    assert ("O1", "344", "L1", "blocked") in by_key
    assert ("O2", "101", "L1", "blocked") in by_key
    assert ("O2", "101", "L2", "unrestricted") in by_key
    second = state.apply_batch(messages(lot_release, after=state.last_seq))
    returned = sorted((m.order, m.quantity) for m in movements(second))
    assert returned == [("O1", Decimal(5)), ("O2", Decimal(3))]
    holds = state.take_snapshot()["holds"].to_pylist()
    assert [(h["hold_id"], h["order_id"]) for h in holds] == [("LH", None)]


def test_plant_wide_hold_copy_not_counted() -> None:
    state = PartitionState(1)
    lot_hold = ev.QualityHoldApplied(
        event_id="h1", plant="P1", occurred_at=at(20), source="qm", hold_id="LH",
        scope="lot", lot="L1",
    )  # fmt: skip
    copy = SourceMessage(
        7, "plant.events.P1.quality_hold_applied", encode(lot_hold), False
    )
    result = state.apply_batch([copy])
    assert result.counts.get("events_in") is None
    assert "P1\x1fLH" in state.plant_holds


def test_unexpected_error_dead_lettered(monkeypatch: pytest.MonkeyPatch) -> None:
    state = PartitionState(0)

    def broken(*args: object) -> None:
        raise KeyError("boom")

    monkeypatch.setattr("actors.partition_state.apply_order_event", broken)
    result = state.apply_batch(
        messages(release(), consume("c1", "1"), consume("c2", "1"))
    )
    reasons = [d.reason for d in result.dead_letters]
    assert reasons == ["internal_error", "internal_error"]
    assert "KeyError" in result.dead_letters[0].detail
    assert result.dead_letters[1].event_id == "c2"


# -- bounded memory: the id table and evicted orders ----------------------------------

DAY_MIN = 24 * 60


def shipment(event_id: str, quantity: str = "4") -> ev.ShipmentConfirmed:
    return ev.ShipmentConfirmed(
        event_id=event_id, plant="P1", occurred_at=at(1), source="wms",
        delivery="D1", material="FG-1", quantity=qty(quantity),
    )  # fmt: skip


def completed_and_aged(state: PartitionState, order: str = "O1", days: int = 8) -> None:
    """Complete `order`, then move the plant's watermark `days` later."""
    state.apply_batch(
        messages(
            release(order),
            confirm(f"{order}-p1", "5", order=order, final=True),
            release(f"{order}-later", minutes=days * DAY_MIN),
            after=state.last_seq,
        )
    )
    state.take_snapshot()


def test_id_table_matches_ordered_dict() -> None:
    rng = random.Random(5)
    for capacity in (1, 3, 17, 64):
        table = IdTable(capacity)
        expected: OrderedDict[int, int] = OrderedDict()
        keys = [rng.getrandbits(64) or 1 for _ in range(3 * capacity)]
        for _ in range(40 * capacity):
            key = rng.choice(keys)
            if rng.random() < 0.7:
                value = rng.getrandbits(32)
                expected[key] = value
                table.put(key, value)
            else:
                assert table.pop(key) == expected.pop(key, None)
            kept = dict(table.items())
            for forgotten in [k for k in expected if k not in kept]:
                del expected[forgotten]
            assert list(kept.items()) == list(expected.items())
            assert len(table) <= capacity
        restored = IdTable.from_data(table.to_data(), capacity)
        assert list(restored.items()) == list(table.items())


def test_id_table_get_or_put_matches_dict() -> None:
    rng = random.Random(11)
    for capacity in (1, 5, 40):
        table = IdTable(capacity)
        expected: OrderedDict[int, int] = OrderedDict()
        keys = [rng.getrandbits(64) or 1 for _ in range(2 * capacity)]
        for _ in range(30 * capacity):
            key, value = rng.choice(keys), rng.getrandbits(32)
            assert table.get_or_put(key, value) == expected.get(key)
            expected.setdefault(key, value)
            stored = dict(table.items())
            for forgotten in [k for k in expected if k not in stored]:
                del expected[forgotten]
            assert list(stored.items()) == list(expected.items())


def test_id_table_changes_rebuild_every_entry() -> None:
    """A base and the changes after it rebuild every entry with its value. The rebuilt
    table may keep some entries the original dropped, never fewer."""
    rng = random.Random(23)
    for capacity in (1, 4, 33):
        table = IdTable(capacity)
        keys = [rng.getrandbits(64) or 1 for _ in range(4 * capacity)]
        base = table.to_data()
        steps: list[IdTableChanges] = []
        for _ in range(30):
            for _ in range(rng.randrange(2 * capacity)):
                key = rng.choice(keys)
                if rng.random() < 0.8:
                    table.get_or_put(key, rng.getrandbits(30))
                else:
                    table.pop(key)
            changes = table.take_changes()
            if changes is None:
                base = table.to_data()
                steps = []
            else:
                steps.append(changes)
            rebuilt = IdTable.from_data(base, capacity)
            for changes in steps:
                rebuilt.apply_changes(changes)
            rebuilt_items = dict(rebuilt.items())
            for key, value in table.items():
                assert rebuilt_items.get(key) == value
            assert len(rebuilt) <= capacity


def test_id_table_changes_exact_until_full() -> None:
    table = IdTable(10)
    for key in (1, 2, 3):
        table.put(key, key * 10)
    base = table.to_data()
    table.mark()
    for key in (4, 5, 6, 7):
        table.get_or_put(key, key * 10)
    first = table.take_changes()
    table.pop(5)
    table.put(8, 80)
    second = table.take_changes()
    assert first is not None
    assert second is not None
    assert second.pops == [(0, 5)]
    rebuilt = IdTable.from_data(base, 10)
    rebuilt.apply_changes(first)
    rebuilt.apply_changes(second)
    assert list(rebuilt.items()) == list(table.items())


def test_id_table_changes_none_when_not_replayable() -> None:
    table = IdTable(3)
    table.mark()
    for key in (1, 2, 3, 4):
        table.put(key, 0)
    # Four entries went through a ring of three positions.
    assert table.take_changes() is None
    assert table.take_changes() == IdTableChanges()
    table.put(4, 9)
    # A changed value of a present key is not among the changes.
    assert table.take_changes() is None


def test_packed_id_found_only_at_entry_start() -> None:
    first = 0x1111_1111_2222_2222
    packed = add_packed_id(b"", first, 0x3333_3333)
    # Bytes 4 to 11 of the first entry read as a key that was never added.
    straddling = int.from_bytes(packed[4:12], "little")
    assert find_packed_id(packed, straddling) is None
    packed = add_packed_id(packed, straddling, 7)
    assert find_packed_id(packed, straddling) == 7
    assert find_packed_id(packed, first) == 0x3333_3333


def test_order_ids_outlive_restored_full_table() -> None:
    state = PartitionState(0, StateSettings(dedup_max_ids=2))
    first = confirm("c1", "5")
    state.apply_batch(
        messages(release(), first, consume("i1", "1"), consume("i2", "1"))
    )
    # A larger table after the restart: nothing is dropped from now on, yet the ids
    # it lost before the checkpoint are gone.
    restored = PartitionState.restore(
        state.checkpoint(), StateSettings(dedup_max_ids=10)
    )
    again = SourceMessage(9, "plant.events.P1.production_confirmed", encode(first))
    changed = SourceMessage(
        10, "plant.events.P1.production_confirmed", encode(confirm("c1", "6"))
    )
    result = restored.apply_batch([again, changed])
    assert result.counts["duplicates"] == 1
    assert [d.reason for d in result.dead_letters] == ["reused_id"]


def test_id_table_dedup_after_restore() -> None:
    state = PartitionState(0)
    state.apply_batch(messages(shipment("s1")))
    restored = PartitionState.restore(state.checkpoint())
    again = SourceMessage(
        5, "plant.events.P1.shipment_confirmed", encode(shipment("s1"))
    )
    reused = SourceMessage(
        6, "plant.events.P1.shipment_confirmed", encode(shipment("s1", "9"))
    )
    result = restored.apply_batch([again, reused])
    assert result.counts["duplicates"] == 1
    assert [d.reason for d in result.dead_letters] == ["reused_id"]
    assert "event id s1 was seen before" in result.dead_letters[0].detail


def test_id_table_bounded() -> None:
    state = PartitionState(0, StateSettings(dedup_max_ids=3))
    state.apply_batch(messages(*(shipment(f"s{n}") for n in range(5))))
    assert len(state.seen) == 3
    assert state.counts["ids_forgotten"] == 2
    restored = PartitionState.restore(
        state.checkpoint(), StateSettings(dedup_max_ids=2)
    )
    assert len(restored.seen) == 2


def numbered(first_seq: int, *events: ev.PlantEvent) -> list[SourceMessage]:
    """Messages from stream sequence `first_seq` on, for a batch after another."""
    return [
        SourceMessage(first_seq + offset, message.subject, message.data)
        for offset, message in enumerate(messages(*events))
    ]


def test_parts_rebuild_base_and_deltas() -> None:
    state = PartitionState(0)
    orders_parts: list[bytes] = []

    def save(*, base: bool) -> bytes:
        state.take_snapshot()
        state_part, orders_part = state.checkpoint_parts(base=base)
        orders_parts.append(orders_part)
        return state_part

    state.apply_batch(numbered(1, release("O1"), release("O2"), consume("c1", "2")))
    save(base=True)
    state.apply_batch(numbered(10, confirm("p1", "5"), release("O3")))
    save(base=False)
    state.apply_batch(
        numbered(
            20,
            confirm("p2", "95", final=True),
            consume("c2", "3", order="O2"),
            release("O4", minutes=8 * DAY_MIN),
        )
    )
    state.take_snapshot()
    assert state.evict_closed_orders() == 1
    last = save(base=False)

    delta = msgspec.msgpack.decode(orders_parts[1], type=OrdersCheckpoint)
    assert not delta.base
    assert sorted(delta.orders) == ["P1\x1fO1", "P1\x1fO3"]
    evicting = msgspec.msgpack.decode(orders_parts[2], type=OrdersCheckpoint)
    assert evicting.dropped == ["P1\x1fO1"]
    assert evicting.closed is None
    assert list(evicting.closed_changes) == ["P1"]
    assert msgspec.msgpack.decode(last, type=Checkpoint).closed_orders == {}
    restored = PartitionState.restore(last, orders=orders_parts)
    assert sorted(restored.orders) == ["P1\x1fO2", "P1\x1fO3", "P1\x1fO4"]
    assert restored.checkpoint() == state.checkpoint()


def test_delta_carries_only_new_ids() -> None:
    state = PartitionState(0)
    state.apply_batch(numbered(1, release("O1"), release("O2")))
    _, base = state.checkpoint_parts(base=True)
    state.apply_batch(numbered(10, consume("c1", "2"), consume("c2", "1")))
    state_part, delta = state.checkpoint_parts(base=False)

    saved = msgspec.msgpack.decode(state_part, type=Checkpoint)
    assert saved.seen.keys == b""
    whole = msgspec.msgpack.decode(base, type=OrdersCheckpoint)
    assert whole.seen is not None
    assert len(whole.seen.keys) == 2 * 8
    part = msgspec.msgpack.decode(delta, type=OrdersCheckpoint)
    assert part.seen is None
    assert part.seen_changes is not None
    assert len(part.seen_changes.keys) == 2 * 8
    restored = PartitionState.restore(state_part, orders=[base, delta])
    assert list(restored.seen.items()) == list(state.seen.items())


def test_damaged_id_changes_name_their_part() -> None:
    state = PartitionState(0)
    state.apply_batch(numbered(1, release("O1")))
    _, base = state.checkpoint_parts(base=True)
    state.apply_batch(numbered(10, consume("c1", "2")))
    state_part, delta = state.checkpoint_parts(base=False)
    part = msgspec.msgpack.decode(delta, type=OrdersCheckpoint)
    assert part.seen_changes is not None
    part.seen_changes.values = part.seen_changes.values[:-4]
    damaged = msgspec.msgpack.encode(part)

    with pytest.raises(CheckpointFormatError) as caught:
        PartitionState.restore(state_part, orders=[base, damaged])
    assert caught.value.part == 2
    assert "remembered event ids cannot be rebuilt" in str(caught.value)


def test_forgotten_plant_leaves_closed_orders() -> None:
    state = PartitionState(0)
    completed_and_aged(state)
    state.take_snapshot()
    assert state.evict_closed_orders() == 1
    _, base = state.checkpoint_parts(base=True)
    state.forget_plant("P1", [])
    state_part, delta = state.checkpoint_parts(base=False)

    part = msgspec.msgpack.decode(delta, type=OrdersCheckpoint)
    assert part.closed_forgotten == ["P1"]
    restored = PartitionState.restore(state_part, orders=[base, delta])
    assert restored.closed_orders == {}


def test_chain_of_older_format_continues() -> None:
    """Parts written when the id tables were in the state part restore, and the next
    delta stores the tables whole, so that later restores have a base for them."""
    state = PartitionState(0)
    completed_and_aged(state)
    state.take_snapshot()
    assert state.evict_closed_orders() == 1
    _, base = state.checkpoint_parts(base=True)
    older_base = msgspec.msgpack.decode(base, type=OrdersCheckpoint)
    older_base.seen = None
    older_base.closed = None
    older_parts = [msgspec.msgpack.encode(older_base)]
    # The state part as that format wrote it: both id tables whole.
    older_state = state._encode_state({})

    restored = PartitionState.restore(older_state, orders=older_parts)
    assert list(restored.seen.items()) == list(state.seen.items())
    restored.apply_batch(numbered(10, release("O7")))
    state_part, delta = restored.checkpoint_parts(base=False)
    part = msgspec.msgpack.decode(delta, type=OrdersCheckpoint)
    assert part.seen is not None
    assert part.closed is not None
    again = PartitionState.restore(state_part, orders=[*older_parts, delta])
    assert again.checkpoint() == restored.checkpoint()


def test_delta_after_restore_skips_unchanged() -> None:
    state = PartitionState(0)
    state.apply_batch(numbered(1, release("O1"), release("O2")))
    state.take_snapshot()
    state_part, base = state.checkpoint_parts(base=True)
    restored = PartitionState.restore(state_part, orders=[base])
    restored.apply_batch(numbered(10, consume("c1", "2")))
    # Both orders' rows are written again, but only the changed one is a delta.
    rows = restored.take_snapshot()["orders"].to_pylist()
    assert sorted(row["order_id"] for row in rows) == ["O1", "O2"]
    _, delta = restored.checkpoint_parts(base=False)
    assert list(msgspec.msgpack.decode(delta, type=OrdersCheckpoint).orders) == [
        "P1\x1fO1"
    ]


def test_restore_rewrites_clock_rows() -> None:
    # DuckDB may contain a later watermark than the checkpoint, written just before a
    # crash: the restored state writes its own again before any new event.
    state = PartitionState(0)
    state.apply_batch(numbered(1, release("O1"), consume("c1", "2")))
    state.take_snapshot()
    state_part, base = state.checkpoint_parts(base=True)

    snapshot = PartitionState.restore(state_part, orders=[base]).take_snapshot()

    clocks = snapshot["plant_clocks"].to_pylist()
    assert [(row["plant"], row["events"]) for row in clocks] == [("P1", 2)]
    assert snapshot["plant_calendars"].column("plant").to_pylist() == ["P1"]


def test_misplaced_orders_part_rejected() -> None:
    state = PartitionState(0)
    state.apply_batch(numbered(1, release("O1")))
    _, base = state.checkpoint_parts(base=True)
    state.apply_batch(numbered(10, consume("c1", "2")))
    _, first = state.checkpoint_parts(base=False)
    state.apply_batch(numbered(20, consume("c2", "3")))
    state_part, second = state.checkpoint_parts(base=False)
    with pytest.raises(CheckpointFormatError, match="not in the order"):
        PartitionState.restore(state_part, orders=[base, second, first])
    with pytest.raises(
        CheckpointFormatError, match="sequence 10, not at the state's 20"
    ):
        PartitionState.restore(state_part, orders=[base, first])
    other = PartitionState(1)
    other.apply_batch(numbered(1, release("O9")))
    _, foreign = other.checkpoint_parts(base=True)
    with pytest.raises(CheckpointFormatError, match="not all of partition 0"):
        PartitionState.restore(state_part, orders=[foreign, first, second])


def test_checkpoint_parts_need_a_base_first() -> None:
    state = PartitionState(0)
    state.apply_batch(messages(release("O1")))
    state_part, delta = state.checkpoint_parts(base=False)
    with pytest.raises(CheckpointFormatError, match="every order"):
        PartitionState.restore(state_part, orders=[delta])


def test_completed_order_evicted() -> None:
    state = PartitionState(0)
    completed_and_aged(state)
    assert state.evict_closed_orders() == 1
    assert "P1\x1fO1" not in state.orders
    assert state.stats()["orders_evicted"] == 1
    assert state.stats()["closed_orders"] == 1


def test_evicted_order_event_dead_lettered() -> None:
    state = PartitionState(0)
    completed_and_aged(state)
    state.evict_closed_orders()
    restored = PartitionState.restore(state.checkpoint())
    late = SourceMessage(
        10, "plant.events.P1.production_confirmed", encode(confirm("O1-p2", "1"))
    )
    result = restored.apply_batch([late])
    assert [d.reason for d in result.dead_letters] == ["order_closed"]
    detail = result.dead_letters[0].detail
    assert "order O1 of plant P1 completed at 2026-03-02T07:10:00+00:00" in detail
    assert "PLANTSTREAM_CLOSED_ORDER_RETENTION_S" in detail
    assert result.postings == []


def test_evicted_order_release_dead_lettered() -> None:
    state = PartitionState(0)
    completed_and_aged(state)
    state.evict_closed_orders()
    again = msgspec.structs.replace(release(), event_id="O1-rel-2")
    result = state.apply_batch([SourceMessage(10, "plant.events.P1.x", encode(again))])
    assert [d.reason for d in result.dead_letters] == ["order_closed"]


def test_evicted_order_id_still_duplicate() -> None:
    state = PartitionState(0)
    completed_and_aged(state)
    state.evict_closed_orders()
    resent = SourceMessage(
        10,
        "plant.events.P1.production_confirmed",
        encode(confirm("O1-p1", "5", final=True)),
    )
    result = state.apply_batch([resent])
    assert result.counts["duplicates"] == 1
    assert result.dead_letters == []


def test_order_within_retention_kept() -> None:
    state = PartitionState(0)
    completed_and_aged(state, days=6)
    assert state.evict_closed_orders() == 0
    assert "P1\x1fO1" in state.orders


def test_open_order_kept() -> None:
    state = PartitionState(0)
    state.apply_batch(
        messages(release(), confirm("p1", "5"), release("O2", minutes=30 * DAY_MIN))
    )
    state.take_snapshot()
    assert state.evict_closed_orders() == 0


def test_order_with_blocked_stock_kept() -> None:
    state = PartitionState(0)
    state.apply_batch(
        messages(
            release(),
            confirm("p1", "5", final=True),
            hold("h1", "H"),
            release("O2", minutes=30 * DAY_MIN),
        )
    )
    state.take_snapshot()
    assert state.orders["P1\x1fO1"].blocked_quantity() == Decimal(5)
    assert state.evict_closed_orders() == 0


def test_unsaved_order_evicted_with_rows() -> None:
    state = PartitionState(0)
    state.apply_batch(
        messages(
            release(),
            confirm("p1", "5", final=True),
            release("O2", minutes=30 * DAY_MIN),
        )
    )
    assert state.evict_closed_orders() == 1
    rows = state.take_snapshot()["orders"].to_pylist()
    assert [(row["order_id"], row["status"]) for row in rows] == [
        ("O1", "completed"),
        ("O2", "released"),
    ]


def at_seq(seq: int, event: ev.PlantEvent) -> SourceMessage:
    subject = event_subject(event.plant, str(event.__struct_config__.tag))
    return SourceMessage(seq, subject, encode(event))


def test_eviction_waits_for_next_block() -> None:
    # The order is past its retention from seq 3 on, but the scan runs only before
    # the first message of the next block of ten stream sequences.
    state = PartitionState(0, StateSettings(eviction_interval_seqs=10))
    completed_and_aged(state)

    inside = state.apply_batch([at_seq(9, confirm("O1-p2", "1"))])
    crossing = state.apply_batch([at_seq(10, confirm("O1-p3", "1"))])

    assert inside.dead_letters == []
    assert "orders_evicted" not in inside.counts
    assert [letter.reason for letter in crossing.dead_letters] == ["order_closed"]
    assert crossing.counts["orders_evicted"] == 1


def test_restored_state_evicts_at_same_messages() -> None:
    # A crash after seq 3 and a restore must not change which late events are
    # applied: their postings may already be with the ERP.
    settings = StateSettings(eviction_interval_seqs=10)
    events = [
        at_seq(1, release()),
        at_seq(2, confirm("O1-p1", "5", final=True)),
        at_seq(3, release("O1-later", minutes=8 * DAY_MIN)),
        at_seq(8, confirm("O1-p2", "1")),
        at_seq(12, confirm("O1-p3", "1")),
    ]
    whole = PartitionState(0, settings)
    unbroken = whole.apply_batch(events)
    first = PartitionState(0, settings)
    before = first.apply_batch(events[:3])
    state_part, orders = first.checkpoint_parts(base=True)
    restored = PartitionState.restore(state_part, settings, [orders])
    after = restored.apply_batch(events[3:])

    def keys(*results: BatchResult) -> list[str | None]:
        return [p.key for r in results for p in r.postings]

    def reasons(*results: BatchResult) -> list[tuple[str, int]]:
        return [(d.reason, d.stream_seq) for r in results for d in r.dead_letters]

    assert keys(before, after) == keys(unbroken)
    assert reasons(before, after) == reasons(unbroken) == [("order_closed", 12)]
    rows = restored.take_snapshot()["orders"].to_pylist()
    assert sorted(row["order_id"] for row in rows) == ["O1", "O1-later"]


def test_closed_orders_bounded() -> None:
    state = PartitionState(0, StateSettings(closed_order_max_keys=2))
    for n in range(4):
        completed_and_aged(state, order=f"O{n}", days=8 + n)
        state.evict_closed_orders()
    assert state.counts["orders_evicted"] == 4
    assert len(state.closed_orders["P1"]) == 2
    restored = PartitionState.restore(state.checkpoint())
    assert len(restored.closed_orders["P1"]) == 2


def test_forget_plant_drops_closed_orders() -> None:
    state = PartitionState(0)
    completed_and_aged(state)
    state.evict_closed_orders()
    state.forget_plant("P1", ["O1-rel", "O1-p1"])
    result = state.apply_batch(messages(release(), confirm("O1-p1", "5", final=True)))
    assert result.dead_letters == []
    assert result.counts["applied"] == 2


def test_snapshot_keeps_last_row_across_chunks() -> None:
    # One chunk per batch: the consumption's ledger row "parked" lands in the first
    # chunk and its row "applied" in the second, with the same key.
    state = PartitionState(0)
    state.chunk_rows = 1
    parked, released = messages(consume("c1", "5"), release())
    state.apply_batch([parked])
    state.apply_batch([released])
    events = state.take_snapshot()["events"].to_pylist()
    statuses = {(row["event_id"], row["status"]) for row in events}
    assert statuses == {("c1", "applied"), ("O1-rel", "applied")}
    assert len(events) == 2


def test_same_ids_in_two_plants_both_applied() -> None:
    # Each plant's MES numbers its events on its own, so ids repeat across plants.
    first: list[ev.PlantEvent] = [release("O1"), consume("c1", "2")]
    second = [msgspec.structs.replace(event, plant="P2") for event in first]
    result = PartitionState(0).apply_batch(messages(*first, *second))
    assert result.dead_letters == []
    assert result.counts["applied"] == 4
    assert [p.movement for p in result.postings] == ["261", "261"]


def test_same_id_in_one_plant_still_reused() -> None:
    state = PartitionState(0)
    result = state.apply_batch(messages(release("O1"), consume("c1", "2")))
    assert result.dead_letters == []
    subject = event_subject("P1", "material_consumed")
    reused = SourceMessage(3, subject, encode(consume("c1", "3")))
    result = state.apply_batch([reused])
    assert [letter.reason for letter in result.dead_letters] == ["reused_id"]


def test_checkpoint_with_ids_keyed_by_id_alone_rejected() -> None:
    state = PartitionState(3)
    state.apply_batch(messages(release("O1")))
    saved = msgspec.msgpack.decode(state.checkpoint(), type=Checkpoint)
    saved.ids_keyed_by_plant = False
    with pytest.raises(CheckpointFormatError, match="without their plant") as raised:
        PartitionState.restore(msgspec.msgpack.encode(saved))
    assert "partition 3" in str(raised.value)
    assert "Delete the object store bucket" in str(raised.value)


def test_rejected_event_corrected_under_same_id() -> None:
    # A plant fixes the unit and sends the event again under its id.
    state = PartitionState(0)
    wrong = msgspec.structs.replace(consume("c1", "2"), quantity=qty("2", "kg"))
    result = state.apply_batch(messages(release("O1"), wrong))
    assert [letter.reason for letter in result.dead_letters] == ["invalid"]
    subject = event_subject("P1", "material_consumed")
    fixed = SourceMessage(3, subject, encode(consume("c1", "2")))
    result = state.apply_batch([fixed])
    assert result.dead_letters == []
    assert [p.movement for p in result.postings] == ["261"]


def test_rejected_event_retried_is_judged_again() -> None:
    # A retry of the same bytes is rejected again, not dropped as a duplicate.
    state = PartitionState(0)
    wrong = msgspec.structs.replace(consume("c1", "2"), quantity=qty("2", "kg"))
    state.apply_batch(messages(release("O1"), wrong))
    subject = event_subject("P1", "material_consumed")
    retried = SourceMessage(3, subject, encode(wrong))
    result = state.apply_batch([retried])
    assert [letter.reason for letter in result.dead_letters] == ["invalid"]
    assert result.counts.get("duplicates") is None


def test_rejected_redelivery_one_dead_letter() -> None:
    # Applying dropped the rejected event's id, so only its stream position
    # distinguishes a redelivery of it from a corrected event sent again.
    state = PartitionState(0)
    wrong = msgspec.structs.replace(consume("c1", "2"), quantity=qty("2", "kg"))
    batch = messages(release("O1"), wrong)
    first = state.apply_batch(batch)
    assert [letter.reason for letter in first.dead_letters] == ["invalid"]
    again = state.apply_batch(batch[1:])
    assert again.dead_letters == []
    assert again.counts == {"events_in": 1, "redelivered": 1}


def test_malformed_redelivery_one_dead_letter() -> None:
    state = PartitionState(0)
    subject = event_subject("P1", "material_consumed")
    broken = SourceMessage(1, subject, b'{"event_id": "c1", ')
    assert len(state.apply_batch([broken]).dead_letters) == 1
    again = state.apply_batch([broken])
    assert again.dead_letters == []
    assert again.counts == {"events_in": 1, "redelivered": 1}


def test_redelivery_of_dropped_id_ignored() -> None:
    # A shipment belongs to no order, so the id table alone held its id.
    state = PartitionState(0, StateSettings(dedup_max_ids=2))
    batch = messages(shipment("s1"), shipment("s2"), shipment("s3"))
    state.apply_batch(batch)
    assert state.counts["ids_forgotten"] == 1
    again = state.apply_batch(batch[:1])
    assert again.counts == {"events_in": 1, "redelivered": 1}


def test_corrected_event_resolves_all_letters() -> None:
    state = PartitionState(0)
    wrong = msgspec.structs.replace(consume("c1", "2"), quantity=qty("2", "kg"))
    state.apply_batch(messages(release("O1"), wrong))
    retried = state.apply_batch(messages(wrong, after=state.last_seq))
    assert [letter.reason for letter in retried.dead_letters] == ["invalid"]
    # A checkpoint in between must keep the letters of the rejected id.
    restored = PartitionState.restore(state.checkpoint())
    fixed = restored.apply_batch(messages(consume("c1", "2"), after=state.last_seq))
    subject = event_subject("P1", "material_consumed")
    assert [r.letter_id for r in fixed.resolved] == [
        f"{subject}:2:invalid",
        f"{subject}:3:invalid",
    ]
    assert {(r.event_id, r.stream_seq) for r in fixed.resolved} == {("c1", 4)}
    assert fixed.counts["dead_letters_resolved"] == 2
    assert restored.rejected == {}


def test_expired_event_resolved_when_applied() -> None:
    state = PartitionState(0, StateSettings(park_timeout_s=0))
    state.apply_batch(messages(consume("c1", "2", order="O9")))
    state._last_expiry_scan = 0.0
    [letter] = state.apply_batch([]).dead_letters
    resent = messages(release("O9"), consume("c1", "2", order="O9"), after=1)
    [resolved] = state.apply_batch(resent).resolved
    assert resolved.letter_id.endswith(":1:parked_expired")
    assert resolved.stream_seq == 3


def test_rejected_ids_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("actors.partition_state.REJECTED_MAX_IDS", 2)
    state = PartitionState(0)
    wrong = [
        msgspec.structs.replace(consume(f"c{n}", "2"), quantity=qty("2", "kg"))
        for n in range(3)
    ]
    state.apply_batch(messages(release("O1"), *wrong))
    assert len(state.rejected) == 2
    fixed = state.apply_batch(
        messages(consume("c0", "2"), consume("c2", "2"), after=state.last_seq)
    )
    # c0's letter was dropped first, so only c2's is reported resolved.
    assert [r.event_id for r in fixed.resolved] == ["c2"]


def test_shares_keep_rejected_ids() -> None:
    state = PartitionState(0)
    wrong = msgspec.structs.replace(consume("c1", "2"), quantity=qty("2", "kg"))
    state.apply_batch(messages(release("O1"), wrong))
    shares = [take_share([state], p, 3, state.last_seq) for p in range(3)]
    assert all(share.rejected == state.rejected for share in shares)
