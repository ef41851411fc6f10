"""The DuckDB snapshot writer and the material and stock views, on real files."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from contracts.dead_letters import letter_id_at
from contracts.snapshots import TABLES
from pipeline.sink import (
    WRITER_NICENESS,
    DatabaseLockedError,
    SchemaMismatchError,
    SinkError,
    SnapshotSource,
    SnapshotWriteError,
    SnapshotWriter,
    SourceMismatchError,
    open_for_reading,
    read_source,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2024, 3, 4, 6, 0, tzinfo=dt.UTC)


def table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Build an Arrow table for snapshot table `name`, with nulls in absent columns."""
    columns = TABLES[name].schema.names
    return pa.Table.from_pylist(
        [{column: row.get(column) for column in columns} for row in rows],
        schema=TABLES[name].schema,
    )


def order(order_id: str, status: str = "released", **fields: Any) -> dict[str, Any]:
    return {"plant": "P1", "order_id": order_id, "status": status, **fields}


def fetch(path: Path, sql: str) -> list[tuple[Any, ...]]:
    connection = open_for_reading(path)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def start_python(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_writer_creates_typed_tables(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    SnapshotWriter(path).close()
    types = dict(
        fetch(
            path,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'postings'",
        )
    )

    assert types["quantity"] == "DECIMAL(38,9)"
    assert types["occurred_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["lineage"] == "VARCHAR[]"
    assert types["posting_date"] == "DATE"


def test_writer_creates_primary_keys(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    SnapshotWriter(path).close()
    rows = fetch(
        path,
        "SELECT table_name, constraint_column_names FROM duckdb_constraints() "
        "WHERE constraint_type = 'PRIMARY KEY'",
    )
    keys = {name: tuple(columns) for name, columns in rows}

    assert keys == {name: spec.primary_key for name, spec in TABLES.items()}


def test_writer_creates_views(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    SnapshotWriter(path).close()
    views = {
        row[0]
        for row in fetch(
            path, "SELECT view_name FROM duckdb_views() WHERE NOT internal"
        )
    }

    for name in (
        "oee",
        "oee_by_plant",
        "material_variance",
        "stock",
        "downtime_by_reason",
    ):
        assert name in views


def letter(seq: int, index: int, reason: str = "invalid") -> dict[str, Any]:
    subject = "plant.events.P1.batch"
    return {
        "subject": subject,
        "stream_seq": seq,
        "batch_index": index,
        "reason": reason,
    }


def test_open_dead_letters_leave_out_resolved(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    letters = [letter(4, -1), letter(5, 0), letter(5, 1), letter(6, 2, "future_time")]
    # The first and third letters, and a letter of another reason at the last one's
    # position, which resolves nothing here.
    resolved = [
        letter_id_at("plant.events.P1.batch", 4, None, "invalid"),
        letter_id_at("plant.events.P1.batch", 5, 1, "invalid"),
        letter_id_at("plant.events.P1.batch", 6, 2, "invalid"),
    ]
    with SnapshotWriter(path) as writer:
        writer.write(
            {
                "dead_letters": table("dead_letters", letters),
                "dead_letter_resolutions": table(
                    "dead_letter_resolutions", [{"letter_id": r} for r in resolved]
                ),
            }
        )
    rows = fetch(
        path,
        "SELECT stream_seq, batch_index, reason FROM open_dead_letters "
        "ORDER BY stream_seq, batch_index",
    )

    assert rows == [(5, 0, "invalid"), (6, 2, "future_time")]


def test_upsert_replaces_row(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    with SnapshotWriter(path) as writer:
        writer.write({"orders": table("orders", [order("O1"), order("O2")])})
        writer.write({"orders": table("orders", [order("O1", "completed")])})
    rows = fetch(path, "SELECT order_id, status FROM orders ORDER BY order_id")

    assert rows == [("O1", "completed"), ("O2", "released")]


def test_rows_of_removed_partitions_deleted(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    clocks = [
        {"plant": plant, "partition": partition, "events": 1}
        for plant in ("P1", "P2")
        for partition in range(3)
    ]
    with SnapshotWriter(path) as writer:
        writer.write({"plant_clocks": table("plant_clocks", clocks)})
        writer.write({"orders": table("orders", [order("O1")])}, partitions=2)

    rows = fetch(path, "SELECT plant, partition FROM plant_clocks ORDER BY ALL")
    assert rows == [("P1", 0), ("P1", 1), ("P2", 0), ("P2", 1)]
    assert fetch(path, "SELECT order_id FROM orders") == [("O1",)]


def test_write_in_background_thread_priority(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    seen: dict[str, object] = {}
    with SnapshotWriter(path) as writer:
        write = writer.write

        def recording_write(
            tables: dict[str, pa.Table],
            *,
            through_seq: int | None = None,
            partitions: int | None = None,
        ) -> None:
            seen["thread"] = threading.current_thread().name
            if sys.platform == "linux":
                seen["nice"] = os.getpriority(
                    os.PRIO_PROCESS, threading.get_native_id()
                )
            write(tables)

        writer.write = recording_write  # type: ignore[method-assign, assignment]
        asyncio.run(
            writer.write_in_background({"orders": table("orders", [order("O1")])})
        )

    assert fetch(path, "SELECT order_id FROM orders") == [("O1",)]
    assert str(seen["thread"]).startswith("plantstream-sink")
    if sys.platform == "linux":
        assert seen["nice"] == min(
            os.getpriority(os.PRIO_PROCESS, 0) + WRITER_NICENESS, 19
        )


def test_write_in_background_after_cancel_waits(tmp_path: Path) -> None:
    # A recovery cancels the commit that awaits a write, but the write goes on; the
    # next write must not run beside it.
    spans: list[tuple[str, float, float]] = []
    with SnapshotWriter(tmp_path / "snapshots.duckdb") as writer:
        write = writer.write

        def slow_write(
            tables: dict[str, pa.Table],
            *,
            through_seq: int | None = None,
            partitions: int | None = None,
        ) -> None:
            started = time.monotonic()
            time.sleep(0.3)
            write(tables)
            spans.append(
                (
                    next(iter(tables["orders"]["order_id"])).as_py(),
                    started,
                    time.monotonic(),
                )
            )

        writer.write = slow_write  # type: ignore[method-assign, assignment]

        async def cancel_then_write() -> None:
            first = asyncio.create_task(
                writer.write_in_background({"orders": table("orders", [order("O1")])})
            )
            await asyncio.sleep(0.05)
            first.cancel()
            await writer.write_in_background({"orders": table("orders", [order("O2")])})

        asyncio.run(cancel_then_write())

    (first, _, first_end), (second, second_start, _) = spans
    assert (first, second) == ("O1", "O2")
    assert second_start >= first_end


def test_upsert_last_duplicate_wins(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    batch = table(
        "orders", [order("O1"), order("O1", "in_progress"), order("O1", "on_hold")]
    )
    with SnapshotWriter(path) as writer:
        writer.write({"orders": batch})

    assert fetch(path, "SELECT status FROM orders") == [("on_hold",)]


def posting(key: str, quantity: str, lineage: list[str]) -> dict[str, Any]:
    return {
        "key": key,
        "posting_type": "goods_movement",
        "plant": "P1",
        "movement_type": "101",
        "quantity": Decimal(quantity),
        "uom": "PC",
        "lineage": lineage,
    }


def test_posting_rewritten_on_replay(tmp_path: Path) -> None:
    """Postings have a list column, which takes the insert-then-replace path."""
    path = tmp_path / "snapshots.duckdb"
    with SnapshotWriter(path) as writer:
        writer.write(
            {
                "postings": table(
                    "postings", [posting("k1", "1", ["e1"]), posting("k2", "2", ["e2"])]
                )
            }
        )
        replayed = [posting("k2", "5", ["e2", "e9"]), posting("k3", "3", ["e3"])]
        writer.write({"postings": table("postings", replayed)})
    rows = fetch(path, "SELECT key, quantity, lineage FROM postings ORDER BY key")

    assert rows == [
        ("k1", Decimal(1), ["e1"]),
        ("k2", Decimal(5), ["e2", "e9"]),
        ("k3", Decimal(3), ["e3"]),
    ]


def test_posting_duplicates_in_batch_last_wins(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    batch = [posting("k1", "1", ["e1"]), posting("k1", "4", ["e4"])]
    with SnapshotWriter(path) as writer:
        writer.write({"postings": table("postings", [posting("k1", "7", ["e7"])])})
        writer.write({"postings": table("postings", batch)})

    assert fetch(path, "SELECT quantity FROM postings") == [(Decimal(4),)]


def ledger(stream_seq: int, status: str = "applied") -> dict[str, Any]:
    return {
        "stream_seq": stream_seq,
        "batch_index": -1,
        "event_id": f"e{stream_seq}",
        "plant": "P1",
        "event_type": "production_confirmed",
        "status": status,
        "occurred_at": T0,
        "utc_offset_s": 0,
    }


def ledger_rows(path: Path) -> list[tuple[Any, ...]]:
    return fetch(path, "SELECT stream_seq, status FROM events ORDER BY stream_seq")


def test_ledger_rewrite_below_highest_seq(tmp_path: Path) -> None:
    """A parked event applied at a later checkpoint rewrites a row below the highest
    stored stream_seq, in the same write as new rows above it."""
    path = tmp_path / "snapshots.duckdb"
    with SnapshotWriter(path) as writer:
        writer.write({"events": table("events", [ledger(1), ledger(2, "parked")])})
        writer.write(
            {"events": table("events", [ledger(2), ledger(3), ledger(4, "parked")])}
        )
    with SnapshotWriter(path) as restarted:
        # A new writer reads the highest stream_seq from the file.
        restarted.write({"events": table("events", [ledger(4), ledger(5)])})

    assert ledger_rows(path) == [
        (1, "applied"),
        (2, "applied"),
        (3, "applied"),
        (4, "applied"),
        (5, "applied"),
    ]


def test_ledger_stale_writer_upserts_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer whose highest stream_seq is out of date inserts a row stored already.
    The insert fails on the key, so the write runs again with upserts."""
    path = tmp_path / "snapshots.duckdb"
    first = SnapshotWriter(path)
    first.write({"events": table("events", [ledger(1)])})
    with SnapshotWriter(path) as second:
        second.write({"events": table("events", [ledger(2, "parked")])})
    with caplog.at_level("DEBUG", logger="pipeline.sink"):
        first.write({"events": table("events", [ledger(2), ledger(3)])})
    first.close()

    assert ledger_rows(path) == [(1, "applied"), (2, "applied"), (3, "applied")]
    assert "writing again with upserts" in caplog.text


def test_writer_rejects_other_stream(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    first = SnapshotSource("PLANT_EVENTS created 2026-01-01T00:00:00+00:00", "run")
    second = SnapshotSource("PLANT_EVENTS created 2026-02-01T00:00:00+00:00", "run")
    SnapshotWriter(path, source=first).close()
    SnapshotWriter(path, source=first).close()

    with pytest.raises(SourceMismatchError, match="Pass another --db"):
        SnapshotWriter(path, source=second)
    assert read_source(path) == first


def test_writer_records_the_sequence_its_rows_cover(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    source = SnapshotSource("PLANT_EVENTS created 2026-01-01T00:00:00+00:00", "run")
    with SnapshotWriter(path, source=source) as writer:
        assert writer.through_seq() == 0
        writer.write({"events": table("events", [ledger(1)])}, through_seq=40)
        assert writer.through_seq() == 40
        # A checkpoint without rows still moves the coverage on.
        writer.write({}, through_seq=42)
        assert writer.through_seq() == 42
        # A repeat of an older write after a recovery never moves it back.
        writer.write({"events": table("events", [ledger(1)])}, through_seq=40)
        assert writer.through_seq() == 42
    with SnapshotWriter(tmp_path / "unclaimed.duckdb") as unclaimed:
        unclaimed.write({"events": table("events", [ledger(1)])}, through_seq=7)
        assert unclaimed.through_seq() is None


def test_writer_upgrades_older_source_table(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    connection = duckdb.connect(str(path))
    connection.execute(
        "CREATE TABLE plantstream_source (stream VARCHAR NOT NULL, "
        "written_by VARCHAR NOT NULL)"
    )
    connection.execute("INSERT INTO plantstream_source VALUES ('PLANT_EVENTS', 'run')")
    connection.close()
    source = SnapshotSource("PLANT_EVENTS", "run")
    with SnapshotWriter(path, source=source) as writer:
        # Unknown until a write records it, so an older file is never refused.
        assert writer.through_seq() is None
        writer.write({"events": table("events", [ledger(1)])}, through_seq=5)
        assert writer.through_seq() == 5


def test_write_accepts_batches(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    batches = table("orders", [order("O1"), order("O2"), order("O3")]).to_batches(
        max_chunksize=1
    )
    with SnapshotWriter(path) as writer:
        writer.write({"orders": batches})
        writer.write({"orders": batches[0]})
        writer.write({"orders": []})

    assert fetch(path, "SELECT count(*) FROM orders") == [(3,)]


def test_write_keeps_decimals_exact(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    quantity = Decimal("12345678901234567890.123456789")
    with SnapshotWriter(path) as writer:
        writer.write(
            {"orders": table("orders", [order("O1", planned_quantity=quantity)])}
        )

    assert fetch(path, "SELECT planned_quantity FROM orders") == [(quantity,)]


def test_schema_mismatch_names_columns(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    good = table("orders", [order("O1")])
    bad = good.drop_columns(["uom"]).set_column(
        good.schema.get_field_index("planned_quantity"),
        "planned_quantity",
        pa.array([1.5], pa.float64()),
    )
    bad = bad.append_column("colour", pa.array(["red"]))
    with SnapshotWriter(path) as writer, pytest.raises(SchemaMismatchError) as caught:
        writer.write({"orders": bad})
    message = str(caught.value)

    assert "'orders'" in message
    assert "missing columns ['uom']" in message
    assert "unexpected columns ['colour']" in message
    assert "'planned_quantity' has type double, expected decimal128(38, 9)" in message


def test_schema_mismatch_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    bad = table("production", []).drop_columns(["cancelled"])
    with SnapshotWriter(path) as writer, pytest.raises(SchemaMismatchError):
        writer.write({"orders": table("orders", [order("O1")]), "production": bad})

    assert fetch(path, "SELECT count(*) FROM orders") == [(0,)]


def test_write_rejects_unknown_table(tmp_path: Path) -> None:
    with SnapshotWriter(tmp_path / "snapshots.duckdb") as writer:
        with pytest.raises(SinkError, match="unknown snapshot table 'ordrs'"):
            writer.write({"ordrs": table("orders", [order("O1")])})


def test_write_rejects_null_key(tmp_path: Path) -> None:
    with SnapshotWriter(tmp_path / "snapshots.duckdb") as writer:
        with pytest.raises(SinkError, match="null 'order_id'"):
            writer.write({"orders": table("orders", [{"plant": "P1"}])})


def test_failed_commit_names_file_and_fix(tmp_path: Path) -> None:
    # A write-ahead log path that is a dangling symlink makes DuckDB's commit fail for
    # root too, because creating the log through it finds no folder. chmod would not
    # stop root from writing.
    path = tmp_path / "snapshots.duckdb"
    wal = tmp_path / "snapshots.duckdb.wal"
    with SnapshotWriter(path) as writer:
        writer.write({"orders": table("orders", [order("O1")])})
        wal.symlink_to(tmp_path / "missing" / wal.name)
        try:
            with pytest.raises(SnapshotWriteError) as raised:
                writer.write({"orders": table("orders", [order("O2")])})
        finally:
            wal.unlink()
        # DuckDB rejects the rollback after a failed commit ("no transaction is
        # active"), and that error must not replace the commit's.
        message = str(raised.value)
        assert f"DuckDB file {path}:" in message
        assert "No such file or directory" in message
        assert f"make the folder {tmp_path} writable" in message
        assert isinstance(raised.value.__cause__, duckdb.TransactionException)
        assert fetch(path, "SELECT order_id FROM orders") == [("O1",)]
        writer.write({"orders": table("orders", [order("O2")])})
    assert fetch(path, "SELECT order_id FROM orders ORDER BY 1") == [("O1",), ("O2",)]


def test_failed_schema_commit_names_file(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    wal = tmp_path / "snapshots.duckdb.wal"
    wal.symlink_to(tmp_path / "missing" / wal.name)
    try:
        with pytest.raises(SnapshotWriteError) as raised:
            SnapshotWriter(path)
    finally:
        wal.unlink()
    message = str(raised.value)
    assert f"DuckDB file {path}:" in message
    assert "No such file or directory" in message
    assert isinstance(raised.value.__cause__, duckdb.TransactionException)


def test_write_after_close_raises(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path / "snapshots.duckdb")
    writer.close()
    with pytest.raises(SinkError, match="closed"):
        writer.write({"orders": table("orders", [order("O1")])})


def test_writer_rejects_other_schema(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    connection = duckdb.connect(str(path))
    connection.execute(
        "CREATE TABLE orders (plant VARCHAR, order_id VARCHAR, "
        "PRIMARY KEY (plant, order_id))"
    )
    connection.close()
    with pytest.raises(SinkError, match="table 'orders'.*'status'"):
        SnapshotWriter(path)


def test_writer_rejects_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    path.write_bytes(b"not a database" * 1000)
    with pytest.raises(SinkError, match=str(path)):
        SnapshotWriter(path)


def test_open_for_reading_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.duckdb"):
        open_for_reading(tmp_path / "absent.duckdb")


def test_reader_process_between_writes(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    writer = SnapshotWriter(path)
    writer.write({"orders": table("orders", [order("O0")])})
    reader = start_python(
        """
        import sys
        import time
        from pipeline.sink import open_for_reading
        for _ in range(20):
            connection = open_for_reading(sys.argv[1], timeout_s=20)
            count = connection.execute("SELECT count(*) FROM orders").fetchone()[0]
            print(count, flush=True)
            connection.close()
            time.sleep(0.02)
        """,
        str(path),
    )
    for i in range(1, 21):
        writer.write({"orders": table("orders", [order(f"O{i}")])})
        time.sleep(0.02)
    stdout, stderr = reader.communicate(timeout=60)
    counts = [int(line) for line in stdout.split()]

    assert reader.returncode == 0, stderr
    assert len(counts) == 20
    assert counts == sorted(counts)
    assert all(1 <= count <= 21 for count in counts)
    assert fetch(path, "SELECT count(*) FROM orders") == [(21,)]


def test_writer_times_out_on_held_lock(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    writer = SnapshotWriter(path, lock_timeout_s=0.5)
    reader = start_python(
        f"""
        import time
        from pipeline.sink import open_for_reading
        connection = open_for_reading({str(path)!r})
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "ready"
        started = time.monotonic()
        with pytest.raises(DatabaseLockedError, match=str(path)) as caught:
            writer.write({"orders": table("orders", [order("O1")])})
        waited = time.monotonic() - started
    finally:
        reader.kill()
        reader.wait()

    assert 0.5 <= waited < 5
    message = str(caught.value)
    # DuckDB's reason names the reader's process. Its advice to open the file
    # read-only cannot help a writer, so it must not reach the user.
    assert "Conflicting lock is held in " in message
    assert f"(PID {reader.pid})" in message
    assert "read-only mode" not in message
    assert "-readonly" not in message
    assert "Close that connection" in message


def test_reader_times_out_on_held_writer(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    SnapshotWriter(path).close()
    holder = start_python(
        f"""
        import time
        import duckdb
        connection = duckdb.connect({str(path)!r})
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(DatabaseLockedError, match=str(path)) as caught:
            open_for_reading(path, timeout_s=0.3)
    finally:
        holder.kill()
        holder.wait()

    message = str(caught.value)
    assert f"(PID {holder.pid})" in message
    assert "Another connection has the file open for writing" in message
    assert "run the query again" in message


KILLED_WRITER = """
import pyarrow as pa
import pyarrow.compute as pc
from contracts.dead_letters import letter_id_at
from contracts.snapshots import TABLES
from pipeline.sink import SnapshotWriter

schema = TABLES["orders"].schema
rows = {batch_rows}
columns = {{name: pa.nulls(rows, schema.field(name).type) for name in schema.names}}
columns["plant"] = pa.array(["P1"] * rows)
columns["status"] = pa.array(["released"] * rows)
suffixes = pa.array([str(i) for i in range(rows)])
writer = SnapshotWriter({path!r})
for n in range(1, 1000):
    columns["order_id"] = pc.binary_join_element_wise(f"O{{n}}-", suffixes, "")
    batch = pa.Table.from_pydict(columns, schema=schema)
    print("writing", n, flush=True)
    writer.write({{"orders": batch}})
"""


def test_killed_writer_leaves_committed_state(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    batch_rows = 50_000
    writer = start_python(KILLED_WRITER.format(path=str(path), batch_rows=batch_rows))
    assert writer.stdout is not None
    assert writer.stdout.readline().split() == ["writing", "1"]
    # Once the second write starts, the first is committed. A write of 50,000 rows takes
    # about 150 ms, so a kill 30 ms into it lands before its commit.
    assert writer.stdout.readline().split() == ["writing", "2"]
    time.sleep(0.03)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    SnapshotWriter(path).close()
    count = fetch(path, "SELECT count(*) FROM orders")[0][0]

    assert writer.returncode == -signal.SIGKILL
    assert count in (batch_rows, 2 * batch_rows)
    assert fetch(path, "SELECT count(DISTINCT order_id) FROM orders") == [(count,)]


def test_reopen_replays_committed_wal(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    SnapshotWriter(path).close()
    # A process killed after its commit but before its close leaves the rows in the WAL.
    holder = start_python(
        f"""
        import time
        import duckdb
        connection = duckdb.connect({str(path)!r})
        connection.execute(
            "INSERT INTO orders (plant, order_id, status) "
            "VALUES ('P1', 'O1', 'released')"
        )
        print("committed", flush=True)
        time.sleep(60)
        """
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "committed"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    wal_left = path.with_name(path.name + ".wal").exists()
    SnapshotWriter(path).close()

    assert wal_left
    assert fetch(path, "SELECT order_id, status FROM orders") == [("O1", "released")]


def _write_components(
    path: Path,
    orders: list[dict[str, Any]],
    components: Sequence[tuple[str, str, Decimal | str, Decimal | str]],
    uom: str,
) -> None:
    """Write `orders` and their (order, material, standard, actual) components."""
    rows = [
        {
            "plant": "P1",
            "order_id": order_id,
            "material": material,
            "uom": uom,
            "standard_quantity": Decimal(standard),
            "actual_quantity": Decimal(actual),
        }
        for order_id, material, standard, actual in components
    ]
    with SnapshotWriter(path) as writer:
        writer.write(
            {
                "orders": table("orders", orders),
                "order_components": table("order_components", rows),
            }
        )


def test_material_variance_exact(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    orders = [
        order(
            "O1",
            planned_quantity=Decimal(100),
            good_quantity=Decimal(30),
            scrap_quantity=Decimal(3),
        ),
        order("O2", planned_quantity=Decimal(3), good_quantity=Decimal(1)),
        order("O3", planned_quantity=Decimal(10)),
    ]
    components = [
        ("O1", "STEEL", "7", "2.5"),
        ("O2", "PAINT", "1", "0.3"),
        ("O3", "BOLT", "40", "4"),
        ("O3", "GLUE", "0", "0.25"),
    ]
    _write_components(path, orders, components, "KG")
    rows = fetch(
        path,
        "SELECT material, bom_quantity, standard_quantity, actual_quantity, variance, "
        "variance_pct FROM material_variance ORDER BY order_id, material",
    )
    by_material = {row[0]: row[1:] for row in rows}

    # 7 kg for 100 pieces, 33 produced: 2.31 kg standard.
    assert by_material["STEEL"][1] == Decimal("2.310000000")
    assert by_material["STEEL"][3] == Decimal("0.190000000")
    assert by_material["STEEL"][4] == pytest.approx(0.19 / 2.31 * 100)
    # 1 kg for 3 pieces, 1 produced: rounded to 9 places, never through a float.
    assert by_material["PAINT"][1] == Decimal("0.333333333")
    assert by_material["PAINT"][3] == Decimal("-0.033333333")
    # No output yet: the standard is the whole BOM quantity.
    assert by_material["BOLT"][1] == Decimal(40)
    assert by_material["BOLT"][3] == Decimal(-36)
    assert by_material["GLUE"][4] is None


def test_material_variance_order_status(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    orders = [
        order("O1", "completed", planned_quantity=Decimal(10)),
        order("O2", "in_progress", planned_quantity=Decimal(10)),
    ]
    components = [
        ("O1", "STEEL", "7", "7"),
        ("O2", "STEEL", "7", "2"),
        # A component whose order has no `orders` row gets a null status.
        ("O3", "STEEL", "7", "1"),
    ]
    _write_components(path, orders, components, "KG")
    rows = fetch(
        path,
        "SELECT order_id, order_status FROM material_variance ORDER BY order_id",
    )

    assert rows == [("O1", "completed"), ("O2", "in_progress"), ("O3", None)]


def test_material_variance_decimal_types(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    SnapshotWriter(path).close()
    types = dict(
        fetch(path, "SELECT column_name, column_type FROM (DESCRIBE material_variance)")
    )

    for column in ("bom_quantity", "standard_quantity", "actual_quantity", "variance"):
        assert types[column] == "DECIMAL(38,9)", column


def test_material_variance_large_quantities(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    largest = Decimal("999999999999999")
    orders = [
        order("O1", planned_quantity=largest, good_quantity=largest),
        order(
            "O2",
            planned_quantity=Decimal("999999999999999.999999999"),
            good_quantity=Decimal("987654321098765.987654321"),
        ),
        order("O3", planned_quantity=Decimal("0.000000001"), good_quantity=largest),
    ]
    components = [
        ("O1", "ORE", largest, largest),
        ("O2", "COKE", Decimal("123456789012345.123456789"), Decimal(0)),
        ("O3", "SLAG", largest, Decimal(1)),
    ]
    _write_components(path, orders, components, "T")
    rows = fetch(
        path,
        "SELECT material, standard_quantity, variance, variance_pct "
        "FROM material_variance ORDER BY order_id",
    )
    by_material = {row[0]: row[1:] for row in rows}

    assert sorted(by_material) == ["COKE", "ORE", "SLAG"]
    assert by_material["ORE"][0] == largest
    assert by_material["ORE"][1] == 0
    # BOM x output is about 1.2e29 here, and 121932631137021.3152248116... rounds up.
    assert by_material["COKE"][0] == Decimal("121932631137021.315224812")
    assert by_material["COKE"][1] == Decimal("-121932631137021.315224812")
    # 1e15 x 1e15 / 1e-9 = 1e39 does not fit DECIMAL(38, 9).
    assert by_material["SLAG"] == (None, None, None)


def test_stock_signs_by_movement_type(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.duckdb"
    movements = [
        ("K1", "101", "FG", "10", "unrestricted"),
        ("K2", "102", "FG", "1", "unrestricted"),
        ("K3", "344", "FG", "4", "blocked"),
        ("K4", "343", "FG", "1", "unrestricted"),
        ("K5", "261", "RM", "3", "unrestricted"),
        ("K6", "262", "RM", "1", "unrestricted"),
    ]
    postings = [
        {
            "key": k,
            "posting_type": "goods_movement",
            "plant": "P1",
            "movement_type": t,
            "material": m,
            "quantity": Decimal(q),
            "uom": "PC",
            "stock_type": s,
        }
        for k, t, m, q, s in movements
    ]
    with SnapshotWriter(path) as writer:
        writer.write({"postings": table("postings", postings)})
    rows = fetch(path, "SELECT material, stock_type, quantity FROM stock")
    stock = {
        (material, stock_type): quantity for material, stock_type, quantity in rows
    }

    assert stock[("FG", "unrestricted")] == Decimal(6)
    assert stock[("FG", "blocked")] == Decimal(3)
    assert stock[("RM", "unrestricted")] == Decimal(-2)


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_unwritable_folder_gets_access_advice() -> None:
    # sysfs refuses new files to every user, root included.
    path = Path("/sys/plantstream-test.duckdb")
    with pytest.raises(SinkError) as raised:
        SnapshotWriter(path)
    message = str(raised.value)
    assert "Permission denied" in message
    assert "writable for this process" in message
    assert "move it aside" not in message
    assert "checkpoints reset" not in message
