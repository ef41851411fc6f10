"""The summary of `plantstream demo`, rendered from a real DuckDB file."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from cluster.job import JobResult
from cluster.summary import format_summary
from contracts.snapshots import TABLES
from pipeline.ingest import IngestReport
from pipeline.sink import SnapshotWriter

T0 = dt.datetime(2024, 3, 4, 6, 0, tzinfo=dt.UTC)
VARIANCE_HEADING = (
    "largest material variances of completed orders, by share of standard (top 5)"
)


def table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Build an Arrow table for snapshot table `name`, with nulls in absent columns."""
    columns = TABLES[name].schema.names
    return pa.Table.from_pylist(
        [{column: row.get(column) for column in columns} for row in rows],
        schema=TABLES[name].schema,
    )


def summarize(db: Path, tables: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Write `tables` into a new snapshot file and return the summary's lines."""
    with SnapshotWriter(db) as writer:
        writer.write({name: table(name, rows) for name, rows in tables.items()})
    result = JobResult(IngestReport(), Counter(), 0, [], db)
    return format_summary(result, db).splitlines()


def section(lines: list[str], heading: str) -> list[list[str]]:
    """Return the rows under the first heading that starts with `heading`, split on
    blanks, with the table's header row first."""
    start = next(i for i, line in enumerate(lines) if line.startswith(heading)) + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        rows.append(line.split())
    return rows


def test_summary_shows_failed_view_query(tmp_path: Path) -> None:
    db = tmp_path / "snapshots.duckdb"
    SnapshotWriter(db).close()
    # A row whose variance raises an error, as one that overflows does: DuckDB then
    # fails every query on the view.
    with duckdb.connect(str(db)) as connection:
        connection.execute(
            "CREATE OR REPLACE VIEW material_variance AS SELECT 'P1' AS plant, "
            "'O1' AS order_id, 'ORE' AS material, 'T' AS uom, "
            "1.0 AS standard_quantity, 2.0 AS actual_quantity, "
            "error('Overflow in multiplication of DECIMAL(38)') AS variance, "
            "100.0 AS variance_pct, 'completed' AS order_status, "
            "TIMESTAMPTZ '2024-03-04 06:00:00+00' AS completed_at"
        )

    summary = format_summary(JobResult(IngestReport(), Counter(), 0, [], db), db)
    lines = summary.splitlines()

    heading = lines.index(VARIANCE_HEADING)
    assert lines[heading + 1] == (
        "  not shown, because the query failed: Invalid Input Error: Overflow in "
        "multiplication of DECIMAL(38)"
    )
    assert "OEE per machine" in lines
    assert lines[-1] == f"DuckDB file: {db}"


def order(
    order_id: str, status: str, good: str, *, completed: bool = False
) -> dict[str, Any]:
    return {
        "plant": "P1",
        "order_id": order_id,
        "status": status,
        "planned_quantity": Decimal(100),
        "good_quantity": Decimal(good),
        "scrap_quantity": Decimal(0),
        "completed_at": T0 if completed or status == "completed" else None,
    }


def component(order_id: str, standard: str, actual: str) -> dict[str, Any]:
    return {
        "plant": "P1",
        "order_id": order_id,
        "material": "STEEL",
        "uom": "KG",
        "standard_quantity": Decimal(standard),
        "actual_quantity": Decimal(actual),
    }


def test_variances_rank_completed_orders(tmp_path: Path) -> None:
    orders = [
        order("DONE", "completed", good="100"),
        order("BEGUN", "in_progress", good="100"),
        # Completed, but its blocked stock keeps the status on_hold.
        order("HELD", "on_hold", good="100", completed=True),
        order("NEW", "released", good="0"),
        order("EXACT", "in_progress", good="100"),
    ]
    components = [
        # 5% above the standard of 100 KG.
        component("DONE", "100", "105"),
        # 70% below standard: consumption not yet reported.
        component("BEGUN", "100", "30"),
        component("HELD", "100", "150"),
        component("NEW", "100", "1"),
        # No variance, so not counted as left out.
        component("EXACT", "100", "100"),
    ]
    lines = summarize(
        tmp_path / "snapshots.duckdb",
        {"orders": orders, "order_components": components},
    )
    rows = section(lines, "largest material variances")

    assert VARIANCE_HEADING in lines
    assert rows[0] == [
        "plant",
        "order",
        "component",
        "standard",
        "actual",
        "variance",
        "variance_pct",
        "uom",
    ]
    # The section's last line is the note on the orders left out.
    assert [row[1] for row in rows[1:-1]] == ["HELD", "DONE"]
    assert rows[2][5:7] == ["5", "5.0"]
    assert lines[lines.index(VARIANCE_HEADING) + 4] == (
        "  left out: 2 orders not completed yet, whose variance can still change "
        "(column completed_at of material_variance)"
    )


def test_variances_without_open_orders(tmp_path: Path) -> None:
    lines = summarize(
        tmp_path / "snapshots.duckdb",
        {
            "orders": [order("DONE", "completed", good="100")],
            "order_components": [component("DONE", "100", "90")],
        },
    )
    rows = section(lines, "largest material variances")

    assert len(rows) == 2
    assert rows[1][:2] == ["P1", "DONE"]
    assert not any(line.startswith("  left out") for line in lines)


def report(event_id: str, machine: str, good: str, uom: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "plant": "P1",
        "order_id": "O1",
        "work_center": machine,
        "operation": "0010",
        "good_quantity": Decimal(good),
        "scrap_quantity": Decimal(0),
        "rework_quantity": Decimal(0),
        "uom": uom,
        "ideal_cycle_time_s": Decimal(2),
        "occurred_at": T0 + dt.timedelta(minutes=30),
        "cancelled": False,
    }


def running(machine: str) -> dict[str, Any]:
    return {
        "plant": "P1",
        "machine": machine,
        "state": "running",
        "planned": False,
        "started_at": T0,
        "ended_at": T0 + dt.timedelta(hours=1),
        "source_event_id": f"{machine}-running",
    }


def test_oee_shows_quality_basis(tmp_path: Path) -> None:
    reports = [
        report("E1", "MIXED", "71", "KG"),
        report("E2", "MIXED", "10", "EA"),
        report("E3", "SINGLE", "10", "EA"),
    ]
    # State rows fill every ratio, so that no blank cell shifts the split columns.
    states = [running("MIXED"), running("SINGLE")]
    lines = summarize(
        tmp_path / "snapshots.duckdb",
        {"production": reports, "machine_states": states},
    )
    rows = section(lines, "OEE per machine")
    header = rows[0]
    basis = header.index("quality_basis")
    by_machine = {row[1]: row for row in rows[1:]}

    assert by_machine["MIXED"][basis] == "ideal_time"
    assert by_machine["SINGLE"][basis] == "count"


def test_empty_sections_say_none(tmp_path: Path) -> None:
    db = tmp_path / "snapshots.duckdb"
    SnapshotWriter(db).close()
    counts = Counter({"dead_letter:malformed": 1})
    result = JobResult(IngestReport(), counts, 0, [], db)
    lines = format_summary(result, db).splitlines()

    oee = lines.index("OEE per machine")
    assert lines[oee + 1] == "  none"
    assert any("`plantstream dlq list --open` shows" in line for line in lines)
