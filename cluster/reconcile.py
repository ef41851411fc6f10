"""`plantstream reconcile`: prove that the postings agree with the deduplicated events.

The check reads only the DuckDB snapshot file. It recomputes the stock every plant,
material and stock type should have from the event ledger (`events`), with rules of its
own that are simpler than the actors' (docs/semantics.md, "Reconciliation"), and
compares the result with the `stock` view, which sums the postings. It also checks that
every event has exactly one outcome: applied once, parked, or dead-lettered.

With `--nats-url` it also compares the postings in the file with those in ERP_POSTINGS,
by the idempotency key in each message body, so that a posting the ERP received but the
file lacks, or the reverse, shows up too. It decodes each message body as a posting and
compares it, column by column, with the file's row of the same key. It also reports a
key that the stream stores more than once, which happens when a posting is published
again after the stream's duplicate window, and a message whose Nats-Msg-Id is not its
body's key.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import msgspec

from contracts.codec import decode_posting
from contracts.postings import GoodsMovement, Posting
from contracts.snapshots import TABLES
from pipeline.sink import SinkError, open_for_reading, recorded_source
from pipeline.subjects import (
    DLQ_STREAM,
    EVENTS_STREAM,
    POSTINGS_PREFIX,
    POSTINGS_STREAM,
)

logger = logging.getLogger(__name__)

__all__ = ["Difference", "add_parser", "reconcile"]

# Stock each lot of order output and each consumption should have left, from the ledger.
# A lot's net receipt (reports minus the ones cancelled) is blocked when a hold that
# covers it is still active at the end, and unrestricted otherwise: every transfer moves
# a lot's whole stock, so the order in which holds came and went does not matter.
EXPECTED_STOCK = """
WITH applied AS (
    SELECT * FROM events WHERE status = 'applied'
),
cancelled AS (
    SELECT DISTINCT plant, order_id, refers_to AS event_id
    FROM applied WHERE event_type = 'production_cancelled'
),
reversed AS (
    SELECT DISTINCT plant, order_id, refers_to AS event_id
    FROM applied WHERE event_type = 'consumption_reversed'
),
receipts AS (
    SELECT a.plant, a.order_id, a.lot, a.material, a.uom, a.quantity
    FROM applied AS a
    WHERE a.event_type = 'production_confirmed' AND a.quantity > 0
        AND NOT EXISTS (
            SELECT 1 FROM cancelled AS c
            WHERE c.plant = a.plant AND c.order_id = a.order_id
                AND c.event_id = a.event_id
        )
),
holds AS (
    SELECT plant, order_id, hold_id, hold_scope, lot, material
    FROM applied
    WHERE hold_id IS NOT NULL
        AND event_type IN ('quality_hold_applied', 'inspection_recorded')
),
active_holds AS (
    SELECT h.* FROM holds AS h
    WHERE NOT EXISTS (
        SELECT 1 FROM applied AS r
        WHERE r.event_type = 'quality_hold_released' AND r.plant = h.plant
            AND r.hold_id = h.hold_id AND r.order_id IS NOT DISTINCT FROM h.order_id
    )
),
lots AS (
    SELECT
        r.*,
        EXISTS (
            SELECT 1 FROM active_holds AS h
            WHERE h.plant = r.plant
                AND (h.order_id IS NULL OR h.order_id = r.order_id)
                AND CASE h.hold_scope
                    WHEN 'lot' THEN h.lot = r.lot
                    WHEN 'material' THEN h.material = r.material
                    ELSE true
                END
        ) AS blocked
    FROM receipts AS r
),
issues AS (
    SELECT a.plant, a.material, a.uom, a.quantity
    FROM applied AS a
    WHERE a.event_type = 'material_consumed'
        AND NOT EXISTS (
            SELECT 1 FROM reversed AS v
            WHERE v.plant = a.plant AND v.order_id = a.order_id
                AND v.event_id = a.event_id
        )
),
moves AS (
    SELECT plant, material, CASE WHEN blocked THEN 'blocked' ELSE 'unrestricted' END
        AS stock_type, uom, quantity
    FROM lots
    UNION ALL
    SELECT plant, material, 'unrestricted', uom, -quantity FROM issues
)
SELECT plant, material, stock_type, uom, CAST(sum(quantity) AS DECIMAL(38, 9))
FROM moves
GROUP BY plant, material, stock_type, uom
"""

POSTED_STOCK = "SELECT plant, material, stock_type, uom, quantity FROM stock"

# future_time and parked_expired are decided on the host clock. A replay, or a restart
# from a checkpoint before the rejection, reads another clock and may apply the event,
# so a dead letter of an applied event with one of these reasons is counted, not
# reported as a difference. A lost_at_site letter sits at the position of the message
# after the lost ones, which is applied or rejected on its own.

# Each check returns rows that are differences; an empty result passes.
OUTCOME_CHECKS: dict[str, str] = {
    "applied more than once": """
        SELECT plant, event_id, count(*) FROM events WHERE status = 'applied'
        GROUP BY plant, event_id HAVING count(*) > 1
    """,
    "unknown status": """
        SELECT plant, event_id, status FROM events
        WHERE status NOT IN ('applied', 'parked', 'duplicate', 'dead_letter')
    """,
    "duplicate of nothing": """
        SELECT d.plant, d.event_id, d.stream_seq FROM events AS d
        WHERE d.status = 'duplicate' AND NOT EXISTS (
            SELECT 1 FROM events AS e
            WHERE e.plant = d.plant AND e.event_id = d.event_id
                AND e.status IN ('applied', 'parked', 'dead_letter')
        )
    """,
    "dead letter missing": """
        SELECT e.plant, e.event_id, e.stream_seq, e.reason FROM events AS e
        WHERE e.status = 'dead_letter' AND NOT EXISTS (
            SELECT 1 FROM dead_letters AS d
            WHERE d.stream_seq = e.stream_seq AND d.reason = e.reason
                AND coalesce(d.batch_index, -1) = e.batch_index
        )
    """,
    "dead letter of an applied event": """
        SELECT e.plant, e.event_id, e.stream_seq, d.reason FROM events AS e
        JOIN dead_letters AS d
            ON d.stream_seq = e.stream_seq
            AND coalesce(d.batch_index, -1) = e.batch_index
        WHERE e.status = 'applied'
            AND d.reason NOT IN ('future_time', 'parked_expired', 'lost_at_site')
    """,
    "parked but not reported": """
        SELECT e.plant, e.event_id, e.stream_seq FROM events AS e
        WHERE e.status = 'parked' AND NOT EXISTS (
            SELECT 1 FROM parked_events AS p
            WHERE p.event_id = e.event_id AND p.status = 'parked'
        )
    """,
    "reported parked but not parked": """
        SELECT p.plant, p.event_id, p.stream_seq FROM parked_events AS p
        WHERE p.status = 'parked' AND NOT EXISTS (
            SELECT 1 FROM events AS e
            WHERE e.plant = p.plant AND e.event_id = p.event_id
                AND e.status = 'parked'
        )
    """,
    "posting without applied event": """
        SELECT p.plant, p.key, p.lineage[1] FROM postings AS p
        WHERE NOT EXISTS (
            SELECT 1 FROM events AS e
            WHERE e.plant = p.plant AND e.event_id = p.lineage[1]
                AND e.status = 'applied'
        )
    """,
    "order output differs": """
        WITH applied AS (SELECT * FROM events WHERE status = 'applied'),
        good AS (
            SELECT a.plant, a.order_id, sum(a.quantity) AS quantity
            FROM applied AS a
            WHERE a.event_type = 'production_confirmed'
                AND NOT EXISTS (
                    SELECT 1 FROM applied AS c
                    WHERE c.event_type = 'production_cancelled'
                        AND c.plant = a.plant AND c.order_id = a.order_id
                        AND c.refers_to = a.event_id
                )
            GROUP BY a.plant, a.order_id
        )
        SELECT o.plant, o.order_id, o.good_quantity, coalesce(g.quantity, 0)
        FROM orders AS o
        LEFT JOIN good AS g USING (plant, order_id)
        WHERE o.good_quantity <> coalesce(g.quantity, 0)
    """,
}


@dataclass(frozen=True)
class Difference:
    """One disagreement: the check that found it and the row that shows it."""

    check: str
    detail: str


def _stock_differences(connection: duckdb.DuckDBPyConnection) -> list[Difference]:
    expected = {
        tuple(row[:4]): row[4] for row in connection.execute(EXPECTED_STOCK).fetchall()
    }
    posted = {
        tuple(row[:4]): row[4] for row in connection.execute(POSTED_STOCK).fetchall()
    }
    differences = []
    for key in sorted(expected.keys() | posted.keys()):
        want = expected.get(key) or 0
        have = posted.get(key) or 0
        if want != have:
            plant, material, stock_type, uom = key
            differences.append(
                Difference(
                    "stock",
                    f"plant {plant} material {material} {stock_type}: postings "
                    f"{have} {uom}, events imply {want} {uom}",
                )
            )
    return differences


def reconcile(connection: duckdb.DuckDBPyConnection) -> list[Difference]:
    """Run every check on an open snapshot file and return the differences found."""
    differences = _stock_differences(connection)
    for check, sql in OUTCOME_CHECKS.items():
        for row in connection.execute(sql).fetchall():
            differences.append(Difference(check, ", ".join(map(_text, row))))
    return differences


MAX_SEQUENCES_SHOWN = 5
"""Stream sequences printed for a key stored more than once; the rest are counted."""

BODY_CHUNK = 10_000
"""Maximum number of decoded postings that wait for one query of the file's rows.

It bounds the decoded bodies held at once. Each query scans table `postings`, so a
smaller chunk means more scans."""

POSTING_COLUMNS: tuple[str, ...] = tuple(TABLES["postings"].schema.names)
"""Columns of table `postings`, each compared with the posting body of the row's key."""

_POSTING_ROWS = (
    "SELECT "  # noqa: S608 (the column names come from the table spec)
    + ", ".join(f'"{column}"' for column in POSTING_COLUMNS)
    + " FROM postings WHERE key IN (SELECT unnest(?))"
)


@dataclass
class DifferenceSample:
    """The differences one check found: the first `limit` in full, and a count of all.

    Every body in a stream of a million postings can differ from the file, but only
    the first differences are printed, so the rest are counted and not kept.
    """

    check: str
    limit: int
    examples: list[Difference] = field(default_factory=list)
    count: int = 0

    def add(self, detail: str) -> None:
        """Count one difference, and keep it as an example while fewer than `limit`
        are kept."""
        self.count += 1
        if len(self.examples) < self.limit:
            self.examples.append(Difference(self.check, detail))

    @property
    def omitted(self) -> int:
        """Number of differences counted but not kept."""
        return self.count - len(self.examples)


class PostingBodies:
    """Comparison of each posting decoded from ERP_POSTINGS with the file's row of its
    key.

    Decoded postings wait in a chunk of up to BODY_CHUNK, and one query reads the rows
    of the chunk's keys, so memory does not grow with the stream. Every copy of a key
    that the stream stores more than once is compared.
    """

    def __init__(
        self, connection: duckdb.DuckDBPyConnection, max_examples: int
    ) -> None:
        self._connection = connection
        self._pending: list[tuple[int, Posting]] = []
        self.compared = 0
        """Number of bodies compared with a row of the file, which leaves out the
        bodies whose key the file lacks."""
        self.differing = DifferenceSample(
            f"posting in {POSTINGS_STREAM} differs from the file", max_examples
        )
        self.undecodable = DifferenceSample(
            f"message in {POSTINGS_STREAM} does not decode as a posting", max_examples
        )

    def add(self, sequence: int, posting: Posting) -> None:
        """Queue the posting at stream `sequence`, and compare the chunk once full."""
        self._pending.append((sequence, posting))
        if len(self._pending) >= BODY_CHUNK:
            self.flush()

    def add_undecodable(self, sequence: int, key: str, error: str) -> None:
        """Count the body at stream `sequence` that has `key` but does not decode as a
        posting."""
        self.undecodable.add(
            f"{key} at stream sequence {sequence}: {error} "
            "(`plantstream schema postings` prints the posting contract)"
        )

    def flush(self) -> None:
        """Compare every queued posting with the file's row of its key."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        rows = self._rows_of({posting.key for _, posting in pending})
        for sequence, posting in pending:
            row = rows.get(posting.key)
            if row is None:
                continue  # reported as a key that the file lacks
            self.compared += 1
            fields = field_differences(posting, row)
            if fields:
                self.differing.add(
                    f"{posting.key} at stream sequence {sequence}: " + "; ".join(fields)
                )

    def omitted(self) -> Counter[str]:
        """Return, per check, the number of differences counted but not kept."""
        return Counter(
            {
                sample.check: sample.omitted
                for sample in (self.differing, self.undecodable)
                if sample.omitted
            }
        )

    def differences(self) -> list[Difference]:
        """Return the differences kept, after comparing the queued postings."""
        self.flush()
        return self.differing.examples + self.undecodable.examples

    def _rows_of(self, keys: set[str]) -> dict[str, dict[str, Any]]:
        result = self._connection.execute(_POSTING_ROWS, [sorted(keys)])
        rows = (
            dict(zip(POSTING_COLUMNS, row, strict=True)) for row in result.fetchall()
        )
        return {row["key"]: row for row in rows}


def posting_row(posting: Posting) -> dict[str, Any]:
    """Return the row of table `postings` that a partition stores for `posting`.

    The columns of the other posting type are null. A confirmation's posting date,
    time and reference are the date and time of `finished_at` and its first lineage
    event. The table has no column for document_date, movement_indicator, reason,
    item_text and started_at, so those fields are not compared.
    """
    # NOTE: this repeats `_postings_table` in actors/partition_state.py, which builds
    # the stored rows column by column on the hot path and cannot take a body that
    # breaks the contract's ranges. A column changed in one must change in the other.
    # The clean run in tests/test_reconcile.py reports a difference when they disagree.
    row: dict[str, Any] = dict.fromkeys(POSTING_COLUMNS)
    row.update(
        key=posting.key,
        plant=posting.plant,
        order_id=posting.order,
        uom=posting.uom,
        reverses=posting.reverses,
        lineage=posting.lineage,
    )
    if isinstance(posting, GoodsMovement):
        row.update(
            posting_type="goods_movement",
            movement_type=posting.movement_type,
            material=posting.material,
            quantity=posting.quantity,
            stock_type=posting.stock_type,
            batch=posting.batch,
            storage_location=posting.storage_location,
            posting_date=posting.posting_date,
            occurred_at=posting.occurred_at,
            reference=posting.reference,
        )
    else:
        row.update(
            posting_type="order_confirmation",
            operation=posting.operation,
            work_center=posting.work_center,
            yield_quantity=posting.yield_quantity,
            scrap_quantity=posting.scrap_quantity,
            rework_quantity=posting.rework_quantity,
            final=posting.final,
            posting_date=posting.finished_at.date(),
            occurred_at=posting.finished_at,
            # The contract allows an empty lineage, which no partition writes.
            reference=posting.lineage[0] if posting.lineage else None,
        )
    return row


def field_differences(posting: Posting, stored: dict[str, Any]) -> list[str]:
    """Return "<column> <value> in the stream, <value> in the file" for each column
    where the file's row `stored` differs from the row `posting` should have."""
    expected = posting_row(posting)
    return [
        f"{column} {_value_text(expected[column])} in the stream, "
        f"{_value_text(stored[column])} in the file"
        for column in POSTING_COLUMNS
        if not _same_value(expected[column], stored[column])
    ]


def _same_value(sent: Any, stored: Any) -> bool:
    # Decimals compare by value, so "5" in a body equals 5.000000000 in the file's
    # DECIMAL(38, 9). Datetimes with a UTC offset compare as instants, whatever the
    # offsets, and one without an offset equals none of the file's.
    if isinstance(sent, Decimal):
        # == raises InvalidOperation on a signalling NaN, which a body may contain.
        return isinstance(stored, Decimal) and not sent.is_nan() and sent == stored
    if isinstance(stored, list):
        return tuple(stored) == sent  # DuckDB returns the lineage as a list
    return bool(sent == stored)


def _value_text(value: Any) -> str:
    if isinstance(value, Decimal) and value.is_finite():
        return format(value.normalize(), "f")
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return f"{value.isoformat()} (no UTC offset)"
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, str | tuple | list):
        return repr(list(value) if isinstance(value, tuple) else value)
    return _text(value)


class _PostingKey(msgspec.Struct):
    """The key of a body that does not decode as a posting, read so that the message
    is counted under it."""

    key: str


_decode_posting_key = msgspec.json.Decoder(_PostingKey).decode

_Decoded = TypeVar("_Decoded")


def _decode_body(decode: Callable[[bytes], _Decoded], data: bytes) -> _Decoded:
    """Call `decode` on a message body, and raise msgspec.DecodeError for JSON nested
    too deeply as well."""
    try:
        return decode(data)
    except RecursionError:
        # msgspec raises RecursionError for JSON nested near Python's recursion limit.
        raise msgspec.DecodeError(
            "JSON nested too deeply to decode. A posting is one object whose values "
            "nest at most two levels"
        ) from None


@dataclass
class StreamPostings:
    """The messages of ERP_POSTINGS, counted by the `key` in each message body, with
    each body handed to `bodies` for comparison with the file."""

    bodies: PostingBodies
    messages: int = 0
    first_sequence: dict[str, int] = field(default_factory=dict)
    """Stream sequence of the first message with each key."""
    repeated: dict[str, list[int]] = field(default_factory=dict)
    """Stream sequences of every copy, for each key stored more than once."""
    id_mismatches: list[tuple[int, str | None, str]] = field(default_factory=list)
    """(sequence, Nats-Msg-Id or None, key) of messages whose Nats-Msg-Id is not
    their key."""
    without_key: list[tuple[int, str | None, str]] = field(default_factory=list)
    """(sequence, Nats-Msg-Id or None, decode error) of messages with no posting key."""

    def add(self, sequence: int, msg_id: str | None, data: bytes) -> None:
        """Count one message, read in stream order."""
        self.messages += 1
        key = self._decode_key(sequence, msg_id, data)
        if key is None:
            return
        if msg_id != key:
            self.id_mismatches.append((sequence, msg_id, key))
        first = self.first_sequence.setdefault(key, sequence)
        if first != sequence:
            self.repeated.setdefault(key, [first]).append(sequence)

    def _decode_key(self, sequence: int, msg_id: str | None, data: bytes) -> str | None:
        """Hand the body to `bodies` and return its key, or None if it has none."""
        try:
            posting = _decode_body(decode_posting, data)
        except msgspec.DecodeError as error:
            try:
                key = _decode_body(_decode_posting_key, data).key
            except msgspec.DecodeError as key_error:
                self.without_key.append((sequence, msg_id, str(key_error)))
                return None
            # Counted under its key all the same, so that the file's row of the key
            # is not also reported as missing from the stream.
            self.bodies.add_undecodable(sequence, key, str(error))
            return key
        self.bodies.add(sequence, posting)
        return posting.key


def stream_differences(
    connection: duckdb.DuckDBPyConnection, stream: StreamPostings
) -> list[Difference]:
    """Compare the posting keys in the file with those in `stream`, then report the
    keys that the stream stores more than once and its messages with a wrong
    Nats-Msg-Id or no posting key. Last come the bodies that differ from the file's
    row or do not decode as a posting.

    Of those two checks only the first differences are returned, and
    `stream.bodies.omitted()` counts the others.
    """
    body_differences = stream.bodies.differences()
    in_file = {
        key for (key,) in connection.execute("SELECT key FROM postings").fetchall()
    }
    in_stream = stream.first_sequence.keys()
    differences = [
        Difference(f"posting in {POSTINGS_STREAM} but not in the file", key)
        for key in sorted(in_stream - in_file)
    ]
    differences += [
        Difference(f"posting in the file but not in {POSTINGS_STREAM}", key)
        for key in sorted(in_file - in_stream)
    ]
    return differences + _stream_message_differences(stream) + body_differences


def _stream_message_differences(stream: StreamPostings) -> list[Difference]:
    differences = [
        Difference(
            f"posting stored more than once in {POSTINGS_STREAM}",
            _copies_text(key, sequences),
        )
        for key, sequences in sorted(stream.repeated.items())
    ]
    for sequence, msg_id, key in stream.id_mismatches:
        detail = (
            f"stream sequence {sequence}: Nats-Msg-Id {_msg_id_text(msg_id)}, key {key}"
        )
        differences.append(
            Difference("Nats-Msg-Id differs from the key in the body", detail)
        )
    for sequence, msg_id, error in stream.without_key:
        detail = (
            f"stream sequence {sequence}, Nats-Msg-Id {_msg_id_text(msg_id)}: {error}"
        )
        differences.append(
            Difference(f"message in {POSTINGS_STREAM} without a posting key", detail)
        )
    return differences


def _copies_text(key: str, sequences: list[int]) -> str:
    listed = ", ".join(map(str, sequences[:MAX_SEQUENCES_SHOWN]))
    if len(sequences) > MAX_SEQUENCES_SHOWN:
        listed += f" and {len(sequences) - MAX_SEQUENCES_SHOWN} more"
    return f"{key}: {len(sequences)} copies, at stream sequences {listed}"


def _msg_id_text(msg_id: str | None) -> str:
    return msg_id if msg_id else "missing"


async def _read_postings_stream(url: str, postings: StreamPostings) -> str:
    """Add every message in ERP_POSTINGS to `postings`, and return the identity of the
    server's plant events stream."""
    # Imported here: reconcile without --nats-url needs no NATS client.
    import nats.js.errors
    from nats.js.api import Header

    from cluster.job import connect_nats, events_stream_identity
    from cluster.operations import iter_stream

    nc = await connect_nats(url)
    try:
        js = nc.jetstream()
        stream = EVENTS_STREAM
        try:
            identity = await events_stream_identity(js)
            stream = POSTINGS_STREAM
            # The bodies are read, not only the headers, because a copy stored under
            # another Nats-Msg-Id is only recognised by the key inside it.
            async for message in iter_stream(
                js, POSTINGS_STREAM, f"{POSTINGS_PREFIX}.>"
            ):
                msg_id = (message.headers or {}).get(Header.MSG_ID)
                postings.add(message.metadata.sequence.stream, msg_id, message.data)
            return identity
        except nats.js.errors.NotFoundError:
            raise ValueError(
                f"{url} has no {stream} stream, so no plantstream run wrote there; "
                "pass the server the file was written from"
            ) from None
    finally:
        await nc.close()


def _text(value: Any) -> str:
    return "null" if value is None else str(value)


# Dead letters without a ledger row: the ingest rejected them before any partition saw
# them (no valid key, or a subject of another plant or event type), or the partition
# could not decode them into an event. The run summary counts them; the ledger cannot.
# A clock rejection whose event was applied later has a ledger row, counted apart.
DEAD_LETTERS_OUTSIDE_LEDGER = """
    SELECT d.reason, count(*) FROM dead_letters AS d
    WHERE d.reason != 'lost_at_site' AND NOT EXISTS (
        SELECT 1 FROM events AS e
        WHERE e.stream_seq = d.stream_seq
            AND e.batch_index = coalesce(d.batch_index, -1)
            AND (
                (e.status = 'dead_letter' AND e.reason = d.reason)
                OR (
                    e.status = 'applied'
                    AND d.reason IN ('future_time', 'parked_expired')
                )
            )
    )
    GROUP BY d.reason ORDER BY d.reason
"""


APPLIED_AFTER_CLOCK_REJECTION = """
    SELECT d.reason, count(*) FROM events AS e
    JOIN dead_letters AS d
        ON d.stream_seq = e.stream_seq
        AND coalesce(d.batch_index, -1) = e.batch_index
    WHERE e.status = 'applied' AND d.reason IN ('future_time', 'parked_expired')
    GROUP BY d.reason ORDER BY d.reason
"""


def _summary(connection: duckdb.DuckDBPyConnection) -> list[str]:
    """Return the ledger's counts by status and how they relate to the dead letters."""
    rows = connection.execute(
        "SELECT status, count(*) FROM events GROUP BY status ORDER BY status"
    ).fetchall()
    statuses = ", ".join(f"{status} {count}" for status, count in rows) or "no events"
    [(dead_letters,)] = connection.execute(
        "SELECT count(*) FROM dead_letters"
    ).fetchall()
    outside = connection.execute(DEAD_LETTERS_OUTSIDE_LEDGER).fetchall()
    reasons = ", ".join(f"{reason} {count}" for reason, count in outside)
    lines = [
        f"event ledger (one row per event a partition decoded): {statuses}",
        f"dead letters: {dead_letters} rows in table dead_letters, one per dead letter "
        f"sent to {DLQ_STREAM} (the figure the run summary prints)",
    ]
    if outside:
        lines.append(
            f"  {sum(count for _, count in outside)} of them have no ledger row, "
            f"because they were rejected before a partition decoded them into an "
            f"event: {reasons}"
        )
    lost = connection.execute(
        "SELECT detail FROM dead_letters WHERE reason = 'lost_at_site' "
        "ORDER BY stream_seq"
    ).fetchall()
    if lost:
        # Not a difference between postings and events: the events never arrived, so
        # nothing here can check them. But nothing may go unreported either.
        lines.append(
            f"  WARNING: {len(lost)} of them report messages a plant site dropped "
            "before the hub copied them; their events are missing from this file and "
            f"from the postings. The first: {lost[0][0]}"
        )
    applied_later = connection.execute(APPLIED_AFTER_CLOCK_REJECTION).fetchall()
    if applied_later:
        counts = ", ".join(f"{reason} {count}" for reason, count in applied_later)
        lines.append(
            f"  {sum(count for _, count in applied_later)} of them were rejected on "
            "the host clock and their events applied later, by a replay or a restart "
            f"that read a later clock: {counts}"
        )
    return lines


def _stream_summary(url: str, postings: StreamPostings) -> list[str]:
    return [
        f"{POSTINGS_STREAM} on {url}: {postings.messages} messages with "
        f"{len(postings.first_sequence)} distinct posting keys, compared with the file "
        "by the key in each message body",
        f"  {postings.bodies.compared} message bodies compared column by column with "
        "the file's row of their key",
    ]


def _print_differences(
    differences: list[Difference], omitted: Counter[str], limit: int
) -> None:
    """Print the first `limit` differences and the count of each check.

    `omitted` counts, per check, the differences that were found but not kept.
    """
    for difference in differences[:limit]:
        print(f"DIFFERENCE {difference.check}: {difference.detail}")
    total = len(differences) + omitted.total()
    if total > limit:
        print(f"... and {total - limit} more")
    # Counted per check, because the lines printed above may all come from the first
    # checks.
    checks = Counter(difference.check for difference in differences)
    checks.update(omitted)
    counts = ", ".join(f"{check} {count}" for check, count in checks.items())
    print(f"reconcile: {total} differences ({counts})")


def _run(args: argparse.Namespace) -> int:
    try:
        connection = open_for_reading(args.db)
    except (FileNotFoundError, SinkError) as error:
        print(f"plantstream reconcile: {error}", file=sys.stderr)
        return 2
    omitted: Counter[str] = Counter()
    try:
        differences = reconcile(connection)
        summary = _summary(connection)
        [(events,)] = connection.execute("SELECT count(*) FROM events").fetchall()
        [(site_losses,)] = connection.execute(
            "SELECT count(*) FROM dead_letters WHERE reason = 'lost_at_site'"
        ).fetchall()
        if args.nats_url is not None:
            postings = StreamPostings(PostingBodies(connection, args.max_differences))
            identity = asyncio.run(_read_postings_stream(args.nats_url, postings))
            recorded = recorded_source(connection)
            if recorded is not None and recorded.stream != identity:
                # Generated streams repeat their posting keys, so the keys alone
                # would agree with another server's postings.
                print(
                    f"plantstream reconcile: {args.db} contains the snapshots of "
                    f"{recorded.stream}, but {args.nats_url} has {identity}; pass "
                    "the server the file was written from",
                    file=sys.stderr,
                )
                return 2
            differences += stream_differences(connection, postings)
            omitted = postings.bodies.omitted()
            summary += _stream_summary(args.nats_url, postings)
    except duckdb.CatalogException as error:
        print(
            f"plantstream reconcile: {args.db} lacks a table or view the check needs "
            f"({error}); it was written by an older plantstream, so run the job again "
            "into a new file",
            file=sys.stderr,
        )
        return 2
    finally:
        connection.close()
    for line in summary:
        print(line)
    if differences or omitted:
        _print_differences(differences, omitted, args.max_differences)
        return 1
    if not events:
        # Nothing disagrees in an empty file, but saying so would pass a file that a
        # run never wrote to, such as one created beside the one it writes.
        print(
            f"reconcile: {args.db} holds no events, so nothing was checked; pass the "
            "file plantstream run or demo writes"
        )
        return 1
    if site_losses:
        # The postings agree with the events the file has, but a script that reads
        # only the exit code must still learn that some events never arrived.
        print(
            "reconcile: postings agree with the events, but a plant site lost "
            "messages before the hub copied them (WARNING above)"
        )
        return 3
    print("reconcile: postings agree with the events")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the `reconcile` subcommand on the CLI's subparsers."""
    parser = commands.add_parser(
        "reconcile",
        help="check that the postings in a snapshot file agree with its events",
        description="Recompute stock per plant, material and stock type from the event "
        "ledger, compare it with the posted stock, and check that every event was "
        "applied once, parked or dead-lettered. With --nats-url, also compare the "
        "file's postings with ERP_POSTINGS, by key and then column by column, and "
        "check that the stream stores each posting once, under its key as "
        "Nats-Msg-Id. Prints the differences and a "
        "count per check; exits 1 if there is any or if the file holds no events, 2 "
        "if it cannot be read, and 3 if the postings agree but a plant site lost "
        "messages before the hub copied them (dead letters of reason lost_at_site).",
    )
    parser.add_argument(
        "--db",
        type=Path,
        default=Path("out/plantstream.duckdb"),
        help="DuckDB snapshot file to check (default: %(default)s)",
    )
    parser.add_argument(
        "--nats-url",
        help="also compare the file's postings with those in ERP_POSTINGS on this "
        "server, by key and then every column of each message body, and report keys "
        "the stream stores more than once; run it "
        "while the ingest is stopped or has drained the stream, because the file lags "
        "the stream until the next checkpoint",
    )
    parser.add_argument(
        "--max-differences",
        type=int,
        default=50,
        help="differences to print before summarising the rest (default: %(default)s)",
    )
    parser.set_defaults(handler=_run)
