"""Values that orders repeat are shared between them, also after a checkpoint."""

from __future__ import annotations

import datetime as dt
import gc
import tracemalloc
from decimal import Decimal

import msgspec

from actors.orders import OrderState, shared_decimal
from actors.partition_state import PartitionState, SourceMessage
from contracts import events as ev
from contracts.codec import encode
from pipeline.subjects import event_subject

T0 = dt.datetime(2026, 3, 2, 8, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))


def qty(value: str, uom: str = "EA") -> ev.Quantity:
    return ev.Quantity(Decimal(value), uom)


def base(event_id: str, order: str, minutes: int = 0) -> dict[str, object]:
    return {
        "event_id": event_id,
        "plant": "P1",
        "order": order,
        "occurred_at": T0 + dt.timedelta(minutes=minutes),
        "source": "mes",
    }


def release(
    order: str, standard: str = "12.5", cycle_time: str = "4.5"
) -> ev.WorkOrderReleased:
    return ev.WorkOrderReleased(
        **base(f"{order}-rel", order),  # type: ignore[arg-type]
        material="FG-1",
        quantity=qty("250"),
        components=[
            ev.Component(material="RM-1", quantity=qty(standard, "KG")),
            ev.Component(material="RM-2", quantity=qty("3", "EA")),
        ],
        operations=[
            ev.OperationSpec(
                operation="0010",
                work_center="CNC-1",
                ideal_cycle_time_s=Decimal(cycle_time),
            ),
            ev.OperationSpec(
                operation="0020", work_center="CNC-2", ideal_cycle_time_s=Decimal(2)
            ),
        ],
        storage_location="0002",
    )


def activity(order: str) -> list[ev.PlantEvent]:
    """Every kind of order event that fills one of the order's dicts."""
    return [
        ev.MaterialConsumed(
            **base(f"{order}-c1", order, 5),  # type: ignore[arg-type]
            material="RM-1",
            quantity=qty("4.000", "KG"),
            lot="RL-7",
            storage_location="0001",
        ),
        ev.ProductionConfirmed(
            **base(f"{order}-p1", order, 10),  # type: ignore[arg-type]
            good=qty("40"),
            scrap=qty("0"),
            operation="0010",
            lot="L-1",
        ),
        ev.ProductionConfirmed(
            **base(f"{order}-p2", order, 12),  # type: ignore[arg-type]
            good=qty("20"),
            operation="0020",
            lot="L-1",
        ),
        ev.QualityHoldApplied(
            **base(f"{order}-h", order, 20),  # type: ignore[arg-type]
            hold_id="H-1",
            scope="lot",
            lot="L-1",
            reason="visual check",
        ),
    ]


def messages(*events: ev.PlantEvent) -> list[SourceMessage]:
    return [
        SourceMessage(
            seq, event_subject(e.plant, str(e.__struct_config__.tag)), encode(e)
        )
        for seq, e in enumerate(events, start=1)
    ]


def applied(*events: ev.PlantEvent) -> PartitionState:
    state = PartitionState(0)
    result = state.apply_batch(messages(*events))
    assert result.dead_letters == []
    return state


def order_of(state: PartitionState, order: str) -> OrderState:
    return state.orders[f"P1\x1f{order}"]


def test_shared_decimal_keeps_exponent() -> None:
    one_place = shared_decimal(Decimal("12.5"))
    two_places = shared_decimal(Decimal("12.50"))
    assert one_place is not two_places
    assert str(one_place) == "12.5"
    assert str(two_places) == "12.50"
    assert shared_decimal(Decimal("12.50")) is two_places


def test_orders_share_repeated_values() -> None:
    state = applied(release("O1"), release("O2"))
    first, second = order_of(state, "O1"), order_of(state, "O2")
    assert first.plant is second.plant
    assert first.material is second.material
    assert first.uom is second.uom
    assert first.storage_location is second.storage_location
    assert first.planned is second.planned
    first_keys = list(first.components)
    second_keys = list(second.components)
    assert all(a is b for a, b in zip(first_keys, second_keys, strict=True))
    assert first.components["RM-1"].uom is second.components["RM-1"].uom
    assert first.components["RM-1"].standard is second.components["RM-1"].standard
    assert first.operations is second.operations


def test_orders_keep_standard_exponent() -> None:
    state = applied(release("O1", standard="12.5"), release("O2", standard="12.50"))
    rows = state.take_snapshot()["order_components"].to_pylist()
    standards = {
        row["order_id"]: str(
            order_of(state, row["order_id"]).components["RM-1"].standard
        )
        for row in rows
        if row["material"] == "RM-1"
    }
    assert standards == {"O1": "12.5", "O2": "12.50"}


def test_routing_exponent_kept() -> None:
    state = applied(release("O1", cycle_time="4.5"), release("O2", cycle_time="4.50"))
    first, second = order_of(state, "O1"), order_of(state, "O2")
    assert first.operations is not second.operations
    assert str(first.operations["0010"].ideal_cycle_time_s) == "4.5"
    assert str(second.operations["0010"].ideal_cycle_time_s) == "4.50"


def test_open_order_has_no_empty_dicts() -> None:
    order = order_of(applied(release("O1")), "O1")
    assert order.stock is None
    assert order.holds is None
    assert order.receipts is None
    assert order.consumptions is None


def test_released_hold_clears_holds() -> None:
    unhold = ev.QualityHoldReleased(
        **base("O1-u", "O1", 30),  # type: ignore[arg-type]
        hold_id="H-1",
    )
    state = applied(release("O1"), *activity("O1"), unhold)
    order = order_of(state, "O1")
    assert order.holds is None
    assert order.status == "in_progress"
    assert order.blocked_quantity() == 0


def test_checkpoint_restores_equal_orders() -> None:
    state = applied(release("O1"), release("O2"), *activity("O1"), *activity("O2"))
    restored = PartitionState.restore(state.checkpoint())
    assert restored.orders == state.orders
    assert restored.checkpoint() == state.checkpoint()


def test_checkpoint_restores_sharing() -> None:
    state = applied(release("O1"), release("O2"), *activity("O1"), *activity("O2"))
    restored = PartitionState.restore(state.checkpoint())
    first, second = order_of(restored, "O1"), order_of(restored, "O2")
    assert first.plant is second.plant
    assert first.status is second.status
    assert first.components["RM-1"].standard is second.components["RM-1"].standard
    assert first.operations is second.operations
    assert first.receipts is not None
    assert second.receipts is not None
    first_receipt = first.receipts["O1-p2"]
    second_receipt = second.receipts["O2-p2"]
    assert first_receipt.operation is second_receipt.operation
    assert first_receipt.work_center is second_receipt.work_center
    assert first_receipt.scrap is second_receipt.scrap
    assert first_receipt.ideal_cycle_time_s is second_receipt.ideal_cycle_time_s


def test_empty_dicts_in_old_checkpoint() -> None:
    """A checkpoint that stored {} for a dict without entries decodes to None."""
    order = order_of(applied(release("O1")), "O1")
    fields = msgspec.to_builtins(order, builtin_types=(bytes,))
    for name in ("stock", "holds", "receipts", "consumptions"):
        fields[name] = {}
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(fields), type=OrderState)
    assert decoded.stock is None
    assert decoded.holds is None
    assert decoded.receipts is None
    assert decoded.consumptions is None
    assert decoded == order


def test_dropped_state_frees_orders() -> None:
    """Order structs skip the cycle collector, so dropping a state must free them."""
    events = [e for n in range(200) for e in (release(f"O{n}"), *activity(f"O{n}"))]
    applied(*events)  # fills the shared values, which outlive any one state
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        state = applied(*events)
        state.take_snapshot()
        restored = PartitionState.restore(state.checkpoint())
        gc.collect()
        state_bytes = tracemalloc.get_traced_memory()[0] - before
        del state, restored
        gc.collect()
        remaining_bytes = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # What remains is interpreter and msgspec caches: about 33 KB on CPython 3.11.
    assert state_bytes > 200 * 1000
    assert remaining_bytes < state_bytes // 20
