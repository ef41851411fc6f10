"""The `oee`, `oee_by_plant` and `downtime_by_reason` views, on real DuckDB files."""

from __future__ import annotations

import datetime as dt
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from contracts.snapshots import TABLES
from pipeline.sink import SnapshotWriter, open_for_reading

T0 = dt.datetime(2024, 3, 4, 6, 0, tzinfo=dt.UTC)


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Build an Arrow table for snapshot table `name`, with nulls in absent columns."""
    columns = TABLES[name].schema.names
    return pa.Table.from_pylist(
        [{column: row.get(column) for column in columns} for row in rows],
        schema=TABLES[name].schema,
    )


def state(
    machine: str,
    state: str,
    start: float,
    end: float | None,
    *,
    planned: bool = False,
    reason: str | None = None,
    plant: str = "P1",
) -> dict[str, Any]:
    return {
        "plant": plant,
        "machine": machine,
        "state": state,
        "planned": planned,
        "reason": reason,
        "started_at": at(start),
        "ended_at": None if end is None else at(end),
        "source_event_id": f"{machine}-{state}-{start}",
    }


def report(
    event_id: str,
    machine: str,
    minute: float,
    good: str,
    scrap: str = "0",
    *,
    ideal_cycle_time_s: str | None = "1",
    cancelled: bool = False,
    plant: str = "P1",
    uom: str = "PC",
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "plant": plant,
        "order_id": "O1",
        "work_center": machine,
        "operation": "0010",
        "good_quantity": Decimal(good),
        "scrap_quantity": Decimal(scrap),
        "rework_quantity": Decimal(0),
        "uom": uom,
        "ideal_cycle_time_s": None
        if ideal_cycle_time_s is None
        else Decimal(ideal_cycle_time_s),
        "occurred_at": at(minute),
        "cancelled": cancelled,
    }


def query(
    tmp_path: Path,
    states: list[dict[str, Any]],
    reports: list[dict[str, Any]],
    sql: str,
) -> list[dict[str, Any]]:
    path = tmp_path / "snapshots.duckdb"
    with SnapshotWriter(path) as writer:
        writer.write(
            {
                "machine_states": table("machine_states", states),
                "production": table("production", reports),
            }
        )
    connection = open_for_reading(path)
    try:
        cursor = connection.execute(sql)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        connection.close()


def test_oee_worked_example(tmp_path: Path) -> None:
    # 420 min planned, 47 min unplanned stop, ideal cycle time 1 s (60 pieces a minute),
    # 19,271 pieces of which 423 rejects.
    states = [
        state("M1", "running", 0, 200),
        state("M1", "down", 200, 247, reason="jam"),
        state("M1", "running", 247, 420),
    ]
    reports = [
        report("E1", "M1", 200, good="9000", scrap="200"),
        report("E2", "M1", 420, good="9848", scrap="223"),
    ]
    (row,) = query(tmp_path, states, reports, "SELECT * FROM oee")

    assert row["planned_busy_time_s"] == Decimal(420 * 60)
    assert row["actual_production_time_s"] == Decimal(373 * 60)
    assert row["unplanned_down_time_s"] == Decimal(47 * 60)
    assert row["produced_quantity"] == Decimal(19271)
    assert row["good_quantity"] == Decimal(18848)
    assert row["scrap_quantity"] == Decimal(423)
    assert row["ideal_time_s"] == Decimal(19271)
    assert round(row["availability"], 4) == 0.8881
    assert round(row["performance"], 4) == 0.8611
    assert round(row["quality"], 4) == 0.9780
    assert round(row["oee"], 4) == 0.7479
    assert row["performance_flag"] is False
    assert row["uom"] == "PC"
    assert row["quality_basis"] == "count"


def test_oee_overlapping_down_counted_once(tmp_path: Path) -> None:
    states = [
        state("M1", "running", 0, 100),
        state("M1", "down", 10, 40, reason="jam"),
        state("M1", "down", 20, 60, reason="motor"),
    ]
    (row,) = query(tmp_path, states, [], "SELECT * FROM oee")

    assert row["unplanned_down_time_s"] == Decimal(50 * 60)
    assert row["actual_production_time_s"] == Decimal(50 * 60)
    assert row["planned_busy_time_s"] == Decimal(100 * 60)
    assert row["availability"] == pytest.approx(0.5)


def test_downtime_overlap_goes_to_earliest(tmp_path: Path) -> None:
    states = [
        state("M1", "running", 0, 100),
        state("M1", "down", 10, 40, reason="jam"),
        state("M1", "down", 20, 60, reason="motor"),
    ]
    rows = query(
        tmp_path,
        states,
        [],
        "SELECT reason, down_time_s FROM downtime_by_reason ORDER BY reason",
    )

    assert rows == [
        {"reason": "jam", "down_time_s": Decimal(30 * 60)},
        {"reason": "motor", "down_time_s": Decimal(20 * 60)},
    ]


def test_oee_planned_down_leaves_denominator(tmp_path: Path) -> None:
    states = [
        state("M1", "running", 0, 60),
        state("M1", "maintenance", 60, 90, planned=True, reason="preventive"),
        # An unplanned stop inside the planned one is planned time, not a loss.
        state("M1", "down", 80, 100, reason="jam"),
        state("M1", "running", 100, 120),
    ]
    (row,) = query(tmp_path, states, [], "SELECT * FROM oee")

    assert row["planned_down_time_s"] == Decimal(30 * 60)
    assert row["unplanned_down_time_s"] == Decimal(10 * 60)
    assert row["planned_busy_time_s"] == Decimal(90 * 60)
    assert row["availability"] == pytest.approx(80 / 90)


def test_oee_idle_is_availability_loss(tmp_path: Path) -> None:
    states = [
        state("M1", "running", 0, 60),
        state("M1", "idle", 60, 90),
        state("M1", "setup", 90, 100),
        state("M1", "running", 110, 120),  # 100 to 110 has no state row at all
    ]
    (row,) = query(tmp_path, states, [], "SELECT * FROM oee")

    assert row["idle_time_s"] == Decimal(50 * 60)
    assert row["planned_busy_time_s"] == Decimal(120 * 60)
    assert row["availability"] == pytest.approx(70 / 120)


def test_oee_open_interval_ends_at_window(tmp_path: Path) -> None:
    states = [state("M1", "running", 0, None)]
    reports = [report("E1", "M1", 30, good="1800")]
    (row,) = query(tmp_path, states, reports, "SELECT * FROM oee")

    assert row["window_end"] == at(30)
    assert row["actual_production_time_s"] == Decimal(30 * 60)
    assert row["performance"] == pytest.approx(1.0)


def test_oee_performance_above_one_flagged(tmp_path: Path) -> None:
    states = [state("M1", "running", 0, 10)]
    # 1,200 pieces at an ideal 1 s each cannot fit into 600 s: the ideal time is wrong.
    reports = [report("E1", "M1", 10, good="1100", scrap="100")]
    (row,) = query(tmp_path, states, reports, "SELECT * FROM oee")

    assert row["raw_performance"] == pytest.approx(2.0)
    assert row["performance"] == pytest.approx(1.0)
    assert row["performance_flag"] is True
    assert row["oee"] == pytest.approx(1100 / 1200)


def test_oee_excludes_cancelled_reports(tmp_path: Path) -> None:
    states = [state("M1", "running", 0, 60)]
    reports = [
        report("E1", "M1", 30, good="1000"),
        report("E2", "M1", 40, good="500", cancelled=True),
    ]
    (row,) = query(tmp_path, states, reports, "SELECT * FROM oee")

    assert row["produced_quantity"] == Decimal(1000)


def test_oee_window_ignores_cancelled_reports(tmp_path: Path) -> None:
    states = [state("M1", "running", 0, 60)]
    reports = [
        report("E1", "M1", 30, good="1000"),
        # Taken back, so its time neither stretches the window nor adds idle time.
        report("E2", "M1", 90, good="500", cancelled=True),
    ]
    (row,) = query(tmp_path, states, reports, "SELECT * FROM oee")

    assert row["window_end"] == at(60)
    assert row["planned_busy_time_s"] == Decimal(60 * 60)
    assert row["idle_time_s"] == 0
    assert row["availability"] == pytest.approx(1.0)


def test_oee_by_plant_sums_times(tmp_path: Path) -> None:
    states = [
        state("M1", "running", 0, 100),
        state("M2", "running", 0, 150),
        state("M2", "down", 150, 300, reason="motor"),
    ]
    reports = [
        report("E1", "M1", 50, good="3000"),
        report("E2", "M2", 100, good="4500", scrap="500"),
    ]
    (row,) = query(tmp_path, states, reports, "SELECT * FROM oee_by_plant")

    assert row["machines"] == 2
    assert row["planned_busy_time_s"] == Decimal(400 * 60)
    assert row["actual_production_time_s"] == Decimal(250 * 60)
    # Averaging the machines' availabilities (1.0 and 0.5) would give 0.75.
    assert row["availability"] == pytest.approx(250 / 400)
    assert row["performance"] == pytest.approx(8000 / (250 * 60))
    assert row["quality"] == pytest.approx(7500 / 8000)


def test_oee_by_plant_caps_flagged_machine(tmp_path: Path) -> None:
    states = [state("M1", "running", 0, 10), state("M2", "running", 0, 10)]
    reports = [
        report("E1", "M1", 10, good="1200"),  # twice the ideal rate
        report("E2", "M2", 10, good="300"),
    ]
    (row,) = query(tmp_path, states, reports, "SELECT * FROM oee_by_plant")

    assert row["performance"] == pytest.approx((600 + 300) / 1200)
    assert row["performance_flag"] is True
    assert row["flagged_machines"] == 1


def test_oee_ratios_within_unit_interval(tmp_path: Path) -> None:
    states = [
        state("M1", "running", 0, 30),
        state("M1", "down", 20, 50, reason="jam"),
        state("M1", "down", 25, 70, reason="motor"),
        state("M1", "idle", 70, 80, planned=True),
        state("M2", "running", 0, 5),
        state("M3", "down", 0, 10),
    ]
    reports = [
        report("E1", "M1", 10, good="900", scrap="300"),
        report("E2", "M2", 5, good="5000", ideal_cycle_time_s="2"),
        report("E3", "M3", 10, good="10"),
    ]
    rows = query(tmp_path, states, reports, "SELECT * FROM oee ORDER BY machine")

    assert len(rows) == 3
    for row in rows:
        for ratio in ("availability", "performance", "quality", "oee"):
            value = row[ratio]
            assert value is None or 0.0 <= value <= 1.0, (row["machine"], ratio, value)


def test_oee_mixed_units_quality_by_ideal_time(tmp_path: Path) -> None:
    states = [state("M1", "running", 0, 60)]
    # 2 s per KG and 30 s per EA: 142 s and 450 s of ideal time.
    reports = [
        report("E1", "M1", 20, good="71", ideal_cycle_time_s="2", uom="KG"),
        report("E2", "M1", 50, good="10", scrap="5", ideal_cycle_time_s="30", uom="EA"),
    ]
    (row,) = query(tmp_path, states, reports, "SELECT * FROM oee")

    # 71 KG and 15 EA cannot be added, so no quantity is shown.
    assert row["produced_quantity"] is None
    assert row["good_quantity"] is None
    assert row["scrap_quantity"] is None
    assert row["uom"] is None
    assert row["ideal_time_s"] == Decimal(592)
    assert row["good_ideal_time_s"] == Decimal(442)
    assert row["quality_basis"] == "ideal_time"
    assert row["quality"] == pytest.approx(442 / 592)
    assert row["oee"] == pytest.approx(442 / 3600)
    assert row["oee"] == pytest.approx(
        row["availability"] * row["performance"] * row["quality"]
    )


def test_oee_mixed_units_without_ideal_time(tmp_path: Path) -> None:
    states = [state("M1", "running", 0, 60)]
    reports = [
        report("E1", "M1", 20, good="71", ideal_cycle_time_s="2", uom="KG"),
        report("E2", "M1", 50, good="10", scrap="5", ideal_cycle_time_s=None, uom="EA"),
    ]
    (row,) = query(tmp_path, states, reports, "SELECT * FROM oee")

    assert row["quality_basis"] is None
    assert row["quality"] is None
    assert row["oee"] is None
    assert row["produced_quantity"] is None
    assert row["availability"] == pytest.approx(1.0)


def test_oee_by_plant_mixed_units(tmp_path: Path) -> None:
    states = [state("M1", "running", 0, 60), state("M2", "running", 0, 60)]
    reports = [
        report("E1", "M1", 20, good="71", ideal_cycle_time_s="2", uom="KG"),
        report("E2", "M2", 50, good="10", scrap="5", ideal_cycle_time_s="30", uom="EA"),
    ]
    machines = query(
        tmp_path,
        states,
        reports,
        "SELECT machine, uom, produced_quantity, quality, quality_basis FROM oee "
        "ORDER BY machine",
    )
    (plant,) = query(tmp_path, states, reports, "SELECT * FROM oee_by_plant")

    # Each machine has one unit, so each keeps its counts.
    assert machines == [
        {
            "machine": "M1",
            "uom": "KG",
            "produced_quantity": Decimal(71),
            "quality": 1.0,
            "quality_basis": "count",
        },
        {
            "machine": "M2",
            "uom": "EA",
            "produced_quantity": Decimal(15),
            "quality": pytest.approx(10 / 15),
            "quality_basis": "count",
        },
    ]
    assert plant["uom"] is None
    assert plant["produced_quantity"] is None
    assert plant["good_quantity"] is None
    assert plant["scrap_quantity"] is None
    assert plant["quality_basis"] == "ideal_time"
    assert plant["quality"] == pytest.approx(442 / 592)
    assert plant["oee"] == pytest.approx(442 / 7200)


def test_oee_by_plant_single_unit_counts(tmp_path: Path) -> None:
    states = [state("M1", "running", 0, 60), state("M2", "running", 0, 60)]
    reports = [
        report("E1", "M1", 20, good="70", scrap="10", uom="EA"),
        report(
            "E2", "M2", 50, good="10", scrap="10", ideal_cycle_time_s=None, uom="EA"
        ),
    ]
    (plant,) = query(tmp_path, states, reports, "SELECT * FROM oee_by_plant")

    assert plant["uom"] == "EA"
    assert plant["produced_quantity"] == Decimal(100)
    assert plant["good_quantity"] == Decimal(80)
    assert plant["quality_basis"] == "count"
    assert plant["quality"] == pytest.approx(0.8)


# The largest quantity and cycle time the contracts accept: 15 digits before the point
# and 9 after.
LARGEST = "999999999999999.999999999"


def test_oee_ideal_time_overflow_is_null(tmp_path: Path) -> None:
    states = [
        state("M1", "running", 0, 60),
        state("M2", "running", 0, 60),
        state("M3", "running", 0, 60),
    ]
    # PRI x PQ of M1 is about 1e30 s, more than DECIMAL(38, 9) holds. M3 has no reports.
    reports = [
        report("E1", "M1", 30, good=LARGEST, ideal_cycle_time_s=LARGEST),
        report("E2", "M2", 30, good="1800"),
    ]
    rows = query(tmp_path, states, reports, "SELECT * FROM oee ORDER BY machine")
    overflowed, normal, without_reports = rows

    assert overflowed["ideal_time_s"] is None
    assert overflowed["good_ideal_time_s"] is None
    assert overflowed["raw_performance"] is None
    assert overflowed["performance"] is None
    # 1e29 s or more is longer than any running time.
    assert overflowed["performance_flag"] is True
    assert overflowed["oee"] is None
    # The figures that need no ideal time are still computed.
    assert overflowed["produced_quantity"] == Decimal(LARGEST)
    assert overflowed["availability"] == pytest.approx(1.0)
    assert overflowed["quality"] == pytest.approx(1.0)
    assert overflowed["quality_basis"] == "count"

    assert normal["ideal_time_s"] == Decimal(1800)
    assert normal["performance"] == pytest.approx(0.5)
    assert normal["oee"] == pytest.approx(0.5)

    assert without_reports["ideal_time_s"] == Decimal(0)
    assert without_reports["good_ideal_time_s"] == Decimal(0)
    assert without_reports["oee"] == 0.0


def test_oee_ideal_time_exact_above_1e20(tmp_path: Path) -> None:
    states = [state("M1", "running", 0, 60)]
    cycle_time = Decimal("1234567.123456789")
    good = Decimal(LARGEST)
    reports = [
        report("E1", "M1", 30, good=str(good), ideal_cycle_time_s=str(cycle_time)),
    ]
    (row,) = query(tmp_path, states, reports, "SELECT * FROM oee")

    # About 1.2e21 s, rounded half up to 9 decimal places like a DECIMAL(38, 9) cast.
    # The exact product has 40 digits, more than the default context's 28.
    with localcontext(prec=40):
        expected = (cycle_time * good).quantize(Decimal("1e-9"), rounding=ROUND_HALF_UP)
    assert row["ideal_time_s"] == expected
    assert row["good_ideal_time_s"] == expected
    assert row["performance"] == pytest.approx(1.0)
    assert row["performance_flag"] is True


def test_oee_ideal_time_sum_overflow_is_null(tmp_path: Path) -> None:
    states = [state("M1", "running", 0, 60)]
    # Each report has an ideal time of about 6e28 s, which fits DECIMAL(38, 9) alone
    # but not summed with the other.
    reports = [
        report("E1", "M1", 20, good="999999999999999", ideal_cycle_time_s="6e13"),
        report("E2", "M1", 40, good="999999999999999", ideal_cycle_time_s="6e13"),
    ]
    (row,) = query(tmp_path, states, reports, "SELECT * FROM oee")

    assert row["ideal_time_s"] is None
    assert row["good_ideal_time_s"] is None
    assert row["performance"] is None
    assert row["oee"] is None


def test_oee_by_plant_ideal_time_overflow(tmp_path: Path) -> None:
    states = [
        state("M1", "running", 0, 60),
        state("M2", "running", 0, 60),
        state("M3", "running", 0, 60, plant="P2"),
        state("M5", "running", 0, 60, plant="P3"),
    ]
    reports = [
        report("E1", "M1", 30, good=LARGEST, ideal_cycle_time_s=LARGEST),
        report("E2", "M2", 30, good="1800"),
        report("E3", "M3", 30, good="900", scrap="900", plant="P2"),
        # M4 has no state data, so it adds nothing to the performance numerator.
        report("E4", "M4", 30, good=LARGEST, ideal_cycle_time_s=LARGEST, plant="P3"),
        report("E5", "M5", 30, good="1800", plant="P3"),
    ]
    rows = query(tmp_path, states, reports, "SELECT * FROM oee_by_plant ORDER BY plant")
    p1, p2, p3 = rows

    assert p1["ideal_time_s"] is None
    assert p1["good_ideal_time_s"] is None
    assert p1["performance"] is None
    assert p1["oee"] is None
    assert p1["availability"] == pytest.approx(1.0)
    assert p1["quality"] == pytest.approx(1.0)
    assert p1["flagged_machines"] == 1
    assert p1["performance_flag"] is True

    assert p2["ideal_time_s"] == Decimal(1800)
    assert p2["performance"] == pytest.approx(0.5)
    assert p2["quality"] == pytest.approx(0.5)
    assert p2["oee"] == pytest.approx(0.25)

    assert p3["ideal_time_s"] is None
    assert p3["good_ideal_time_s"] is None
    assert p3["performance"] == pytest.approx(0.5)
    assert p3["oee"] == pytest.approx(0.5)


def test_oee_by_plant_ideal_time_sum_overflow(tmp_path: Path) -> None:
    states = [state("M1", "running", 0, 60), state("M2", "running", 0, 60)]
    # Each machine's ideal time of about 6e28 s fits, but their sum does not. Both are
    # capped at the running time, so performance and oee are still known.
    reports = [
        report("E1", "M1", 30, good="999999999999999", ideal_cycle_time_s="6e13"),
        report("E2", "M2", 30, good="999999999999999", ideal_cycle_time_s="6e13"),
    ]
    machines = query(tmp_path, states, reports, "SELECT ideal_time_s FROM oee")
    (plant,) = query(tmp_path, states, reports, "SELECT * FROM oee_by_plant")

    expected = Decimal("6e13") * Decimal("999999999999999")
    assert machines == [{"ideal_time_s": expected}, {"ideal_time_s": expected}]
    assert plant["ideal_time_s"] is None
    assert plant["good_ideal_time_s"] is None
    assert plant["performance"] == pytest.approx(1.0)
    assert plant["oee"] == pytest.approx(1.0)
    assert plant["flagged_machines"] == 2
