"""A service run whose DuckDB file stops accepting writes in the middle of the run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.js.errors
import pytest
from test_recovery import _posting_keys
from test_semantics_support import movement_totals

from cluster import cli
from cluster.nats_server import EmbeddedNatsServer
from pipeline import ingest
from pipeline.publish import publish_all
from pipeline.settings import PipelineSettings
from pipeline.sources.generated import StreamSpec, generate
from pipeline.streams import ensure_streams
from pipeline.subjects import EVENTS_STREAM

pytestmark = pytest.mark.usefixtures("ray_local")

SPEC = StreamSpec(plants=2, orders_per_plant=40, seed=11)

STEP_TIMEOUT_S = 120.0
"""Maximum wait, in seconds, for one step of the run before the test stops the
service itself."""


async def _publish(url: str, messages: list[tuple[str, bytes]]) -> int:
    """Publish `messages` to the plant events stream and return its last sequence."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, PipelineSettings())
        await publish_all(nc, ((subject, data, None) for subject, data in messages))
        info = await js.stream_info(EVENTS_STREAM)
        return int(info.state.last_seq)
    finally:
        await nc.close()


async def _wait_for_ack(url: str, seq: int, run_ended: threading.Event) -> None:
    """Wait until the ingest acknowledged stream sequence `seq`, which it does after
    the checkpoint that covers it, snapshot write included, is committed.

    The file itself is not polled: in the run's own process, DuckDB rejects a
    read-only connection to a file that the writer has open.
    """
    settings = PipelineSettings()
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                info = await js.consumer_info(EVENTS_STREAM, settings.consumer)
                if info.ack_floor is not None and info.ack_floor.stream_seq >= seq:
                    return
            if run_ended.is_set() or time.monotonic() > deadline:
                raise TimeoutError(f"the run did not acknowledge stream sequence {seq}")
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


@pytest.fixture
def restored_signals() -> Iterator[None]:
    """Restore the SIGINT and SIGTERM handlers that `cli.main` replaces."""
    saved = {
        signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@pytest.mark.usefixtures("restored_signals")
def test_unwritable_folder_stops_run_cleanly(
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Two recoveries with short waits, so the run gives up in seconds instead of the
    # default's 45 s or so.
    monkeypatch.setattr(ingest, "MAX_RECOVERIES_WITHOUT_PROGRESS", 2)
    monkeypatch.setattr(ingest, "RECOVERY_FIRST_DELAY_S", 0.05)
    monkeypatch.setattr(ingest, "RECOVERY_MAX_DELAY_S", 0.1)
    monkeypatch.setenv("PLANTSTREAM_CHECKPOINT_INTERVAL_S", "0.3")
    caplog.set_level(logging.INFO)

    generated, expected = generate(SPEC)
    messages = [(m.subject, m.data) for m in generated]
    half = len(messages) // 2
    first_seq = asyncio.run(_publish(nats_server.url, messages[:half]))
    db = tmp_path / "out" / "snapshots.duckdb"
    # chmod does not stop root from writing, and chattr needs e2fsprogs and a file
    # system with the immutable flag. A dangling symlink in place of the write-ahead
    # log makes DuckDB's commit fail for any user, because the folder it points into
    # does not exist.
    wal = db.with_name(f"{db.name}.wal")
    run_ended = threading.Event()
    errors: list[BaseException] = []

    def break_folder_mid_run() -> None:
        try:
            asyncio.run(_wait_for_ack(nats_server.url, first_seq, run_ended))
            wal.symlink_to(tmp_path / "missing" / wal.name)
            asyncio.run(_publish(nats_server.url, messages[half:]))
            if not run_ended.wait(STEP_TIMEOUT_S):
                raise TimeoutError(
                    f"the run did not stop within {STEP_TIMEOUT_S:.0f} s of its "
                    f"write-ahead log path {wal} breaking"
                )
        except BaseException as error:
            errors.append(error)
            # SIGTERM makes the service run set its stop event and end.
            if not run_ended.is_set():
                os.kill(os.getpid(), signal.SIGTERM)

    breaker = threading.Thread(target=break_folder_mid_run)
    breaker.start()
    args = ["run", "--nats-url", nats_server.url, "--db", str(db), "--partitions", "2"]
    try:
        code = cli.main(args)
    finally:
        run_ended.set()
        breaker.join()
        if wal.is_symlink():
            wal.unlink()
    assert not errors, errors

    # The failed commit is a SinkError that the ingest retries, and when it comes back
    # every time the run ends with one ERROR line instead of a traceback.
    assert code == 1
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    message = failures[0].getMessage()
    assert f"DuckDB file {db}:" in message
    assert "No such file or directory" in message
    assert f"make the folder {db.parent} writable" in message
    assert "start again" in message
    assert "Nothing is lost" in message
    assert f"no checkpoint after stream sequence {first_seq}" in message
    assert all(record.exc_info is None for record in caplog.records)
    assert "Traceback" not in capsys.readouterr().err
    recoveries = [r for r in caplog.records if r.getMessage().startswith("recovering")]
    assert len(recoveries) == 2

    # With the folder writable again, a restart stores the rest once.
    code = cli.main([*args, "--until-drained"])
    assert code == 0
    assert movement_totals(db) == expected.movements
    keys = asyncio.run(_posting_keys(nats_server.url))
    assert len(keys) == len(set(keys))
