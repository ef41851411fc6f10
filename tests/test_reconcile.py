"""`plantstream reconcile` on a generated run, and on tampered copies."""

from __future__ import annotations

import argparse
import asyncio
import shutil
from pathlib import Path

import duckdb
import nats
import pytest
from test_semantics_support import run, run_on_own_server

from cluster import reconcile
from cluster.nats_server import EmbeddedNatsServer
from pipeline.sink import SnapshotWriter
from pipeline.sources.generated import StreamSpec, generate
from pipeline.subjects import posting_subject


def _cli(db: Path, *options: str) -> int:
    parser = argparse.ArgumentParser()
    reconcile.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["reconcile", "--db", str(db), *options])
    return int(args.handler(args))


@pytest.fixture(scope="module")
def db(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    messages, _ = generate(StreamSpec(plants=2, orders_per_plant=40, seed=5))
    inputs = [(m.subject, m.data) for m in messages]
    path, _ = run_on_own_server(tmp_path_factory.mktemp("reconcile"), inputs)
    return path


def _tampered(db: Path, tmp_path: Path, sql: str) -> Path:
    copy = tmp_path / "tampered.duckdb"
    shutil.copy(db, copy)
    with duckdb.connect(str(copy)) as connection:
        connection.execute(sql)
    return copy


def test_generated_run_agrees(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(db) == 0
    out = capsys.readouterr().out
    assert "postings agree with the events" in out
    assert "dead_letter" in out


def test_dead_letters_outside_ledger_counted(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with duckdb.connect(str(db), read_only=True) as connection:
        [(letters,)] = connection.execute(
            "SELECT count(*) FROM dead_letters"
        ).fetchall()
        [(in_ledger,)] = connection.execute(
            "SELECT count(*) FROM events WHERE status = 'dead_letter'"
        ).fetchall()
    assert _cli(db) == 0
    out = capsys.readouterr().out
    # The generated stream has malformed messages, which never reach the ledger.
    assert letters > in_ledger
    assert f"dead letters: {letters} rows in table dead_letters" in out
    assert f"{letters - in_ledger} of them have no ledger row" in out


def test_missing_posting_reported(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tampered = _tampered(
        db,
        tmp_path,
        "DELETE FROM postings WHERE key = "
        "(SELECT min(key) FROM postings WHERE movement_type = '101')",
    )
    assert _cli(tampered) == 1
    out = capsys.readouterr().out
    assert "DIFFERENCE stock" in out


def test_double_apply_reported(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tampered = _tampered(
        db,
        tmp_path,
        "INSERT INTO events SELECT * REPLACE (stream_seq + 1000000 AS stream_seq) "
        "FROM events WHERE status = 'applied' "
        "AND event_type = 'material_consumed' LIMIT 1",
    )
    assert _cli(tampered) == 1
    out = capsys.readouterr().out
    assert "DIFFERENCE applied more than once" in out
    assert "DIFFERENCE stock" in out


def _dead_letter_of_applied_event(db: Path, tmp_path: Path, reason: str) -> Path:
    """Copy the file with one more dead letter, of `reason`, for an applied event."""
    return _tampered(
        db,
        tmp_path,
        "INSERT INTO dead_letters SELECT * REPLACE "  # noqa: S608 (a test constant)
        f"(e.stream_seq AS stream_seq, -1 AS batch_index, '{reason}' AS reason) "
        "FROM (SELECT * FROM dead_letters LIMIT 1), "
        "(SELECT stream_seq FROM events WHERE status = 'applied' "
        "AND batch_index = -1 LIMIT 1) AS e",
    )


def test_dead_letter_of_applied_event_reported(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The event was posted although it was also rejected, as a replay without the
    # ingest's checks did.
    tampered = _dead_letter_of_applied_event(db, tmp_path, "invalid")
    assert _cli(tampered) == 1
    assert "DIFFERENCE dead letter of an applied event" in capsys.readouterr().out


def test_clock_rejection_applied_later_counted(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A future_time rejection whose event a replay applied once the host clock had
    # caught up: a different clock, not a wrong posting.
    tampered = _dead_letter_of_applied_event(db, tmp_path, "future_time")
    assert _cli(tampered) == 0
    out = capsys.readouterr().out
    assert "DIFFERENCE" not in out
    assert "1 of them were rejected on the host clock" in out
    assert "applied later, by a replay or a restart that read a later clock: " in out


def test_stream_postings_compared_by_key(
    ray_local: None,
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    messages, _ = generate(StreamSpec(plants=1, orders_per_plant=5, seed=9))
    path = tmp_path / "run.duckdb"
    run(nats_server, path, [(m.subject, m.data) for m in messages])
    assert _cli(path, "--nats-url", nats_server.url) == 0
    assert "compared with the file by key" in capsys.readouterr().out

    async def post_stray() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().publish(
                posting_subject("P01"), b"{}", headers={"Nats-Msg-Id": "stray-key"}
            )
        finally:
            await nc.close()

    asyncio.run(post_stray())
    assert _cli(path, "--nats-url", nats_server.url) == 1
    out = capsys.readouterr().out
    assert "DIFFERENCE posting in ERP_POSTINGS but not in the file: stray-key" in out


def test_stream_of_other_server_rejected(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same generated stream on two servers gives the same posting keys, so only
    # the stream's identity distinguishes the file's server from the other.
    messages, _ = generate(StreamSpec(plants=1, orders_per_plant=3, seed=9))
    inputs = [(m.subject, m.data) for m in messages]
    path, _ = run_on_own_server(tmp_path / "first", inputs)
    other = EmbeddedNatsServer(store_dir=tmp_path / "other").start()
    try:
        run(other, tmp_path / "other.duckdb", inputs)
        assert _cli(path, "--nats-url", other.url) == 2
    finally:
        other.stop()
    assert "pass the server the file was written from" in capsys.readouterr().err


def test_duplicate_of_dead_letter_agrees(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An event dead-lettered after its id was remembered (an order_closed one, say)
    and sent again is a duplicate of the dead letter."""
    tampered = _tampered(
        db,
        tmp_path,
        "INSERT INTO events SELECT * REPLACE "
        "(stream_seq + 1000000 AS stream_seq, 'duplicate' AS status, NULL AS reason) "
        "FROM events WHERE status = 'dead_letter' AND event_id NOT IN "
        "(SELECT event_id FROM events WHERE status IN ('applied', 'parked')) LIMIT 1",
    )
    with duckdb.connect(str(tampered), read_only=True) as connection:
        [(added,)] = connection.execute(
            "SELECT count(*) FROM events WHERE stream_seq > 1000000"
        ).fetchall()
    assert added == 1
    assert _cli(tampered) == 0
    assert "duplicate of nothing" not in capsys.readouterr().out


def test_missing_file_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(tmp_path / "absent.duckdb") == 2
    assert "not found" in capsys.readouterr().err


def test_file_without_events_does_not_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.duckdb"
    SnapshotWriter(empty).close()
    assert _cli(empty) == 1
    out = capsys.readouterr().out
    assert "holds no events, so nothing was checked" in out
    assert "postings agree" not in out
