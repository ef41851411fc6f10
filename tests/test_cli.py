"""The plantstream command, run as a user runs it: a separate process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import duckdb
import nats
import pytest
import ray
from nats.js import JetStreamContext

from cluster.nats_server import EmbeddedNatsServer
from pipeline.settings import PipelineSettings
from pipeline.site_streams import ensure_site_stream
from pipeline.sources.generated import StreamSpec, generate
from pipeline.streams import ensure_streams

PLANTSTREAM = [sys.executable, "-m", "cluster.cli"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PLANTSTREAM, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


_T = TypeVar("_T")


def on_server(url: str, action: Callable[[JetStreamContext], Awaitable[_T]]) -> _T:
    """Run `action` with a JetStream context of the server at `url`, then disconnect."""

    async def connected() -> _T:
        nc = await nats.connect(url)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(connected())


def run_until_drained(
    server: EmbeddedNatsServer, db: Path, *, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "run", "--nats-url", server.url, "--db", str(db), "--until-drained",
        timeout=timeout,
    )  # fmt: skip


def test_demo_prints_summary(tmp_path: Path) -> None:
    db = tmp_path / "demo.duckdb"
    result = run_cli("demo", "--plants", "2", "--orders", "15", "--db", str(db))
    assert result.returncode == 0, result.stderr[-2000:]
    for heading in (
        "messages published",
        "events in",
        "duplicates dropped",
        "dead letters",
        "postings by movement type",
        "OEE per machine",
        "largest material variances",
    ):
        assert heading in result.stdout
    with duckdb.connect(str(db), read_only=True) as connection:
        [(orders,)] = connection.execute("SELECT count(*) FROM orders").fetchall()
        [(letters,)] = connection.execute(
            "SELECT count(*) FROM dead_letters"
        ).fetchall()
    assert orders == 30
    # The figure `plantstream reconcile` prints for the dead_letters table.
    assert f"dead letters         {letters}  (sent to PLANTSTREAM_DLQ" in result.stdout

    # Each demo has its own stream, so a second demo replaces the first one's file.
    again = run_cli("demo", "--plants", "2", "--orders", "5", "--db", str(db))
    assert again.returncode == 0, again.stderr[-2000:]
    with duckdb.connect(str(db), read_only=True) as connection:
        [(orders,)] = connection.execute("SELECT count(*) FROM orders").fetchall()
    assert orders == 10


def test_demo_with_own_event_lines(tmp_path: Path) -> None:
    spec = StreamSpec(
        plants=1, orders_per_plant=2, duplicate_rate=0, bad_rate=0, anomaly_rate=0
    )
    messages, _ = generate(spec)
    # One event that breaks the contract, as a user's own file may hold: the pipeline
    # dead-letters it with its bytes, and the rest are applied.
    broken = messages[-1].data.replace(b'"event_id":"', b'"event_id":"broken-', 1)
    broken = broken.replace(b'"occurred_at":"', b'"occurred_at":"x', 1)
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join([m.data for m in messages] + [broken]) + b"\n")
    db = tmp_path / "own.duckdb"
    result = run_cli("demo", "--input", str(events), "--db", str(db))
    assert result.returncode == 0, result.stderr[-2000:]
    with duckdb.connect(str(db), read_only=True) as connection:
        applied = connection.execute(
            "SELECT count(*) FROM events WHERE status = 'applied'"
        ).fetchall()
        letters = connection.execute("SELECT reason, data FROM dead_letters").fetchall()
        [(postings,)] = connection.execute("SELECT count(*) FROM postings").fetchall()
    assert applied == [(len(messages),)]
    assert letters == [("invalid", broken)]
    assert postings > 0


def test_run_rejects_demo_file(nats_server: EmbeddedNatsServer, tmp_path: Path) -> None:
    db = tmp_path / "demo.duckdb"
    demo = run_cli("demo", "--plants", "1", "--orders", "2", "--db", str(db))
    assert demo.returncode == 0, demo.stderr[-2000:]
    result = run_cli(
        "run", "--nats-url", nats_server.url, "--db", str(db), "--until-drained"
    )
    assert result.returncode == 2
    assert "contains the snapshots of the plant events stream" in result.stderr
    assert "Pass another --db" in result.stderr


def test_partitions_must_be_positive(tmp_path: Path) -> None:
    result = run_cli("demo", "--partitions", "0", "--db", str(tmp_path / "x.duckdb"))
    assert result.returncode == 2
    assert "must be at least 1, got 0" in result.stderr


def test_demo_missing_input(tmp_path: Path) -> None:
    result = run_cli(
        "demo", "--input", str(tmp_path / "nope.csv"), "--db", str(tmp_path / "x")
    )
    assert result.returncode != 0
    assert "nope.csv does not exist" in result.stderr


def test_schema_is_json() -> None:
    result = run_cli("schema", "events")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert "$defs" in schema


def test_summary_counts_forgotten_ids(tmp_path: Path) -> None:
    db = tmp_path / "small.duckdb"
    small = {"PLANTSTREAM_DEDUP_MAX_IDS": "100"}
    result = subprocess.run(
        [*PLANTSTREAM, "demo", "--plants", "1", "--orders", "30", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **small},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "  ids forgotten  " in result.stdout


def test_run_requires_nats_url(tmp_path: Path) -> None:
    result = run_cli("run", "--db", str(tmp_path / "x.duckdb"))
    assert result.returncode != 0
    assert "required: --nats-url" in result.stderr


def test_publish_then_run(
    nats_server: EmbeddedNatsServer, tmp_path: Path, data_dir: Path
) -> None:
    published = run_cli(
        "publish", "--nats-url", nats_server.url, str(data_dir / "secom_labels.data")
    )
    assert published.returncode == 0, published.stderr[-2000:]
    assert "published 4701 events" in published.stdout
    db = tmp_path / "run.duckdb"
    result = run_cli(
        "run", "--nats-url", nats_server.url, "--db", str(db), "--until-drained"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with duckdb.connect(str(db), read_only=True) as connection:
        [(inspections,)] = connection.execute(
            "SELECT count(*) FROM inspections"
        ).fetchall()
    assert inspections == 1567


def test_publish_checks_every_file_first(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    good = b'{"plant":"P1","event_type":"material_consumed","event_id":"e1"}\n'
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.jsonl").write_bytes(good)
    (inputs / "z.jsonl").write_bytes(good + b'{"event_type":"material_consumed"}\n')
    # JSON that is not events, as a config file beside the inputs: skipped.
    (inputs / "settings.json").write_bytes(b'{"name": "line 3"}\n')
    result = run_cli("publish", "--nats-url", nats_server.url, str(inputs))
    assert result.returncode == 2
    assert f"{inputs / 'z.jsonl'}:2: Object missing required field" in result.stderr

    async def stored(js: JetStreamContext) -> int:
        try:
            info = await js.stream_info("PLANT_EVENTS")
        except nats.js.errors.NotFoundError:
            return 0
        return int(info.state.messages)

    assert on_server(nats_server.url, stored) == 0


def test_publish_generated_stream(nats_server: EmbeddedNatsServer) -> None:
    result = run_cli(
        "publish",
        "--nats-url",
        nats_server.url,
        "--generated",
        "--plants",
        "2",
        "--orders",
        "5",
    )
    assert result.returncode == 0, result.stderr[-2000:]

    async def stored() -> int:
        nc = await nats.connect(nats_server.url)
        try:
            info = await nc.jetstream().stream_info("PLANT_EVENTS")
            return info.state.messages
        finally:
            await nc.close()

    count = asyncio.run(stored())
    assert count > 0
    assert f"published {count} events" in result.stdout


def test_publish_needs_files_or_generated(nats_server: EmbeddedNatsServer) -> None:
    neither = run_cli("publish", "--nats-url", nats_server.url)
    assert neither.returncode != 0
    assert "either data files or --generated, not neither" in neither.stderr


def test_closed_output_pipe_is_quiet() -> None:
    # A reader such as `head` that quits early closes the pipe under the command.
    with subprocess.Popen(
        [*PLANTSTREAM, "schema", "events"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.read(10)
        process.stdout.close()
        errors = process.stderr.read()
        code = process.wait(timeout=60)
    assert code == 0
    assert b"Broken pipe" not in errors


def test_run_reports_empty_edge_batches(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    async def publish(js: JetStreamContext) -> None:
        await ensure_streams(js, PipelineSettings())
        await js.publish("plant.events.P1.batch", b"[]")

    on_server(nats_server.url, publish)
    result = run_until_drained(nats_server, tmp_path / "run.duckdb")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "empty edge batches   1" in result.stdout
    assert "messages published" not in result.stdout


def test_server_without_jetstream() -> None:
    with EmbeddedNatsServer(config="port: -1\n") as server:
        result = run_cli("dlq", "list", "--nats-url", server.url, timeout=60)

    assert result.returncode == 2
    assert "JetStream is not available on the NATS server" in result.stderr


def test_run_stream_subject_conflict(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    on_server(
        nats_server.url,
        lambda js: js.add_stream(name="OTHER", subjects=["plant.events.>"]),
    )
    # Without the check, the start retried this refusal with backoff until stopped.
    result = run_until_drained(nats_server, tmp_path / "run.duckdb", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "rejected stream PLANT_EVENTS" in result.stderr
    assert "subjects overlap with an existing stream" in result.stderr
    assert "Stream OTHER already takes these subjects" in result.stderr


def test_run_consumer_over_server_limit(tmp_path: Path) -> None:
    config = (
        "listen: 127.0.0.1:-1\n"
        f"jetstream {{ store_dir: '{tmp_path / 'js'}', "
        "limits { max_ack_pending: 1000 } }\n"
    )
    with EmbeddedNatsServer(config=config) as server:
        # Without the check, the start retried this rejection with backoff until
        # stopped, so the timeout here would end the run.
        db = tmp_path / "run.duckdb"
        result = run_until_drained(server, db, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "rejected consumer plantstream-ingest on PLANT_EVENTS" in result.stderr
    assert "exceeds system limit of 1000" in result.stderr
    assert "PLANTSTREAM_MAX_UNACKED (100000)" in result.stderr
    assert "Traceback" not in result.stderr
    # The failed start created the file, so it removed it again.
    assert not db.exists()


def test_run_needs_room_for_checkpoint_chunks(tmp_path: Path) -> None:
    config = (
        "listen: 127.0.0.1:-1\n"
        "max_payload: 4096\n"
        f"jetstream {{ store_dir: '{tmp_path / 'js'}' }}\n"
    )
    with EmbeddedNatsServer(config=config) as server:
        # Without the check, the first checkpoint failed, and every retry after it.
        result = run_until_drained(server, tmp_path / "run.duckdb", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "takes at most 4,096 bytes per message (max_payload)" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_input_without_events(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "settings.json").write_text('{"name": "line 3"}\n')
    result = run_cli("demo", "--input", str(inputs), "--db", str(tmp_path / "x.db"))
    assert result.returncode == 2
    assert f"no events in {inputs}" in result.stderr


def test_run_rejects_snapshot_file_behind_checkpoint(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    published = run_cli(
        "publish",
        "--generated",
        "--plants",
        "1",
        "--orders",
        "10",
        "--nats-url",
        nats_server.url,
    )
    assert published.returncode == 0, published.stderr[-2000:]
    first_db = tmp_path / "first.duckdb"
    first = run_until_drained(nats_server, first_db)
    assert first.returncode == 0, first.stderr[-2000:]

    # A file moved aside (or another --db) would miss every event the checkpoint
    # covers: without the check, the run went on and left it empty.
    other_db = tmp_path / "other.duckdb"
    rejected = run_until_drained(nats_server, other_db)
    assert rejected.returncode == 2, rejected.stderr[-2000:]
    assert f"{other_db} contains no snapshot rows yet" in rejected.stderr
    assert "Pass the --db file the earlier runs wrote" in rejected.stderr
    # The rejected run created that file, so it deletes it again.
    assert not other_db.exists()

    again = run_until_drained(nats_server, first_db)
    assert again.returncode == 0, again.stderr[-2000:]


def test_publish_at_a_site_uses_the_site_stream(
    nats_server: EmbeddedNatsServer,
) -> None:
    async def stream_names(js: JetStreamContext) -> list[str]:
        return sorted(str(info.config.name) for info in await js.streams_info())

    on_server(nats_server.url, lambda js: ensure_site_stream(js, "P01"))
    publish = ("publish", "--generated", "--orders", "3", "--nats-url")
    own_plant = run_cli(*publish, nats_server.url, "--plants", "1")
    assert own_plant.returncode == 0, own_plant.stderr[-2000:]
    # Without the check, publish created the hub's streams, which the site stream
    # overlaps, and failed with a traceback.
    assert on_server(nats_server.url, stream_names) == ["SITE_P01"]

    two_plants = run_cli(*publish, nats_server.url, "--plants", "2")
    assert two_plants.returncode == 2
    assert "no JetStream stream captures this subject" in two_plants.stderr
    assert "publish only the events of the site's own plant" in two_plants.stderr
    assert re.search(r"\d+ events were stored before publishing", two_plants.stderr)


def test_snapshot_file_that_is_not_duckdb(tmp_path: Path) -> None:
    db = tmp_path / "notes.duckdb"
    db.write_text("not a database\n")
    result = run_cli("demo", "--db", str(db), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot open DuckDB file {db}" in result.stderr
    assert "Traceback" not in result.stderr


def test_site_init_at_the_hub_refused(
    nats_server: EmbeddedNatsServer,
) -> None:
    on_server(nats_server.url, lambda js: ensure_streams(js, PipelineSettings()))
    result = run_cli("site-init", "--plant", "P01", "--nats-url", nats_server.url)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "PLANT_EVENTS is on this server, so it looks like the hub" in result.stderr
    # Removing the stream that takes the subjects would delete the hub's events.
    assert "remove or rename it" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("max_age", "problem"),
    [
        ("-5", "must be 0 (no limit) or a positive number of seconds, got -5"),
        ("nan", "must be 0 (no limit) or a positive number of seconds, got nan"),
        ("1e12", "must be at most 9,223,372,036 s (about 292 years)"),
        ("30", "must be 0 (no limit) or at least 60 s, got 30"),
        ("1e-400", "must be 0 (no limit) or at least 60 s, got 1e-400"),
        ("soon", "'soon' is not a number of seconds"),
    ],
)
def test_site_init_rejects_max_age(max_age: str, problem: str) -> None:
    result, elapsed = run_timed(
        "site-init", "--plant", "P01", "--nats-url", closed_port_url(),
        "--max-age-s", max_age,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr[-2000:]
    assert problem in result.stderr
    assert elapsed < QUICK_FAILURE_S


def test_site_init_short_max_age(nats_server: EmbeddedNatsServer) -> None:
    # A retention below the 120 s duplicate window used to be refused by the server,
    # with advice to remove the stream.
    result = run_cli(
        "site-init", "--plant", "P01", "--nats-url", nats_server.url,
        "--max-age-s", "90",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]

    async def config(js: JetStreamContext) -> tuple[float | None, float | None]:
        info = await js.stream_info("SITE_P01")
        return info.config.max_age, info.config.duplicate_window

    assert on_server(nats_server.url, config) == (90.0, 90.0)


def test_publish_at_a_site_before_site_init(tmp_path: Path) -> None:
    config = (
        "listen: 127.0.0.1:-1\n"
        f"jetstream {{ store_dir: '{tmp_path / 'js'}', domain: site-P01 }}\n"
    )
    with EmbeddedNatsServer(config=config) as server:
        result = run_cli(
            "publish", "--generated", "--plants", "1", "--nats-url", server.url
        )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "plant site site-P01 and has no buffer stream yet" in result.stderr
    assert "plantstream site-init --plant P01" in result.stderr


QUICK_FAILURE_S = 10.0
"""Maximum seconds for a command that rejects its options before connecting. A
connection attempt waits 15 s (NATS_CONNECT_TIMEOUT_S), and starting Ray takes
seconds too."""


def closed_port_url() -> str:
    """Return a NATS URL of a loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"nats://127.0.0.1:{probe.getsockname()[1]}"


def run_timed(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = run_cli(*args, timeout=60)
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:1", "has the scheme 'http'"),
        ("nats//127.0.0.1:1", "has no scheme"),
        ("127.0.0.1:4222", "has no scheme"),
        ("nats://127.0.0.1:99999", "has the port '99999', which is not a number"),
        ("nats://127.0.0.1:", "has the port '', which is not a number"),
        ("nats://127.0.0.1:0", "has the port '0', which is not a number"),
        ("nats://[::1]:-1", "has the port '-1', which is not a number"),
        ("nats://[::1", "is invalid (Invalid IPv6 URL)"),
        ("nats://:4222", "has no host"),
    ],
)
def test_run_rejects_malformed_nats_url(tmp_path: Path, url: str, problem: str) -> None:
    # Without the check, the run waited 15 s for the connection and then reported
    # only "(TimeoutError)" or "(Error)".
    db = str(tmp_path / "x.duckdb")
    result, elapsed = run_timed("run", "--nats-url", url, "--db", db)

    assert result.returncode == 2, result.stderr[-2000:]
    assert f"NATS URL {url!r} {problem}" in result.stderr
    assert "e.g. nats://127.0.0.1:4222" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < QUICK_FAILURE_S


def test_every_command_checks_nats_url(tmp_path: Path) -> None:
    url = "nats//127.0.0.1:1"
    commands = [
        ("demo", "--db", str(tmp_path / "x.duckdb"), "--nats-url", url),
        ("publish", "--generated", "--nats-url", url),
        ("site-init", "--plant", "P01", "--nats-url", url),
        ("site-remove", "--plant", "P01", "--nats-url", url),
        ("dlq", "list", "--nats-url", url),
        ("dlq", "dismiss", "--seq", "1", "--note", "x", "--nats-url", url),
        ("checkpoints", "reset", "--yes", "--nats-url", url),
        ("replay", "--plant", "P01", "--from-seq", "1", "--nats-url", url),
    ]
    for command in commands:
        result, elapsed = run_timed(*command)

        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert f"NATS URL {url!r} has no scheme" in result.stderr, command
        assert elapsed < QUICK_FAILURE_S, command


def test_nats_url_password_not_shown(tmp_path: Path) -> None:
    url = "http://user:secret@127.0.0.1:4222"
    result, _ = run_timed("run", "--nats-url", url, "--db", str(tmp_path / "x"))

    assert result.returncode == 2, result.stderr[-2000:]
    assert "'http://127.0.0.1:4222' has the scheme 'http'" in result.stderr
    assert "secret" not in result.stderr


def snapshot_commands(db: Path) -> list[tuple[str, ...]]:
    """Return every command that writes a --db file, with a NATS URL that nothing
    serves: the path must be rejected before any connection."""
    url = closed_port_url()
    return [
        ("demo", "--db", str(db)),
        ("run", "--nats-url", url, "--db", str(db)),
        ("replay", "--plant", "P01", "--from-seq", "1", "--nats-url", url, "--db",
         str(db)),
    ]  # fmt: skip


def test_db_that_is_a_folder(tmp_path: Path) -> None:
    # Without the check, the commands processed the stream and then reported the
    # existing folder as "snapshot file ... not found".
    for command in snapshot_commands(tmp_path):
        result, elapsed = run_timed(*command)

        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert f"snapshot file {tmp_path} is a folder, not a file" in result.stderr
        assert str(tmp_path / "plantstream.duckdb") in result.stderr
        assert elapsed < QUICK_FAILURE_S, command

    reconcile = run_cli("reconcile", "--db", str(tmp_path), timeout=60)
    assert reconcile.returncode == 2
    assert f"snapshot file {tmp_path} is a folder, not a file" in reconcile.stderr


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    ("db", "problem"),
    [
        # procfs rejects new files even from root, although os.access allows them.
        ("/proc/plantstream-test.duckdb", "folder /proc of snapshot file"),
        ("/proc/plantstream-test/x.duckdb", "folder /proc/plantstream-test of"),
    ],
)
def test_db_in_folder_not_writable(db: str, problem: str) -> None:
    for command in snapshot_commands(Path(db)):
        result, elapsed = run_timed(*command)

        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert problem in result.stderr, command
        assert "pass --db a path in a folder you can write to" in result.stderr
        assert elapsed < QUICK_FAILURE_S, command


def test_db_below_a_file(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder\n")
    for command in snapshot_commands(notes / "x.duckdb"):
        result, _ = run_timed(*command)

        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert f"{notes} in snapshot file path" in result.stderr, command
        assert "is a file, not a folder" in result.stderr, command


def test_db_json_file_rejected(tmp_path: Path) -> None:
    # DuckDB 2.0.1 opens a .json file as data on an in-memory database, so a run
    # would have written its snapshots to memory only.
    db = tmp_path / "x.json"
    db.write_text('{"not": "a database"}\n')
    for command in snapshot_commands(db):
        result, _ = run_timed(*command)

        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert f"cannot open DuckDB file {db}: it is not a DuckDB" in result.stderr
    assert db.read_text() == '{"not": "a database"}\n'


def test_reconcile_file_that_is_not_duckdb(tmp_path: Path) -> None:
    for name in ("x.json", "notes.duckdb"):
        db = tmp_path / name
        db.write_text("not a database\n")
        result = run_cli("reconcile", "--db", str(db), timeout=60)

        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr, name
        assert f"reconcile: cannot open DuckDB file {db}" in result.stderr, name
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_partitions_above_maximum(tmp_path: Path) -> None:
    # Without the bound, the run started Ray and one actor per partition first.
    db = str(tmp_path / "x.duckdb")
    url = closed_port_url()
    result, elapsed = run_timed("run", "--partitions", "100000", "--nats-url", url,
                                "--db", db)  # fmt: skip

    assert result.returncode == 2, result.stderr[-2000:]
    assert "--partitions 100000 is out of range; use 1 to 256" in result.stderr
    assert elapsed < QUICK_FAILURE_S


def test_partitions_changed_between_runs(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "run.duckdb"
    for seed, partitions in (("1", "2"), ("2", "3"), ("3", "1")):
        published = run_cli(
            "publish", "--generated", "--plants", "2", "--orders", "4", "--seed",
            seed, "--nats-url", nats_server.url, timeout=60,
        )  # fmt: skip
        assert published.returncode == 0, published.stderr[-2000:]
        result = run_cli(
            "run", "--partitions", partitions, "--nats-url", nats_server.url,
            "--db", str(db), "--until-drained", timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    # The last run split the three partitions of the run before it.
    assert "splitting the checkpoint's 3 partitions among 1" in result.stderr

    reconcile = run_cli("reconcile", "--db", str(db), timeout=60)
    assert reconcile.returncode == 0, reconcile.stdout[-2000:]
    with duckdb.connect(str(db), read_only=True) as connection:
        [(orders,)] = connection.execute("SELECT count(*) FROM orders").fetchall()
    assert orders == 3 * 2 * 4


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=str)
def test_run_stops_on_early_signal(
    nats_server: EmbeddedNatsServer, tmp_path: Path, signum: signal.Signals
) -> None:
    process = subprocess.Popen(
        [
            *PLANTSTREAM,
            "run",
            "--nats-url",
            nats_server.url,
            "--db",
            str(tmp_path / "db.duckdb"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    # Ray's first processes are the run's children, so once one exists Ray is
    # starting, which takes seconds more. On a fast machine the signal may still land
    # in the running service, which stops as well.
    deadline = time.monotonic() + 60
    while not _children(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)

    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        # Without the early handler, SIGINT was lost and the run went on.
        process.kill()
        process.communicate()
        message = f"plantstream run ignored {signum.name} for 60 s"
        raise AssertionError(message) from None

    # Without it, SIGTERM met Ray's own handler, which exited with code 15 from the
    # middle of Ray's start and left two of Ray's agent processes running.
    assert process.returncode == 0, stderr[-2000:]
    assert (
        f"received {signum.name} while starting" in stderr
        or f"received {signum.name}: stopping, after a last checkpoint" in stderr
    )


def _children(pid: int) -> list[int]:
    """Return the ids of the processes whose parent is `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.usefixtures("ray_local")
def test_command_leaves_callers_ray_running() -> None:
    # main() shuts down only a Ray instance that its command started: a caller's own
    # instance, such as this session's, must outlive the command.
    from cluster.cli import main

    assert main(["schema", "events"]) == 0
    assert ray.is_initialized()
