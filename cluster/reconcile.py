"""`plantstream reconcile`: prove that the postings agree with the deduplicated events.

The check reads only the DuckDB snapshot file. It recomputes the stock every plant,
material and stock type should have from the event ledger (`events`), with rules of its
own that are simpler than the actors' (docs/semantics.md, "Reconciliation"), and
compares the result with the `stock` view, which sums the postings. It also checks that
every event has exactly one outcome: applied once, parked, or dead-lettered.

With `--nats-url` it also compares the postings in the file with those in ERP_POSTINGS,
by the idempotency key in each message body, so that a posting the ERP received but the
file lacks, or the reverse, shows up too. It also reports a key that the stream stores
more than once, which happens when a posting is published again after the stream's
duplicate window, and a message whose Nats-Msg-Id is not its body's key.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import msgspec

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


class _PostingKey(msgspec.Struct):
    """The only field of a posting body that the stream comparison decodes."""

    key: str


_decode_posting_key = msgspec.json.Decoder(_PostingKey).decode


@dataclass
class StreamPostings:
    """The messages of ERP_POSTINGS, counted by the `key` in each message body."""

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
        try:
            key = _decode_posting_key(data).key
        except msgspec.DecodeError as error:
            self.without_key.append((sequence, msg_id, str(error)))
            return
        if msg_id != key:
            self.id_mismatches.append((sequence, msg_id, key))
        first = self.first_sequence.setdefault(key, sequence)
        if first != sequence:
            self.repeated.setdefault(key, [first]).append(sequence)


def stream_differences(
    connection: duckdb.DuckDBPyConnection, stream: StreamPostings
) -> list[Difference]:
    """Compare the posting keys in the file with those in `stream`, then report the
    keys that the stream stores more than once and its messages with a wrong
    Nats-Msg-Id or no posting key."""
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
    return differences + _stream_message_differences(stream)


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


async def _read_postings_stream(url: str) -> tuple[str, StreamPostings]:
    """Read every message in ERP_POSTINGS and return them counted by key, with the
    identity of the server's plant events stream."""
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
            postings = StreamPostings()
            # The bodies are read, not only the headers, because a copy stored under
            # another Nats-Msg-Id is only recognised by the key inside it.
            async for message in iter_stream(
                js, POSTINGS_STREAM, f"{POSTINGS_PREFIX}.>"
            ):
                msg_id = (message.headers or {}).get(Header.MSG_ID)
                postings.add(message.metadata.sequence.stream, msg_id, message.data)
            return identity, postings
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


def _run(args: argparse.Namespace) -> int:
    try:
        connection = open_for_reading(args.db)
    except (FileNotFoundError, SinkError) as error:
        print(f"plantstream reconcile: {error}", file=sys.stderr)
        return 2
    try:
        differences = reconcile(connection)
        summary = _summary(connection)
        [(events,)] = connection.execute("SELECT count(*) FROM events").fetchall()
        if args.nats_url is not None:
            identity, postings = asyncio.run(_read_postings_stream(args.nats_url))
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
            summary.append(
                f"{POSTINGS_STREAM} on {args.nats_url}: {postings.messages} messages "
                f"with {len(postings.first_sequence)} distinct posting keys, compared "
                "with the file by the key in each message body"
            )
            differences += stream_differences(connection, postings)
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
    for difference in differences[: args.max_differences]:
        print(f"DIFFERENCE {difference.check}: {difference.detail}")
    if len(differences) > args.max_differences:
        print(f"... and {len(differences) - args.max_differences} more")
    if differences:
        # Counted per check, because the lines printed above may all come from the
        # first checks.
        checks = Counter(difference.check for difference in differences)
        counts = ", ".join(f"{check} {count}" for check, count in checks.items())
        print(f"reconcile: {len(differences)} differences ({counts})")
        return 1
    if not events:
        # Nothing disagrees in an empty file, but saying so would pass a file that a
        # run never wrote to, such as one created beside the one it writes.
        print(
            f"reconcile: {args.db} holds no events, so nothing was checked; pass the "
            "file plantstream run or demo writes"
        )
        return 1
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
        "file's postings with ERP_POSTINGS and check that the stream stores each "
        "posting once, under its key as Nats-Msg-Id. Prints the differences and a "
        "count per check; exits 1 if there is any or if the file holds no events, 2 "
        "if it cannot be read.",
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
        "server, by key, and report keys the stream stores more than once; run it "
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
