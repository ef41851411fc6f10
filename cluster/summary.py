"""The summary that `plantstream demo` prints, from the run and the DuckDB file."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import duckdb

from cluster.job import JobResult
from pipeline.sink import open_for_reading
from pipeline.subjects import DLQ_STREAM

__all__ = ["format_summary"]

MOVEMENT_NAMES = {
    "101": "goods receipt",
    "102": "goods receipt reversal",
    "261": "goods issue",
    "262": "goods issue reversal",
    "344": "to blocked stock",
    "343": "from blocked stock",
    "conf": "order confirmation",
}


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        # DECIMAL(38, 9) comes back as 816.000000000; show it as written, 816.
        return format(value.normalize(), "f")
    return str(value)


def _table(headers: list[str], rows: list[tuple[object, ...]]) -> list[str]:
    if not rows:
        return ["  none"]
    cells = [headers] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
        for row in cells
    ]


def _view_section(
    connection: duckdb.DuckDBPyConnection,
    heading: str,
    headers: list[str],
    sql: str,
    parameters: list[object] | None = None,
) -> list[str]:
    """Render a heading and the table that `sql` returns, or the error that stopped it.

    DuckDB fails a whole query on a view when it cannot compute a single row (an
    overflow, for example), so the error goes into the summary in place of the table,
    and the sections after it are still shown.
    """
    try:
        rows = connection.execute(sql, parameters).fetchall()
    except duckdb.Error as error:
        return [heading, _query_failure(error)]
    return [heading, *_table(headers, rows)]


def _query_failure(error: duckdb.Error) -> str:
    # DuckDB puts the failure and its values on the first line, and hints after it.
    message_lines = str(error).splitlines()
    reason = message_lines[0] if message_lines else type(error).__name__
    return f"  not shown, because the query failed: {reason}"


def _variance_section(connection: duckdb.DuckDBPyConnection, top: int) -> list[str]:
    """Render the largest variances of completed orders and count the other orders.

    An open order's variance is not final, because output and consumption still to
    come change both its scaled standard and its actual quantity. Ranked with the
    completed orders, an order that has just begun could lead the list, so open orders
    are only counted. Completion is read from `completed_at`, because an order with
    blocked stock keeps status on_hold after its final report.
    """
    heading = (
        "largest material variances of completed orders, by share of standard "
        f"(top {top})"
    )
    try:
        rows = connection.execute(
            "SELECT plant, order_id, material, standard_quantity, actual_quantity, "
            "variance, round(variance_pct, 1), uom FROM material_variance "
            "WHERE completed_at IS NOT NULL AND variance <> 0 "
            "ORDER BY abs(variance_pct) DESC NULLS LAST, abs(variance) DESC LIMIT ?",
            [top],
        ).fetchall()
        # A component row without an `orders` row has no completion time, so it
        # counts here.
        open_row = connection.execute(
            "SELECT count(DISTINCT (plant, order_id)) FROM material_variance "
            "WHERE completed_at IS NULL AND variance <> 0"
        ).fetchone()
    except duckdb.Error as error:
        return [heading, _query_failure(error)]
    headers = [
        "plant",
        "order",
        "component",
        "standard",
        "actual",
        "variance",
        "variance_pct",
        "uom",
    ]
    lines = [heading, *_table(headers, rows)]
    open_orders = open_row[0] if open_row else 0
    if open_orders:
        orders = "1 order" if open_orders == 1 else f"{open_orders} orders"
        lines.append(
            f"  left out: {orders} not completed yet, whose variance can still "
            "change (column completed_at of material_variance)"
        )
    return lines


def format_summary(result: JobResult, db: Path, *, top: int = 5) -> str:
    """Render counts, postings by type, OEE per machine and the largest variances."""
    counts = result.totals
    parked = sum(int(s.get("parked", 0)) for s in result.partition_stats)  # type: ignore[call-overload]
    dead_letters = {
        k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("dead_letter:")
    }
    postings = {
        k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("posting:")
    }
    # The counts come back with each checkpoint, so a run that resumed reports the
    # stream as a whole, and a reader must not take them for this run's work.
    lines = [
        "plantstream run summary (counts over every run since the first checkpoint, "
        "not this run alone)"
    ]
    if result.published:
        # Only the demo publishes its input; `run` reads what others published.
        lines.append(f"  messages published   {result.published}")
    lines += [
        f"  events in            {counts['events_in']}",
        f"  applied              {counts['applied']}",
        f"  duplicates dropped   {counts['duplicates']}",
        f"  parked (waiting)     {parked}",
        # The ledger that reconcile counts has a row only for events a partition
        # decoded, so it leaves out the messages rejected before that, counted here.
        f"  dead letters         {sum(dead_letters.values())}  (sent to {DLQ_STREAM}, "
        "including messages never decoded into an event)",
    ]
    for reason, number in sorted(dead_letters.items()):
        lines.append(f"    {reason:<20} {number}")
    if dead_letters:
        # Retries and dismissals are recorded in NATS only, so these counts do not
        # show how many letters are still open.
        lines.append(
            "    (a retry rejected again counts as a new letter; `plantstream dlq list "
            "--open` shows the letters not yet retried, resolved or dismissed)"
        )
    if counts["dead_letters_resolved"]:
        lines.append(
            f"  letters resolved     {counts['dead_letters_resolved']}  (earlier dead "
            "letters whose event was then applied under the same id)"
        )
    if counts["edge_batches_empty"]:
        lines.append(
            f"  empty edge batches   {counts['edge_batches_empty']}  (messages of "
            "plant.events.<plant>.batch holding no events)"
        )
    # Counted only when they happen, which takes a long run or small limits.
    if counts["orders_evicted"]:
        lines.append(
            f"  orders evicted       {counts['orders_evicted']}  (completed orders "
            "dropped from memory after PLANTSTREAM_CLOSED_ORDER_RETENTION_S)"
        )
    if counts["ids_forgotten"]:
        lines.append(
            f"  ids forgotten        {counts['ids_forgotten']}  (oldest event ids "
            "dropped at PLANTSTREAM_DEDUP_MAX_IDS)"
        )
    if result.report.recoveries:
        lines.append(f"  recoveries           {result.report.recoveries}")
    if result.report.stop_error:
        # A partition that died near the stop restarted empty, so its counts are
        # missing above. They return with its state at the next start.
        lines += [
            f"  incomplete: {result.report.stop_error}",
            "    The counts above are what the partitions held at the stop, and leave "
            "out any partition that lost its state. The next start restores the "
            "checkpoint through stream sequence "
            f"{result.report.committed_seq} and processes the messages after it "
            "again.",
        ]
    lines.append("postings by movement type")
    lines += _table(
        ["type", "meaning", "count"],
        [(k, MOVEMENT_NAMES.get(k, k), postings[k]) for k in sorted(postings)],
    )
    with open_for_reading(db) as connection:
        lines += _view_section(
            connection,
            "OEE per machine",
            [
                "plant",
                "machine",
                "availability",
                "performance",
                "quality",
                "quality_basis",
                "oee",
                "performance_flag",
            ],
            # quality_basis marks a machine whose reports mix units, where quality is
            # a ratio of ideal times instead of counts.
            "SELECT plant, machine, round(availability, 4), round(performance, 4), "
            "round(quality, 4), quality_basis, round(oee, 4), performance_flag "
            "FROM oee ORDER BY plant, machine",
        )
        lines += _variance_section(connection, top)
    lines.append(f"DuckDB file: {db}")
    return "\n".join(lines)
