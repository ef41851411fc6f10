"""`plantstream reconcile` on a generated run, and on tampered copies."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import nats
import pytest
from nats.js import JetStreamContext
from test_semantics_support import run, run_on_own_server

from cluster import reconcile
from cluster.nats_server import EmbeddedNatsServer
from pipeline.sink import SnapshotWriter
from pipeline.sources.generated import StreamSpec, generate
from pipeline.subjects import POSTINGS_STREAM, posting_subject


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
    with duckdb.connect(str(path), read_only=True) as connection:
        [(postings,)] = connection.execute("SELECT count(*) FROM postings").fetchall()
    assert _cli(path, "--nats-url", nats_server.url) == 0
    out = capsys.readouterr().out
    assert "compared with the file by the key in each message body" in out
    # Goods movements and confirmations alike decode to the rows the file stores.
    assert (
        f"  {postings} message bodies compared column by column with the file's row "
        "of their key\n"
    ) in out

    async def post_stray() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().publish(
                posting_subject("P01"),
                b'{"key": "stray-key"}',
                headers={"Nats-Msg-Id": "stray-key"},
            )
        finally:
            await nc.close()

    asyncio.run(post_stray())
    assert _cli(path, "--nats-url", nats_server.url) == 1
    out = capsys.readouterr().out
    assert "DIFFERENCE posting in ERP_POSTINGS but not in the file: stray-key" in out


def _posted_run(server: EmbeddedNatsServer, tmp_path: Path) -> Path:
    """Run a small generated stream and return the file, which agrees with the
    server's ERP_POSTINGS."""
    messages, _ = generate(StreamSpec(plants=1, orders_per_plant=5, seed=9))
    path = tmp_path / "run.duckdb"
    run(server, path, [(m.subject, m.data) for m in messages])
    return path


async def _let_duplicate_window_pass(js: JetStreamContext) -> None:
    """Shrink the postings stream's duplicate window to 0.1 s and wait it out, as a
    day does with the 24 h window, so that a key published again is stored again."""
    config = (await js.stream_info(POSTINGS_STREAM)).config
    config.duplicate_window = 0.1
    await js.update_stream(config)
    await asyncio.sleep(0.3)


async def _republish(
    url: str, seqs: list[int], msg_id: str | None = None, *, after_window: bool
) -> list[tuple[str, int]]:
    """Publish a copy of each posting at `seqs` of ERP_POSTINGS, under `msg_id`, or
    under the posting's own Nats-Msg-Id if it is None. Return the key and the stream
    sequence of each copy."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        if after_window:
            await _let_duplicate_window_pass(js)
        return [await _publish_copy(js, seq, msg_id=msg_id) for seq in seqs]
    finally:
        await nc.close()


async def _publish_copy(
    js: JetStreamContext,
    seq: int,
    *,
    fields: dict[str, Any] | None = None,
    msg_id: str | None = None,
    replace: bool = False,
) -> tuple[str, int]:
    """Publish a copy of the posting at `seq` of ERP_POSTINGS, with the body `fields`
    set, under `msg_id` or else its key as Nats-Msg-Id. With `replace`, delete the
    original first. Return the copy's key and stream sequence."""
    stored = await js.get_msg(POSTINGS_STREAM, seq)
    assert stored.subject is not None
    assert stored.data is not None
    data = stored.data
    body = json.loads(data)
    if fields:
        body.update(fields)
        data = json.dumps(body).encode()
    if replace:
        assert await js.delete_msg(POSTINGS_STREAM, seq)
    headers = {"Nats-Msg-Id": body["key"] if msg_id is None else msg_id}
    ack = await js.publish(stored.subject, data, headers=headers)
    assert not ack.duplicate
    return body["key"], ack.seq


def test_posting_stored_twice_reported(
    ray_local: None,
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _posted_run(nats_server, tmp_path)
    [(key, copy)] = asyncio.run(_republish(nats_server.url, [1], after_window=True))
    assert _cli(path, "--nats-url", nats_server.url) == 1
    out = capsys.readouterr().out
    assert (
        f"DIFFERENCE posting stored more than once in ERP_POSTINGS: {key}: 2 copies, "
        f"at stream sequences 1, {copy}\n"
    ) in out
    assert "Nats-Msg-Id differs" not in out
    assert "(posting stored more than once in ERP_POSTINGS 1)" in out


def test_copy_under_other_msg_id_reported(
    ray_local: None,
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _posted_run(nats_server, tmp_path)
    [(key, copy)] = asyncio.run(
        _republish(nats_server.url, [1], "resent-1", after_window=False)
    )
    assert _cli(path, "--nats-url", nats_server.url) == 1
    out = capsys.readouterr().out
    assert (
        f"DIFFERENCE posting stored more than once in ERP_POSTINGS: {key}: 2 copies, "
        f"at stream sequences 1, {copy}\n"
    ) in out
    assert (
        "DIFFERENCE Nats-Msg-Id differs from the key in the body: stream sequence "
        f"{copy}: Nats-Msg-Id resent-1, key {key}\n"
    ) in out
    # The copy is counted under the key in its body, not under its header.
    assert "but not in the file" not in out


def test_stream_message_without_key_reported(
    ray_local: None,
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _posted_run(nats_server, tmp_path)

    async def publish_strays() -> tuple[int, int]:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            keyless = await js.publish(
                posting_subject("P01"), b"{}", headers={"Nats-Msg-Id": "stray-1"}
            )
            without_id = await js.publish(posting_subject("P01"), b'{"key": "stray-2"}')
            return keyless.seq, without_id.seq
        finally:
            await nc.close()

    keyless, without_id = asyncio.run(publish_strays())
    assert _cli(path, "--nats-url", nats_server.url) == 1
    out = capsys.readouterr().out
    assert (
        "DIFFERENCE message in ERP_POSTINGS without a posting key: stream sequence "
        f"{keyless}, Nats-Msg-Id stray-1: Object missing required field `key`\n"
    ) in out
    assert (
        "DIFFERENCE Nats-Msg-Id differs from the key in the body: stream sequence "
        f"{without_id}: Nats-Msg-Id missing, key stray-2\n"
    ) in out
    assert "DIFFERENCE posting in ERP_POSTINGS but not in the file: stray-2\n" in out
    # A Nats-Msg-Id is not a posting key, so the keyless message adds no key.
    assert "not in the file: stray-1" not in out


def test_stream_copies_output_bounded(
    ray_local: None,
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _posted_run(nats_server, tmp_path)
    with duckdb.connect(str(path), read_only=True) as connection:
        [(postings,)] = connection.execute("SELECT count(*) FROM postings").fetchall()
    assert postings > 3
    # Every posting published again past the window, as a whole replay a day later
    # would, and the first one six more times.
    copies = asyncio.run(
        _republish(nats_server.url, list(range(1, postings + 1)), after_window=True)
    )
    for _ in range(6):
        copies += asyncio.run(_republish(nats_server.url, [1], after_window=True))
    first_key = copies[0][0]
    first_copies = [seq for key, seq in copies if key == first_key]
    assert len(first_copies) == 7

    assert _cli(path, "--nats-url", nats_server.url, "--max-differences", "3") == 1
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("DIFFERENCE") for line in lines) == 3
    assert f"... and {postings - 3} more" in lines
    assert lines[-1] == (
        f"reconcile: {postings} differences "
        f"(posting stored more than once in ERP_POSTINGS {postings})"
    )
    assert any(
        f"{2 * postings + 6} messages with {postings} distinct posting keys" in line
        for line in lines
    )

    assert _cli(path, "--nats-url", nats_server.url, "--max-differences", "1000") == 1
    listed = ", ".join(map(str, [1, *first_copies[:4]]))
    assert (
        f"{first_key}: 8 copies, at stream sequences {listed} and 3 more\n"
    ) in capsys.readouterr().out


async def _stream_bodies(js: JetStreamContext) -> dict[int, dict[str, Any]]:
    """Return the decoded JSON body of every message in ERP_POSTINGS by sequence."""
    info = await js.stream_info(POSTINGS_STREAM)
    bodies = {}
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        stored = await js.get_msg(POSTINGS_STREAM, seq)
        assert stored.data is not None
        bodies[seq] = json.loads(stored.data)
    return bodies


def _first_of_type(bodies: dict[int, dict[str, Any]], posting_type: str) -> int:
    return min(
        seq for seq, body in bodies.items() if body["posting_type"] == posting_type
    )


async def _publish_changed(
    url: str, changes: dict[int, dict[str, Any]], *, replace: bool
) -> dict[int, tuple[str, int]]:
    """Publish a copy of the posting at each sequence of ERP_POSTINGS with the body
    fields in `changes` set, under its key as Nats-Msg-Id, after the duplicate window.
    With `replace`, delete the original, so that the stream stores the key once.
    Return the key and the stream sequence of the copy, by original sequence."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await _let_duplicate_window_pass(js)
        return {
            seq: await _publish_copy(js, seq, fields=fields, replace=replace)
            for seq, fields in changes.items()
        }
    finally:
        await nc.close()


async def _read_bodies(url: str) -> dict[int, dict[str, Any]]:
    nc = await nats.connect(url)
    try:
        return await _stream_bodies(nc.jetstream())
    finally:
        await nc.close()


def test_stream_body_differences_named(
    ray_local: None,
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _posted_run(nats_server, tmp_path)
    bodies = asyncio.run(_read_bodies(nats_server.url))
    movement_seq = _first_of_type(bodies, "goods_movement")
    confirmation_seq = _first_of_type(bodies, "order_confirmation")
    movement = bodies[movement_seq]
    confirmation = bodies[confirmation_seq]
    movement_type = "102" if movement["movement_type"] != "102" else "101"
    quantity = Decimal(movement["quantity"])
    yield_quantity = Decimal(confirmation["yield_quantity"])
    copies = asyncio.run(
        _publish_changed(
            nats_server.url,
            {
                movement_seq: {
                    "plant": "P99",
                    "movement_type": movement_type,
                    "material": "OTHER-MATERIAL",
                    "quantity": str(quantity + 1),
                    "uom": "ZZZ",
                },
                confirmation_seq: {
                    "yield_quantity": str(yield_quantity + 1),
                    "final": not confirmation["final"],
                    "reverses": "P01-101-other",
                },
            },
            replace=True,
        )
    )
    assert _cli(path, "--nats-url", nats_server.url) == 1
    out = capsys.readouterr().out

    movement_key, movement_copy = copies[movement_seq]
    assert (
        "DIFFERENCE posting in ERP_POSTINGS differs from the file: "
        f"{movement_key} at stream sequence {movement_copy}: "
        f"plant 'P99' in the stream, '{movement['plant']}' in the file; "
        f"movement_type '{movement_type}' in the stream, "
        f"'{movement['movement_type']}' in the file; "
        f"material 'OTHER-MATERIAL' in the stream, '{movement['material']}' in the "
        f"file; quantity {quantity + 1} in the stream, {quantity} in the file; "
        f"uom 'ZZZ' in the stream, '{movement['uom']}' in the file\n"
    ) in out
    confirmation_key, confirmation_copy = copies[confirmation_seq]
    final = confirmation["final"]
    assert (
        "DIFFERENCE posting in ERP_POSTINGS differs from the file: "
        f"{confirmation_key} at stream sequence {confirmation_copy}: "
        f"yield_quantity {yield_quantity + 1} in the stream, {yield_quantity} in the "
        f"file; final {not final} in the stream, {final} in the file; "
        "reverses 'P01-101-other' in the stream, null in the file\n"
    ) in out
    assert out.splitlines()[-1] == (
        "reconcile: 2 differences (posting in ERP_POSTINGS differs from the file 2)"
    )


def test_stream_body_compared_by_value(
    ray_local: None,
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _posted_run(nats_server, tmp_path)
    bodies = asyncio.run(_read_bodies(nats_server.url))
    same_seq, moved_seq = sorted(
        seq for seq, body in bodies.items() if body["posting_type"] == "goods_movement"
    )[:2]

    same = bodies[same_seq]
    same_time = dt.datetime.fromisoformat(same["occurred_at"])
    same_offset = same_time.utcoffset()
    assert same_offset is not None
    six_hours_west = dt.timezone(same_offset - dt.timedelta(hours=6))

    moved = bodies[moved_seq]
    moved_time = dt.datetime.fromisoformat(moved["occurred_at"])
    moved_offset = moved_time.utcoffset()
    assert moved_offset is not None
    one_hour_east = dt.timezone(moved_offset + dt.timedelta(hours=1))

    copies = asyncio.run(
        _publish_changed(
            nats_server.url,
            {
                # The same quantity and instant, written another way.
                same_seq: {
                    "quantity": f"{Decimal(same['quantity']):.12f}",
                    "occurred_at": same_time.astimezone(six_hours_west).isoformat(),
                },
                # The same wall-clock time an hour further east: an hour earlier.
                moved_seq: {
                    "occurred_at": moved_time.replace(tzinfo=one_hour_east).isoformat()
                },
            },
            replace=True,
        )
    )

    assert _cli(path, "--nats-url", nats_server.url) == 1
    out = capsys.readouterr().out
    assert f"  {len(bodies)} message bodies compared column by column" in out
    moved_key, moved_copy = copies[moved_seq]
    stored = moved_time.astimezone(dt.UTC)
    earlier = stored - dt.timedelta(hours=1)
    assert (
        "DIFFERENCE posting in ERP_POSTINGS differs from the file: "
        f"{moved_key} at stream sequence {moved_copy}: occurred_at "
        f"{earlier.isoformat()} in the stream, {stored.isoformat()} in the file\n"
    ) in out
    assert copies[same_seq][0] not in out
    assert out.splitlines()[-1] == (
        "reconcile: 1 differences (posting in ERP_POSTINGS differs from the file 1)"
    )


def test_stream_body_not_a_posting(
    ray_local: None,
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _posted_run(nats_server, tmp_path)
    [(key, copy)] = asyncio.run(
        _publish_changed(nats_server.url, {1: {"plant": 7}}, replace=True)
    ).values()
    assert _cli(path, "--nats-url", nats_server.url) == 1
    out = capsys.readouterr().out
    assert (
        "DIFFERENCE message in ERP_POSTINGS does not decode as a posting: "
        f"{key} at stream sequence {copy}: Expected `str`, got `int` - at `$.plant` "
        "(`plantstream schema postings` prints the posting contract)\n"
    ) in out
    # The message counts under the key in its body all the same.
    assert "but not in ERP_POSTINGS" not in out
    assert out.splitlines()[-1] == (
        "reconcile: 1 differences "
        "(message in ERP_POSTINGS does not decode as a posting 1)"
    )


def test_every_stream_copy_compared(
    ray_local: None,
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _posted_run(nats_server, tmp_path)
    [(key, copy)] = asyncio.run(
        _publish_changed(nats_server.url, {1: {"uom": "ZZZ"}}, replace=False)
    ).values()
    assert _cli(path, "--nats-url", nats_server.url) == 1
    out = capsys.readouterr().out
    assert (
        f"DIFFERENCE posting stored more than once in ERP_POSTINGS: {key}: 2 copies, "
        f"at stream sequences 1, {copy}\n"
    ) in out
    assert (
        f"DIFFERENCE posting in ERP_POSTINGS differs from the file: {key} at stream "
        f"sequence {copy}: uom 'ZZZ' in the stream, "
    ) in out
    # The first copy is the one the file stores.
    assert "at stream sequence 1:" not in out


def test_body_differences_output_bounded(
    ray_local: None,
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _posted_run(nats_server, tmp_path)
    bodies = asyncio.run(_read_bodies(nats_server.url))
    assert len(bodies) > 3
    copies = asyncio.run(
        _publish_changed(
            nats_server.url, {seq: {"uom": "ZZZ"} for seq in bodies}, replace=True
        )
    )
    check = "posting in ERP_POSTINGS differs from the file"

    assert _cli(path, "--nats-url", nats_server.url, "--max-differences", "3") == 1
    lines = capsys.readouterr().out.splitlines()
    printed = [line for line in lines if line.startswith("DIFFERENCE")]
    assert len(printed) == 3
    # The first differences in stream order are the ones printed.
    first_key, first_copy = copies[min(bodies)]
    assert printed[0].startswith(
        f"DIFFERENCE {check}: {first_key} at stream sequence {first_copy}: "
    )
    assert f"... and {len(bodies) - 3} more" in lines
    assert lines[-1] == f"reconcile: {len(bodies)} differences ({check} {len(bodies)})"

    assert _cli(path, "--nats-url", nats_server.url, "--max-differences", "1000") == 1
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith(f"DIFFERENCE {check}: ") for line in lines) == len(
        bodies
    )

    # None printed, but all counted: the exit status still reports them.
    assert _cli(path, "--nats-url", nats_server.url, "--max-differences", "0") == 1
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("DIFFERENCE") for line in lines)
    assert f"... and {len(bodies)} more" in lines
    assert lines[-1] == f"reconcile: {len(bodies)} differences ({check} {len(bodies)})"


def test_stream_body_nested_too_deeply(
    ray_local: None,
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _posted_run(nats_server, tmp_path)
    # A key, then an array nested far beyond what the decoder follows.
    body = b'{"key": "stray-nested", "lineage": ' + b"[" * 100_000 + b"]" * 100_000
    body += b"}"

    async def publish_nested() -> int:
        nc = await nats.connect(nats_server.url)
        try:
            ack = await nc.jetstream().publish(
                posting_subject("P01"), body, headers={"Nats-Msg-Id": "stray-nested"}
            )
            return ack.seq
        finally:
            await nc.close()

    seq = asyncio.run(publish_nested())
    assert _cli(path, "--nats-url", nats_server.url) == 1
    out = capsys.readouterr().out
    assert (
        "DIFFERENCE message in ERP_POSTINGS without a posting key: stream sequence "
        f"{seq}, Nats-Msg-Id stray-nested: JSON nested too deeply to decode. "
    ) in out


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
