"""DuckDB snapshot sink: upserts the actors' record batches into one database file.

DuckDB lets one process open a file for writing, and a read-only connection in another
process conflicts with it, because both take a file lock (DuckDB 2.0.1). So that
analysts can query the file while the pipeline runs, the writer keeps the file open
only while it writes:

1. `write` validates every batch against `contracts.snapshots.TABLES` before it touches
   the file.
2. It opens the file, retrying with bounded backoff while a reader holds the lock.
3. It upserts all tables in one transaction and commits, so a crash before the commit
   leaves the previous state. DuckDB replays only committed WAL entries on the next
   open. Rows of the two largest tables, the event ledger and the postings, are nearly
   always new, and are inserted without the upsert's lookup (`_NEW_ROWS`).
4. It closes the file, which releases the lock for readers.

Readers use `open_for_reading`, which retries the same way, and should close their
connection soon, because an open reader blocks the next write.

DuckDB 2.0 also offers a server mode (the `quack` extension) in which the pipeline
would keep the file open and analysts would attach over HTTP. It is not used here,
because the extension is not bundled with the Python package and is downloaded on first
use.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from contracts.snapshots import TABLES, TableSpec

from .views import MACROS, VIEWS

__all__ = [
    "DEFAULT_LOCK_TIMEOUT_S",
    "DatabaseLockedError",
    "SOURCE_TABLE",
    "SchemaMismatchError",
    "SinkError",
    "SnapshotBehindError",
    "SnapshotSource",
    "SnapshotWriteError",
    "SnapshotWriter",
    "SourceMismatchError",
    "check_not_folder",
    "duckdb_type",
    "merge_tables",
    "open_for_reading",
    "read_source",
    "recorded_source",
]

logger = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT_S = 30.0
"""Seconds to wait for another process to release the file before giving up."""

# Backoff between lock attempts: short at first because a write holds the file for
# tens of milliseconds, capped so that a waiting process notices a released lock within
# half a second.
_FIRST_BACKOFF_S = 0.01
_MAX_BACKOFF_S = 0.5

# Cost of opening and closing per write, measured with DuckDB 2.0.1 on a 2-core Linux
# VM by upserting 1,000 `orders` rows per write into a file that contains 100,000 rows:
# a write takes about 27 ms, against 8 ms for the same upsert and commit on a connection
# kept open. The difference is mostly the open (about 11 ms, loading the catalog and the
# primary key index). The close, with its checkpoint, takes 2 to 3 ms. At one write per
# second the writer holds the file under 3% of the time, which leaves readers the rest.
PER_PARTITION_TABLES = ("plant_clocks",)
"""Tables whose primary key includes the partition: each partition writes its own
rows."""

_ROW_INDEX = "__plantstream_row"

_NEW_ROWS: dict[str, str] = {"events": "stream_seq", "postings": "insert_first"}
"""Tables whose rows are usually new, and how the writer finds the new ones.

An upsert costs more than a plain insert, mostly in the primary key lookups. With
DuckDB 2.0.1 on the 2-core benchmark machine, writing the ledger rows and postings of
151,000 generated events in four writes took 1.1 s with upserts and 0.84 s with plain
inserts, commits included. So:

- "stream_seq": a row whose stream_seq is above the highest one in the table cannot
  be stored yet, and is inserted. Lower ones (an event parked at one checkpoint and
  applied at a later one, or the messages after a restart) are upserted.
- "insert_first": every row is inserted. A posting is stored a second time only after
  a restart or a replay, when the insert fails on the primary key and the whole write
  runs again with upserts.
"""

WRITER_THREADS = 1
"""DuckDB threads of the writing connection. The writer runs beside the ingest loop and
the partition actors. On the 2-core benchmark machine, one thread took 17% less CPU
than two for the same snapshot writes, in about the same time. Readers keep DuckDB's
default."""


WRITER_NICENESS = 10
"""How much lower than the ingest's the CPU priority of the background write thread is
(Linux only, see `write_in_background`). The ingest loop and the partition actors
publish postings, while the write only has to finish before the next checkpoint
commits. On the 2-core benchmark machine, at half the maximum throughput, a lower
priority took 10 to 30 ms off the p99 from publish to posting stored. That is from
three A/B comparisons, medians of three or four runs each. Leaving the DuckDB write
out altogether took 25 ms off, and each run's p99 still varied by about 50 ms."""


SOURCE_TABLE = "plantstream_source"
"""Table with one row that names the plant events stream the file's snapshots come
from, the command that first wrote them, and the stream sequence they cover."""


@dataclass(frozen=True)
class SnapshotSource:
    """The plant events stream a snapshot file belongs to."""

    stream: str
    """The stream's name and creation time. A stream deleted and created again gets a
    new time, and its sequence numbers start over."""
    written_by: str
    """The command that writes the file: "run" or "demo"."""


def recorded_source(connection: duckdb.DuckDBPyConnection) -> SnapshotSource | None:
    """Return the source recorded in the open snapshot file, or None if it has none."""
    row = connection.execute(
        f"SELECT stream, written_by FROM {SOURCE_TABLE} LIMIT 1"  # noqa: S608
    ).fetchone()
    return None if row is None else SnapshotSource(row[0], row[1])


def read_source(path: Path) -> SnapshotSource | None:
    """Return the source recorded in the snapshot file `path`, or None when the file
    does not exist or records none."""
    if not Path(path).exists():
        return None
    connection = open_for_reading(path)
    try:
        found = connection.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
            [SOURCE_TABLE],
        ).fetchone()
        if not found or not found[0]:
            return None
        return recorded_source(connection)
    finally:
        connection.close()


class SinkError(Exception):
    """Base class of the snapshot sink's errors."""


class SnapshotBehindError(ValueError):
    """An error for a snapshot file whose rows end before the resumed checkpoint.

    Not a SinkError, which the ingest retries, because the rows in between are missing
    from the file for good and only the operator can choose how to get them back.
    """

    def __init__(self, path: Path, through_seq: int, checkpoint_seq: int) -> None:
        coverage = (
            "contains no snapshot rows yet"
            if through_seq == 0
            else f"contains snapshot rows up to stream sequence {through_seq} only"
        )
        super().__init__(
            f"{path} {coverage}, but the checkpoint in NATS covers the plant events "
            f"up to sequence {checkpoint_seq}, so the rows of the events in between "
            "would be missing from it for good. Pass the --db file the earlier runs "
            "wrote. To build this file from the whole stream instead, stop every run "
            "and use `plantstream checkpoints reset --nats-url URL --yes` first "
            "(postings older than the postings stream's duplicate window are then "
            "stored twice)"
        )
        self.path = path
        self.through_seq = through_seq
        self.checkpoint_seq = checkpoint_seq


class SourceMismatchError(SinkError, ValueError):
    """The file contains the snapshots of another plant events stream."""

    def __init__(
        self, path: Path, recorded: SnapshotSource, source: SnapshotSource
    ) -> None:
        super().__init__(
            f"{path} contains the snapshots of the plant events stream "
            f"{recorded.stream} (written by plantstream {recorded.written_by}), but "
            f"this run reads {source.stream}; their rows would overwrite each other. "
            "Pass another --db, or move the file aside to start it over"
        )
        self.recorded = recorded
        self.source = source


class SchemaMismatchError(SinkError, ValueError):
    """A batch whose columns differ from its table's schema in `contracts.snapshots`."""

    def __init__(
        self,
        table: str,
        missing: Sequence[str],
        unexpected: Sequence[str],
        mismatched: Mapping[str, tuple[pa.DataType, pa.DataType]],
    ) -> None:
        self.table = table
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = dict(mismatched)
        problems = []
        if self.missing:
            problems.append(f"missing columns {self.missing}")
        if self.unexpected:
            problems.append(f"unexpected columns {self.unexpected}")
        for column, (expected, found) in self.mismatched.items():
            problems.append(f"column {column!r} has type {found}, expected {expected}")
        super().__init__(
            f"batch for table {table!r} does not match its schema: "
            f"{'; '.join(problems)}. Build it with contracts.snapshots.TABLES"
            f"[{table!r}].schema"
        )


class SnapshotWriteError(SinkError):
    """An error for a write that DuckDB failed to store, for instance because it could
    not create the write-ahead log beside the file. Nothing of the write was
    committed."""

    def __init__(self, path: Path, error: duckdb.Error) -> None:
        self.path = path
        detail = str(error).rstrip(".!")
        super().__init__(
            f"failed to write to DuckDB file {path}: {detail}. Nothing "
            "of this write was committed. DuckDB creates a .wal file beside the "
            f"database at each commit, so make the folder {path.parent} writable for "
            "this process and check that its disk has free space"
        )


class DatabaseLockedError(SinkError, TimeoutError):
    """Another process held the database file for longer than the lock timeout.

    Of DuckDB's error (`detail`), the message keeps only the process that holds the
    lock. DuckDB 2.0.1 also suggests opening the file read-only, which cannot help the
    writer, and a reader that timed out has opened it read-only already.
    """

    def __init__(
        self, path: Path, timeout_s: float, detail: str, *, read_only: bool = False
    ) -> None:
        self.path = path
        self.timeout_s = timeout_s
        if read_only:
            fix = (
                "Another connection has the file open for writing, which the pipeline "
                "does only while it writes. Close that connection or wait for its "
                "write to end, then run the query again"
            )
        else:
            fix = (
                "The pipeline cannot write while another connection has the file "
                "open, read-only or not. Close that connection (readers should open, "
                "query and close), and make sure only one pipeline writes to the file"
            )
        super().__init__(
            f"timed out after {timeout_s:.1f} s waiting for the lock on {path}: "
            f"{_lock_holder(detail)}. {fix}"
        )


def duckdb_type(arrow_type: pa.DataType) -> str:
    """Return the DuckDB column type for an Arrow type used in the snapshot schemas."""
    if pa.types.is_decimal(arrow_type):
        return f"DECIMAL({arrow_type.precision}, {arrow_type.scale})"
    if pa.types.is_timestamp(arrow_type):
        if arrow_type.tz is None:
            return "TIMESTAMP"
        return "TIMESTAMPTZ"
    if pa.types.is_list(arrow_type):
        return f"{duckdb_type(arrow_type.value_type)}[]"
    simple = {
        pa.string(): "VARCHAR",
        pa.bool_(): "BOOLEAN",
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
        pa.float64(): "DOUBLE",
        pa.date32(): "DATE",
        pa.binary(): "BLOB",
    }
    try:
        return simple[arrow_type]
    except KeyError:
        raise TypeError(
            f"Arrow type {arrow_type} has no DuckDB mapping in pipeline.sink; "
            "add it to duckdb_type"
        ) from None


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _create_table_sql(name: str, spec: TableSpec) -> str:
    columns = [f"{_quote(f.name)} {duckdb_type(f.type)}" for f in spec.schema]
    key = ", ".join(_quote(column) for column in spec.primary_key)
    body = ",\n    ".join([*columns, f"PRIMARY KEY ({key})"])
    return f"CREATE TABLE IF NOT EXISTS {_quote(name)} (\n    {body}\n)"


# The part of DuckDB's lock error that names the process holding the lock, as in
# "Conflicting lock is held in /usr/bin/python3.11 (PID 16616)" (DuckDB 2.0.1).
_LOCK_HOLDER = re.compile(r"Conflicting lock is held in .*? \(PID \d+\)")


_NEW_FILE_NOTE = (
    "A run that resumes from a checkpoint refuses a new file, because the rows of the "
    "events before the checkpoint would be missing; `plantstream checkpoints reset` "
    "lets the next run process the whole stream into it"
)


def _lock_holder(detail: str) -> str:
    """Return the lock holder from DuckDB's lock error, or the whole error."""
    match = _LOCK_HOLDER.search(detail)
    return detail if match is None else match.group(0)


def _roll_back(connection: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Roll back the open transaction, for a caller that then raises its own error."""
    try:
        connection.rollback()
    except duckdb.Error as error:
        # A failed commit has ended the transaction already, so DuckDB 2.0.1 rejects
        # the rollback with "no transaction is active". Raising that here would hide
        # the error that ended the transaction.
        logger.debug("rollback on DuckDB file %s failed: %s", path, error)


def _is_lock_conflict(error: duckdb.Error) -> bool:
    return "Could not set lock" in str(error)


_ACCESS_PROBLEMS = (
    "Read-only file system",
    "Permission denied",
    "Operation not permitted",
    "No space left on device",
)
"""Operating system errors, as DuckDB quotes them, which mean that the file could not
be written, not that it is not a DuckDB database."""


def _is_access_problem(detail: str) -> bool:
    return any(problem in detail for problem in _ACCESS_PROBLEMS)


def _connect(
    path: Path, *, read_only: bool, timeout_s: float
) -> duckdb.DuckDBPyConnection:
    """Open `path`, retrying with bounded backoff while another process holds it."""
    deadline = time.monotonic() + timeout_s
    delay = _FIRST_BACKOFF_S
    attempts = 0
    while True:
        try:
            connection = duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as exc:
            # A file DuckDB does not recognise can raise more than IOException. Opened
            # read-only, a JSON file fails with a CatalogException.
            if not (isinstance(exc, duckdb.IOException) and _is_lock_conflict(exc)):
                detail = str(exc).rstrip(".!")
                if _is_access_problem(detail):
                    # The file may be fine: moving it aside or resetting checkpoints,
                    # the advice for a file of another format, would only do harm.
                    raise SinkError(
                        f"cannot open DuckDB file {path}: {detail}. Make the file and "
                        f"its folder {path.parent} writable for this process, and "
                        "check that the disk has free space, then start again"
                    ) from exc
                fix = (
                    "pass the snapshot file plantstream run or demo writes"
                    if read_only
                    else "move it aside and let the writer create a new one. "
                    f"{_NEW_FILE_NOTE}"
                )
                raise SinkError(
                    f"cannot open DuckDB file {path}: {detail}. If the file is not a "
                    f"DuckDB database, {fix}"
                ) from exc
            attempts += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DatabaseLockedError(
                    path, timeout_s, str(exc), read_only=read_only
                ) from exc
            if attempts == 1:
                logger.info(
                    "DuckDB file %s is locked by another process, retrying for up to "
                    "%.1f s: %s",
                    path,
                    timeout_s,
                    _lock_holder(str(exc)),
                )
            else:
                logger.debug("DuckDB file %s still locked (attempt %d)", path, attempts)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, _MAX_BACKOFF_S)
            continue
        if attempts:
            logger.info("opened DuckDB file %s after %d lock retries", path, attempts)
        # Readers see TIMESTAMPTZ values in UTC, whatever the machine's local zone is.
        connection.execute("SET TimeZone = 'UTC'")
        return connection


def open_for_reading(
    path: Path | str, *, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
) -> duckdb.DuckDBPyConnection:
    """Open the snapshot file read-only, waiting up to `timeout_s` for a write to end.

    Close the connection as soon as the query is done: while it is open, the pipeline
    cannot write and waits, up to its own lock timeout.
    """
    path = Path(path)
    check_not_folder(path, "the file that plantstream run or demo writes")
    if not path.is_file():
        raise FileNotFoundError(
            f"snapshot file {path} not found; start the pipeline or pass the path of "
            "an existing file"
        )
    return _connect(path, read_only=True, timeout_s=timeout_s)


def check_not_folder(path: Path, expected: str) -> None:
    """Raise SinkError if `path` exists but is a folder or another non-regular file.

    `expected` describes the file to pass instead, for the message.
    """
    if path.is_dir():
        raise SinkError(
            f"snapshot file {path} is a folder, not a file; pass --db {expected}, "
            f"e.g. {path / 'plantstream.duckdb'}"
        )
    if path.exists() and not path.is_file():
        raise SinkError(
            f"snapshot file {path} is not a regular file; pass --db {expected}"
        )


def _as_table(
    name: str, data: pa.Table | pa.RecordBatch | Sequence[pa.RecordBatch]
) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    batches = list(data)
    for batch in batches:
        _check_schema(name, batch.schema)
    if not batches:
        return TABLES[name].schema.empty_table()
    return pa.Table.from_batches(batches)


def _check_schema(name: str, schema: pa.Schema) -> None:
    expected = TABLES[name].schema
    expected_types = {f.name: f.type for f in expected}
    found_types = {f.name: f.type for f in schema}
    missing = [column for column in expected_types if column not in found_types]
    unexpected = [column for column in found_types if column not in expected_types]
    mismatched = {
        column: (expected_types[column], found_types[column])
        for column in expected_types
        if column in found_types and found_types[column] != expected_types[column]
    }
    if missing or unexpected or mismatched:
        raise SchemaMismatchError(name, missing, unexpected, mismatched)


def _check_keys(name: str, table: pa.Table) -> None:
    for column in TABLES[name].primary_key:
        nulls = table.column(column).null_count
        if nulls:
            raise SinkError(
                f"batch for table {name!r} has {nulls} rows with a null {column!r}, "
                f"which is part of the primary key {TABLES[name].primary_key}; every "
                "key column needs a value"
            )


def _distinct_keys(table: pa.Table, key: Sequence[str]) -> int:
    """Return how many distinct values of the `key` columns `table` holds."""
    columns = list(key)
    return table.select(columns).group_by(columns).aggregate([]).num_rows


def _has_nested_columns(spec: TableSpec) -> bool:
    return any(pa.types.is_nested(field.type) for field in spec.schema)


def merge_tables(parts: list[dict[str, pa.Table]]) -> dict[str, pa.Table]:
    """Join the tables of each name across partitions, for one `write`."""
    merged: dict[str, list[pa.Table]] = {}
    for tables in parts:
        for name, table in tables.items():
            merged.setdefault(name, []).append(table)
    return {name: pa.concat_tables(tables) for name, tables in merged.items()}


class SnapshotWriter:
    """Upserts snapshot batches into a DuckDB file, one transaction per `write`.

    The constructor creates the file, its tables (from `contracts.snapshots.TABLES`) and
    its views if needed, and checks that existing tables have the expected columns. Only
    one process may write to a file; readers use `open_for_reading`.
    """

    def __init__(
        self,
        path: Path,
        *,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        source: SnapshotSource | None = None,
    ) -> None:
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self._closed = False
        self._thread: ThreadPoolExecutor | None = None
        self._high_seq: dict[str, int] = {}
        """Per table written by stream_seq, the highest stream_seq stored."""
        existed = self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = self._open()
        try:
            self._create_schema(connection)
            if source is not None:
                self._claim(connection, source)
        except duckdb.OperationalError as error:
            raise SnapshotWriteError(self.path, error) from error
        finally:
            connection.close()
        logger.info(
            "%s DuckDB snapshot file %s (%d tables, %d views)",
            "opened" if existed else "created",
            self.path,
            len(TABLES),
            len(VIEWS),
        )

    def _open(self) -> duckdb.DuckDBPyConnection:
        connection = _connect(self.path, read_only=False, timeout_s=self.lock_timeout_s)
        connection.execute(f"SET threads = {WRITER_THREADS}")
        return connection

    def _create_schema(self, connection: duckdb.DuckDBPyConnection) -> None:
        connection.begin()
        try:
            for name, spec in TABLES.items():
                connection.execute(_create_table_sql(name, spec))
                self._check_existing_table(connection, name, spec)
            for sql in MACROS.values():
                connection.execute(sql)
            for sql in VIEWS.values():
                connection.execute(sql)
            connection.execute(
                f"CREATE TABLE IF NOT EXISTS {SOURCE_TABLE} "
                "(stream VARCHAR NOT NULL, written_by VARCHAR NOT NULL)"
            )
            # Files written before the column existed get it empty, so their coverage
            # is unknown until the next write records it.
            connection.execute(
                f"ALTER TABLE {SOURCE_TABLE} "
                "ADD COLUMN IF NOT EXISTS through_seq BIGINT"
            )
            connection.commit()
        except BaseException:
            _roll_back(connection, self.path)
            raise

    def _claim(
        self, connection: duckdb.DuckDBPyConnection, source: SnapshotSource
    ) -> None:
        # Snapshot rows are keyed by stream sequence among others, so the rows of a
        # second stream would overwrite and mix with those of the first.
        recorded = recorded_source(connection)
        if recorded is None:
            connection.execute(
                f"INSERT INTO {SOURCE_TABLE} (stream, written_by, through_seq) "  # noqa: S608
                "VALUES (?, ?, 0)",
                [source.stream, source.written_by],
            )
            return
        if recorded.stream != source.stream:
            raise SourceMismatchError(self.path, recorded, source)

    def _check_existing_table(
        self, connection: duckdb.DuckDBPyConnection, name: str, spec: TableSpec
    ) -> None:
        rows = connection.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ? "
            "ORDER BY ordinal_position",
            [name],
        ).fetchall()
        found = {column: data_type for column, data_type in rows}
        # information_schema spells types in DuckDB's canonical form ("DECIMAL(38,9)",
        # "TIMESTAMP WITH TIME ZONE"), so the expected types are parsed into it first.
        expected = {
            f.name: str(duckdb.sqltype(duckdb_type(f.type))) for f in spec.schema
        }
        if found == expected:
            return
        differing = sorted(
            column
            for column in expected.keys() | found.keys()
            if found.get(column) != expected.get(column)
        )
        raise SinkError(
            f"table {name!r} in {self.path} has columns that differ from "
            f"contracts.snapshots: {differing}. The file was written by another schema "
            f"version; move it aside so the writer creates a new one. {_NEW_FILE_NOTE}"
        )

    def through_seq(self) -> int | None:
        """Return the plant events sequence the file's snapshot rows cover: 0 for a
        claimed file without rows, None when no write has recorded it."""
        connection = self._open()
        try:
            row = connection.execute(
                f"SELECT max(through_seq) FROM {SOURCE_TABLE}"  # noqa: S608
            ).fetchone()
        finally:
            connection.close()
        return None if row is None or row[0] is None else int(row[0])

    def write(
        self,
        tables: Mapping[str, pa.Table | pa.RecordBatch | Sequence[pa.RecordBatch]],
        *,
        through_seq: int | None = None,
        partitions: int | None = None,
    ) -> None:
        """Upsert every table's rows by primary key, all in one transaction.

        Rows whose key already exists replace the stored row; within one batch, the last
        row of a key wins. Nothing is written if any batch fails validation. With
        `through_seq`, the same transaction records that the rows now cover the plant
        events up to that stream sequence. With `partitions`, it deletes the rows of
        partitions at or above that count from the tables kept per partition, which a
        run with fewer partitions than the one before leaves behind.

        Raises SnapshotWriteError when DuckDB fails to store the write, for instance
        because the file's folder is not writable.
        """
        if self._closed:
            raise SinkError(
                f"SnapshotWriter for {self.path} is closed; create a new one"
            )
        staged: dict[str, pa.Table] = {}
        for name, data in tables.items():
            if name not in TABLES:
                raise SinkError(
                    f"unknown snapshot table {name!r}; expected one of {sorted(TABLES)}"
                )
            table = _as_table(name, data)
            _check_schema(name, table.schema)
            _check_keys(name, table)
            if table.num_rows:
                staged[name] = table
        if not staged and through_seq is None and partitions is None:
            return

        started = time.perf_counter()
        write_staged = functools.partial(
            self._write_staged, staged, through_seq=through_seq, partitions=partitions
        )
        try:
            try:
                write_staged(insert_new=True)
            except duckdb.ConstraintException as error:
                # A row inserted as new was stored already: a restart or a replay
                # wrote it before. Nothing of this write was committed, so write it
                # all again with upserts, which replace such rows.
                logger.debug("writing again with upserts to %s: %s", self.path, error)
                self._high_seq.clear()
                write_staged(insert_new=False)
        except duckdb.OperationalError as error:
            # Failures of the file or the machine rather than of the rows, such as a
            # write-ahead log that cannot be created. As a SinkError, the ingest
            # retries them from its last checkpoint.
            raise SnapshotWriteError(self.path, error) from error
        if logger.isEnabledFor(logging.DEBUG):
            counts = ", ".join(
                f"{name}={table.num_rows}" for name, table in staged.items()
            )
            logger.debug(
                "wrote %s to %s in %.1f ms",
                counts,
                self.path,
                (time.perf_counter() - started) * 1000,
            )

    async def write_in_background(
        self,
        tables: Mapping[str, pa.Table | pa.RecordBatch | Sequence[pa.RecordBatch]],
        *,
        through_seq: int | None = None,
        partitions: int | None = None,
    ) -> None:
        """Run `write` in the writer's own thread, so the event loop goes on meanwhile.

        On Linux the thread runs at a lower CPU priority (`WRITER_NICENESS`), because
        on a machine with few cores the write would otherwise take CPU time from the
        processes that publish postings.
        """
        if self._thread is None:
            self._thread = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="plantstream-sink",
                initializer=_lower_thread_priority,
            )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._thread,
            functools.partial(
                self.write, tables, through_seq=through_seq, partitions=partitions
            ),
        )

    def _write_staged(
        self,
        staged: dict[str, pa.Table],
        *,
        insert_new: bool,
        through_seq: int | None = None,
        partitions: int | None = None,
    ) -> None:
        high_seq: dict[str, int] = {}
        connection = self._open()
        try:
            connection.begin()
            try:
                for name, table in staged.items():
                    new_rows = _NEW_ROWS.get(name) if insert_new else None
                    if new_rows == "stream_seq":
                        high_seq[name] = self._insert_above_seq(connection, name, table)
                    elif new_rows == "insert_first" and self._unique_keys(name, table):
                        self._insert(connection, name, table)
                    else:
                        self._upsert(connection, name, table)
                if partitions is not None:
                    for name in PER_PARTITION_TABLES:
                        connection.execute(
                            f"DELETE FROM {_quote(name)} "  # noqa: S608
                            f"WHERE {_quote('partition')} >= ?",
                            [partitions],
                        )
                if through_seq is not None:
                    # A file without a source row (written by replay or a test) has
                    # nothing to update, and nothing checks its coverage either.
                    connection.execute(
                        f"UPDATE {SOURCE_TABLE} SET through_seq = "  # noqa: S608
                        "greatest(coalesce(through_seq, 0), ?)",
                        [through_seq],
                    )
                connection.commit()
            except BaseException:
                _roll_back(connection, self.path)
                raise
        finally:
            connection.close()
        self._high_seq.update(high_seq)

    def _unique_keys(self, name: str, table: pa.Table) -> bool:
        return _distinct_keys(table, TABLES[name].primary_key) == table.num_rows

    def _insert(
        self, connection: duckdb.DuckDBPyConnection, name: str, table: pa.Table
    ) -> None:
        columns = ", ".join(_quote(f.name) for f in TABLES[name].schema)
        view = f"__plantstream_new_{name}"
        connection.register(view, table)
        # Identifiers come from contracts.snapshots, never from batch data. A failed
        # insert leaves the view registered: the transaction is aborted then, which
        # rejects the unregister, and closing the connection drops the view anyway.
        connection.execute(
            f"INSERT INTO {_quote(name)} ({columns}) "  # noqa: S608
            f"SELECT {columns} FROM {_quote(view)}"
        )
        connection.unregister(view)

    def _insert_above_seq(
        self, connection: duckdb.DuckDBPyConnection, name: str, table: pa.Table
    ) -> int:
        """Insert the rows above the table's highest stream_seq, upsert the rest, and
        return the highest stream_seq stored."""
        high = self._high_seq.get(name)
        if high is None:
            # Read once per writer, then kept up to date from the rows written, so
            # that no write scans the table. Another process writing the same file
            # in the meantime (not supported) would make a new row collide with its
            # key and send the write down the upsert path.
            ((found,),) = connection.execute(
                f"SELECT max(stream_seq) FROM {_quote(name)}"  # noqa: S608
            ).fetchall()
            high = -1 if found is None else int(found)
        above = pc.greater(table.column("stream_seq"), high)
        new = table.filter(above)
        if new.num_rows and self._unique_keys(name, new):
            self._insert(connection, name, new)
            rest = table.filter(pc.invert(above))
        else:
            rest = table
        if rest.num_rows:
            self._upsert(connection, name, rest)
        batch_high = pc.max(table.column("stream_seq")).as_py()
        return high if batch_high is None else max(high, batch_high)

    def _upsert(
        self, connection: duckdb.DuckDBPyConnection, name: str, table: pa.Table
    ) -> None:
        spec = TABLES[name]
        columns = ", ".join(_quote(f.name) for f in spec.schema)
        key = ", ".join(_quote(column) for column in spec.primary_key)
        view = f"__plantstream_staged_{name}"
        rows = _distinct_keys(table, spec.primary_key)
        if rows == table.num_rows:
            # The usual case: the actors send one row per key already, so the window
            # below, which sorts the whole batch, would only cost time.
            staged = table
            select = f"SELECT {columns} FROM {_quote(view)}"  # noqa: S608
        else:
            # INSERT OR REPLACE rejects two rows with one key in the same statement,
            # so only the last row of each key is kept, as if the rows had been
            # written one by one.
            staged = table.append_column(
                _ROW_INDEX, pa.array(range(table.num_rows), pa.int64())
            )
            select = (
                f"SELECT {columns} FROM {_quote(view)} "  # noqa: S608
                f"QUALIFY row_number() OVER (PARTITION BY {key} "
                f"ORDER BY {_ROW_INDEX} DESC) = 1"
            )
        target = _quote(name)
        connection.register(view, staged)
        try:
            # Identifiers come from contracts.snapshots, never from batch data.
            if not _has_nested_columns(spec):
                connection.execute(
                    f"INSERT OR REPLACE INTO {target} ({columns}) {select}"
                )
                return
            # DuckDB 2.0.1 replaces an existing row with a list column hundreds of
            # times slower than it inserts one (4.5 s for 63,000 postings). Rows are
            # new except after a restart or replay, so insert the new ones, and only
            # when some keys exist delete those rows and insert the batch again.
            result = connection.execute(
                f"INSERT INTO {target} ({columns}) {select} ON CONFLICT DO NOTHING"
            ).fetchone()
            if result is not None and result[0] < rows:
                matches = " AND ".join(
                    f"{target}.{_quote(c)} = {_quote(view)}.{_quote(c)}"
                    for c in spec.primary_key
                )
                connection.execute(
                    f"DELETE FROM {target} USING {_quote(view)} WHERE {matches}"  # noqa: S608
                )
                connection.execute(f"INSERT INTO {target} ({columns}) {select}")
        finally:
            connection.unregister(view)

    def close(self) -> None:
        """Mark the writer closed and end its thread. The file is already closed
        between writes."""
        if not self._closed:
            # A write still running in the thread finishes first.
            if self._thread is not None:
                self._thread.shutdown(wait=True)
                self._thread = None
            self._closed = True
            logger.info("closed DuckDB snapshot writer for %s", self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _lower_thread_priority() -> None:
    # On Linux each thread has its own nice value, set through its thread id. On
    # other systems the same call would change the whole process.
    if sys.platform != "linux":
        return
    try:
        os.setpriority(
            os.PRIO_PROCESS,
            threading.get_native_id(),
            os.getpriority(os.PRIO_PROCESS, 0) + WRITER_NICENESS,
        )
    except OSError as error:
        logger.debug("kept the snapshot writer thread's priority: %s", error)
