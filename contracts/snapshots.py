"""Arrow schemas of the DuckDB snapshot tables, shared by the actors and the sink.

Partition actors build record batches in these schemas; the sink creates the tables from
them and upserts by `primary_key`, so a row written twice (after a recovery, or because
its order changed again) is replaced, never doubled. Quantities are DECIMAL(38, 9) and
timestamps are TIMESTAMP WITH TIME ZONE in UTC.
"""

from __future__ import annotations

from typing import NamedTuple

import pyarrow as pa

__all__ = ["QUANTITY", "TABLES", "TIMESTAMP", "TableSpec", "table_from_rows"]

QUANTITY = pa.decimal128(38, 9)
TIMESTAMP = pa.timestamp("us", tz="UTC")


class TableSpec(NamedTuple):
    schema: pa.Schema
    primary_key: tuple[str, ...]


def _spec(primary_key: tuple[str, ...], *fields: tuple[str, pa.DataType]) -> TableSpec:
    return TableSpec(pa.schema(list(fields)), primary_key)


TABLES: dict[str, TableSpec] = {
    # Every posting published to the ERP postings stream, goods movements and
    # confirmations alike; columns that do not apply to a kind are null.
    "postings": _spec(
        ("key",),
        ("key", pa.string()),
        ("posting_type", pa.string()),
        ("plant", pa.string()),
        ("order_id", pa.string()),
        ("movement_type", pa.string()),
        ("material", pa.string()),
        ("quantity", QUANTITY),
        ("uom", pa.string()),
        ("stock_type", pa.string()),
        ("batch", pa.string()),
        ("storage_location", pa.string()),
        ("operation", pa.string()),
        ("work_center", pa.string()),
        ("yield_quantity", QUANTITY),
        ("scrap_quantity", QUANTITY),
        ("rework_quantity", QUANTITY),
        ("final", pa.bool_()),
        ("posting_date", pa.date32()),
        ("occurred_at", TIMESTAMP),
        ("reference", pa.string()),
        ("reverses", pa.string()),
        ("lineage", pa.list_(pa.string())),
    ),
    # Current state of each production order.
    "orders": _spec(
        ("plant", "order_id"),
        ("plant", pa.string()),
        ("order_id", pa.string()),
        ("status", pa.string()),  # released, in_progress, on_hold, completed
        ("material", pa.string()),
        ("planned_quantity", QUANTITY),
        ("uom", pa.string()),
        ("good_quantity", QUANTITY),
        ("scrap_quantity", QUANTITY),
        ("rework_quantity", QUANTITY),
        ("blocked_quantity", QUANTITY),
        ("released_at", TIMESTAMP),
        ("first_activity_at", TIMESTAMP),
        ("last_event_at", TIMESTAMP),
        ("completed_at", TIMESTAMP),
        ("active_holds", pa.int32()),
        ("events_applied", pa.int64()),
    ),
    # Standard (bill of material, for the planned quantity) and actual consumption per
    # order and component; `actual_quantity` is net of reversals.
    "order_components": _spec(
        ("plant", "order_id", "material"),
        ("plant", pa.string()),
        ("order_id", pa.string()),
        ("material", pa.string()),
        ("uom", pa.string()),
        ("standard_quantity", QUANTITY),
        ("actual_quantity", QUANTITY),
    ),
    # One row per production report, for OEE: what a work center produced and the ideal
    # cycle time of the operation it ran.
    "production": _spec(
        ("event_id",),
        ("event_id", pa.string()),
        ("plant", pa.string()),
        ("order_id", pa.string()),
        ("work_center", pa.string()),
        ("operation", pa.string()),
        ("good_quantity", QUANTITY),
        ("scrap_quantity", QUANTITY),
        ("rework_quantity", QUANTITY),
        ("uom", pa.string()),
        ("ideal_cycle_time_s", QUANTITY),
        ("occurred_at", TIMESTAMP),
        ("cancelled", pa.bool_()),
    ),
    # Machine time by state: one row per interval; `ended_at` is null while it is open.
    "machine_states": _spec(
        ("source_event_id",),
        ("plant", pa.string()),
        ("machine", pa.string()),
        ("state", pa.string()),  # running, idle, down, setup, maintenance
        ("planned", pa.bool_()),
        ("reason", pa.string()),
        ("started_at", TIMESTAMP),
        ("ended_at", TIMESTAMP),
        ("source_event_id", pa.string()),
    ),
    "inspections": _spec(
        ("event_id",),
        ("event_id", pa.string()),
        ("plant", pa.string()),
        ("order_id", pa.string()),
        ("lot", pa.string()),
        ("material", pa.string()),
        ("result", pa.string()),
        ("characteristic", pa.string()),
        ("occurred_at", TIMESTAMP),
    ),
    "holds": _spec(
        ("plant", "hold_id"),
        ("plant", pa.string()),
        ("hold_id", pa.string()),
        ("scope", pa.string()),
        ("order_id", pa.string()),
        ("lot", pa.string()),
        ("material", pa.string()),
        ("reason", pa.string()),
        ("applied_at", TIMESTAMP),
        ("released_at", TIMESTAMP),
    ),
    # Events waiting for a prerequisite, such as consumption that arrived before its
    # order release. `status` is parked, applied, expired or dead_letter (rejected once
    # its prerequisite arrived).
    "parked_events": _spec(
        ("event_id",),
        ("event_id", pa.string()),
        ("plant", pa.string()),
        ("order_id", pa.string()),
        ("event_type", pa.string()),
        ("waiting_for", pa.string()),
        ("stream_seq", pa.int64()),
        ("occurred_at", TIMESTAMP),
        ("status", pa.string()),
    ),
    "shipments": _spec(
        ("event_id",),
        ("event_id", pa.string()),
        ("plant", pa.string()),
        ("delivery", pa.string()),
        ("material", pa.string()),
        ("quantity", QUANTITY),
        ("uom", pa.string()),
        ("customer", pa.string()),
        ("occurred_at", TIMESTAMP),
    ),
    # The event ledger: one row per message a partition decoded into an event, with what
    # became of it (`status`: applied, parked, duplicate or dead_letter, with the dead
    # letter `reason`) and the facts `plantstream reconcile` recomputes the postings
    # from. `quantity` is in `uom`, the unit the postings use after any conversion;
    # `material` of a production report is its order's output material. `refers_to` is
    # the event a cancellation or reversal names. A hold and a failed inspection carry
    # the hold they place (`hold_id`, `hold_scope`, `lot`, `material`), a release the
    # hold it lifts. `utc_offset_s` is the offset the plant sent with `occurred_at`.
    "events": _spec(
        ("stream_seq", "batch_index"),
        ("stream_seq", pa.int64()),
        ("batch_index", pa.int32()),
        ("event_id", pa.string()),
        ("plant", pa.string()),
        ("order_id", pa.string()),
        ("event_type", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("occurred_at", TIMESTAMP),
        ("utc_offset_s", pa.int32()),
        ("material", pa.string()),
        ("quantity", QUANTITY),
        ("uom", pa.string()),
        ("lot", pa.string()),
        ("refers_to", pa.string()),
        ("hold_id", pa.string()),
        ("hold_scope", pa.string()),
    ),
    # Event time per plant as one partition sees it: the watermark (the latest
    # occurred_at accepted, never ahead of the host clock) and how many events arrived
    # behind it by more than the lateness tolerance.
    "plant_clocks": _spec(
        ("plant", "partition"),
        ("plant", pa.string()),
        ("partition", pa.int32()),
        ("watermark", TIMESTAMP),
        ("events", pa.int64()),
        ("late_events", pa.int64()),
        ("max_lateness_s", pa.decimal128(38, 6)),
        ("future_rejected", pa.int64()),
    ),
    # Each plant's calendar for the plant-local views: its IANA time zone (null when
    # none is configured, so the views use the offset each event carried) and shifts.
    "plant_calendars": _spec(
        ("plant",),
        ("plant", pa.string()),
        ("time_zone", pa.string()),
        ("shift_start_min", pa.int32()),
        ("shift_length_min", pa.int32()),
    ),
    "dead_letters": _spec(
        ("subject", "stream_seq", "batch_index", "reason"),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("subject", pa.string()),
        ("stream_seq", pa.int64()),
        ("event_id", pa.string()),
        ("plant", pa.string()),
        ("order_id", pa.string()),
        ("rejected_at", TIMESTAMP),
        ("batch_index", pa.int32()),
        ("data", pa.binary()),
    ),
    # Dead letters made needless by a later event applied under their event id. The
    # key is the letter's identity (contracts.dead_letters.letter_id_at); the other
    # columns are those of the applied event.
    "dead_letter_resolutions": _spec(
        ("letter_id",),
        ("letter_id", pa.string()),
        ("plant", pa.string()),
        ("event_id", pa.string()),
        ("subject", pa.string()),
        ("stream_seq", pa.int64()),
        ("batch_index", pa.int32()),
        ("resolved_at", TIMESTAMP),
    ),
}


def table_from_rows(name: str, rows: list[dict[str, object]]) -> pa.Table:
    """Build table `name` from row dicts, keeping only the last row of each key.

    A row can change twice between two writes (a parked event applied, a hold released).
    The sink upserts by primary key, and DuckDB rejects one key twice in one statement.
    """
    spec = TABLES[name]
    if len(spec.primary_key) == 1:
        # One key column, as most tables have: its value is the key, and no tuple is
        # built per row.
        column = spec.primary_key[0]
        latest = {row.get(column): row for row in rows}
    else:
        latest = {tuple(map(row.get, spec.primary_key)): row for row in rows}
    return pa.Table.from_pylist(list(latest.values()), schema=spec.schema)
