"""Order of arrival: any order ends in the state and stock of in-order arrival."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_semantics_support import (
    at,
    base,
    confirm,
    consume,
    differences,
    hold,
    message,
    order_stock,
    query,
    release,
    run,
    unhold,
)

from actors.partition_state import PartitionState, SourceMessage
from actors.settings import StateSettings
from cluster.nats_server import EmbeddedNatsServer
from contracts import events as ev

pytestmark = pytest.mark.usefixtures("ray_local")


def _state(
    event_id: str, minutes: float, state: ev.MachineState
) -> ev.MachineStateChanged:
    return ev.MachineStateChanged(
        **base(event_id, minutes, None), machine="M1", state=state
    )


def _inspection(event_id: str, order: str, lot: str) -> ev.InspectionRecorded:
    return ev.InspectionRecorded(**base(event_id, 40, order), result="fail", lot=lot)


IN_ORDER: list[ev.PlantEvent] = [
    _state("m0", 0, "running"),
    release("O1"),
    release("O2"),
    consume("i1", "O1", "2.5"),
    confirm("c1", "O1", "10", lot="L1"),
    confirm("c4", "O2", "7", lot="L2"),
    _state("m1", 20, "down"),
    hold("h1", "H1", None, scope="lot", lot="L2"),
    confirm("c2", "O1", "5", lot="L1"),
    ev.ProductionCancelled(**base("x1", 25, "O1"), cancels_event_id="c2"),
    ev.ConsumptionReversed(**base("r1", 26, "O1"), reverses_event_id="i1"),
    _state("m2", 30, "running"),
    unhold("u1", "H1", None),
    confirm("c5", "O2", "3", lot="L2"),
    _inspection("f1", "O1", "L1"),
    _state("m3", 50, "idle"),
]

# Every prerequisite after what waits for it: the inspection before the production it
# judges, the cancellation before what it cancels, the hold release before the hold,
# orders' events before their release and machine states newest first.
ARRIVAL = [
    "m3", "f1", "x1", "r1", "c2", "u1", "m2", "c5", "h1",
    "O1-rel", "c1", "i1", "m1", "O2-rel", "c4", "m0",
]  # fmt: skip


def _snapshot(db: Path) -> dict[str, object]:
    return {
        "stock": order_stock(db),
        "orders": query(db, "SELECT * EXCLUDE (status) FROM orders ORDER BY order_id"),
        "status": query(db, "SELECT order_id, status FROM orders ORDER BY 1"),
        "components": query(db, "SELECT * FROM order_components ORDER BY order_id"),
        "machine": query(
            db,
            "SELECT state, started_at, ended_at FROM machine_states ORDER BY 2",
        ),
    }


def test_arrival_order_same_result(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    by_id = {event.event_id: event for event in IN_ORDER}
    assert sorted(ARRIVAL) == sorted(by_id)
    in_order = run(nats_server, tmp_path / "a.duckdb", [message(e) for e in IN_ORDER])
    # A second server keeps the two runs' streams apart.
    other = type(nats_server)(store_dir=tmp_path / "js2").start()
    try:
        shuffled = run(
            other, tmp_path / "b.duckdb", [message(by_id[i]) for i in ARRIVAL]
        )
    finally:
        other.stop()

    first = _snapshot(tmp_path / "a.duckdb")
    second = _snapshot(tmp_path / "b.duckdb")
    assert first["stock"] == {
        ("O1", "FG-1", "blocked"): 10,
        ("O2", "FG-1", "unrestricted"): 10,
    }
    for part in ("stock", "orders", "status", "components", "machine"):
        assert second[part] == first[part], part
    assert in_order.report.counts["parked"] == 0
    assert shuffled.report.counts["parked"] > 0
    assert query(
        tmp_path / "b.duckdb", "SELECT DISTINCT status FROM parked_events"
    ) == [("applied",)]
    assert differences(tmp_path / "a.duckdb") == []
    assert differences(tmp_path / "b.duckdb") == []


def test_parked_event_expires() -> None:
    state = PartitionState(0, StateSettings(park_timeout_s=0))
    waiting = message(consume("i1", "O9", "1"))
    result = state.apply_batch([SourceMessage(1, *waiting)])
    assert result.counts["parked"] == 1
    state._last_expiry_scan = 0.0  # the next batch scans for expired events
    result = state.apply_batch([])
    reasons = [letter.reason for letter in result.dead_letters]
    assert reasons == ["parked_expired"]
    rows = state.take_snapshot()
    parked = rows["parked_events"].to_pylist()
    assert [row["status"] for row in parked] == ["expired"]
    ledger = rows["events"].to_pylist()
    assert [(row["status"], row["reason"]) for row in ledger] == [
        ("dead_letter", "parked_expired")
    ]


def test_machine_state_before_history_rejected() -> None:
    state = PartitionState(0, StateSettings(machine_history=1))
    changes = [_state(f"m{n}", 10 * n, "running") for n in range(1, 5)]
    late = _state("m0", 0, "down")
    batch = [SourceMessage(n + 1, *message(e)) for n, e in enumerate([*changes, late])]
    result = state.apply_batch(batch)
    assert [letter.reason for letter in result.dead_letters] == ["invalid"]
    assert "PLANTSTREAM_MACHINE_HISTORY" in result.dead_letters[0].detail
    assert at(0) < changes[0].occurred_at


def test_late_state_changes_keep_history_bounded() -> None:
    state = PartitionState(0, StateSettings(machine_history=3))
    changes = [_state(f"m{n}", 10 * n, "running") for n in range(1, 6)]
    late = [_state(f"late{n}", 10 * n + 5, "idle") for n in (2, 3, 4)]
    events = [*changes, *late]
    batch = [SourceMessage(n + 1, *message(e)) for n, e in enumerate(events)]

    result = state.apply_batch(batch)

    assert result.dead_letters == []
    history = state.machines["P1\x1fM1"].history
    # Each late change was inserted, then the oldest interval dropped.
    assert [interval.started_at for interval in history] == [at(35), at(40), at(45)]


def test_history_limit_detail_in_event_offset() -> None:
    # A restored state keeps its times in UTC. The detail shows the oldest kept
    # interval in the late event's own offset, as the event's time is shown.
    state = PartitionState(0, StateSettings(machine_history=1))
    changes = [_state(f"m{n}", 10 * n, "running") for n in range(1, 5)]
    state.apply_batch(
        [SourceMessage(n + 1, *message(e)) for n, e in enumerate(changes)]
    )
    state_part, orders = state.checkpoint_parts(base=True)
    restored = PartitionState.restore(state_part, orders=[orders])

    late = _state("m0", 0, "down")
    result = restored.apply_batch([SourceMessage(10, *message(late))])

    [letter] = result.dead_letters
    assert f"the oldest starts {at(30).isoformat()}" in letter.detail


def test_closed_order_event_dead_lettered() -> None:
    # Seq 4 starts a new block of four stream sequences, so the scan for orders to
    # evict runs just before it.
    settings = StateSettings(closed_order_retention_s=3600, eviction_interval_seqs=4)
    state = PartitionState(0, settings)
    done: list[ev.PlantEvent] = [
        release("O1"),
        confirm("O1-c1", "O1", "10", final=True),
        # An hour and a minute after O1's last event, in the plant's event time.
        release("O2", minutes=71),
    ]
    state.apply_batch([SourceMessage(n, *message(e)) for n, e in enumerate(done, 1)])
    state.take_snapshot()
    late = confirm("O1-c2", "O1", "2", minutes=72)
    result = state.apply_batch([SourceMessage(4, *message(late))])
    reasons = [letter.reason for letter in result.dead_letters]
    assert reasons == ["order_closed"]
    assert result.counts["orders_evicted"] == 1
    assert result.postings == []
    ledger = state.take_snapshot()["events"].to_pylist()
    assert [(row["status"], row["reason"]) for row in ledger] == [
        ("dead_letter", "order_closed")
    ]
