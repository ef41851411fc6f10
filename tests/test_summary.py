"""The summary of `plantstream demo`, rendered from a real DuckDB file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import duckdb

from cluster.job import JobResult
from cluster.summary import format_summary
from pipeline.ingest import IngestReport
from pipeline.sink import SnapshotWriter


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
            "100.0 AS variance_pct"
        )

    summary = format_summary(JobResult(IngestReport(), Counter(), 0, [], db), db)
    lines = summary.splitlines()

    heading = lines.index("largest material variances, by share of standard (top 5)")
    assert lines[heading + 1] == (
        "  not shown, because the query failed: Invalid Input Error: Overflow in "
        "multiplication of DECIMAL(38)"
    )
    assert "OEE per machine" in lines
    assert lines[-1] == f"DuckDB file: {db}"
