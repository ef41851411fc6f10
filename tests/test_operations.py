"""Replay and the dead-letter commands against a real nats-server, Ray and DuckDB."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from decimal import Decimal
from pathlib import Path

import duckdb
import msgspec
import nats
import pytest
from test_semantics_support import movement_totals

from actors.settings import StateSettings
from cluster.cli import main
from cluster.job import JobConfig, JobResult, run_job
from cluster.lease import IngestLease
from cluster.nats_server import EmbeddedNatsServer
from cluster.operations import (
    DeadLetterEntry,
    OperationError,
    ReplayReport,
    _format_entries,
    list_dead_letters,
    posting_keys,
    read_checkpoint,
    replay_plant,
    retry_dead_letters,
)
from contracts.codec import encode
from contracts.dead_letters import DeadLetter
from contracts.events import (
    ConsumptionReversed,
    MaterialConsumed,
    ProductionConfirmed,
    Quantity,
    WorkOrderReleased,
)
from pipeline.checkpoints import CheckpointManifest
from pipeline.settings import PipelineSettings
from pipeline.sources.generated import Expected, StreamSpec, generate
from pipeline.streams import ensure_streams
from pipeline.subjects import (
    DLQ_STREAM,
    EVENTS_STREAM,
    POSTINGS_STREAM,
    dlq_subject,
    event_subject,
)

pytestmark = pytest.mark.usefixtures("ray_local")

SPEC = StreamSpec(plants=2, orders_per_plant=40, seed=3)
SETTINGS = PipelineSettings(fetch_batch=500, checkpoint_interval_s=0.3)


def _run(
    server: EmbeddedNatsServer,
    db: Path,
    messages: list[tuple[str, bytes]] | None,
    state: StateSettings | None = None,
) -> JobResult:
    config = JobConfig(
        db=db,
        nats_url=server.url,
        pipeline=SETTINGS,
        state=state or StateSettings(),
    )
    return asyncio.run(run_job(config, messages))


_RELEASED_AT = dt.datetime(2026, 1, 5, 6, 0, tzinfo=dt.UTC)


def _release() -> WorkOrderReleased:
    """Return the release of order 4711 of plant P01."""
    return WorkOrderReleased(
        event_id="r-1",
        plant="P01",
        occurred_at=_RELEASED_AT,
        source="mes",
        order="4711",
        material="FG-1",
        quantity=Quantity(value=Decimal(10), uom="EA"),
    )


async def _replay(url: str, **options: object) -> ReplayReport:
    return await _replay_plant(url, "P01", **options)


async def _replay_plant(url: str, plant: str, **options: object) -> ReplayReport:
    nc = await nats.connect(url)
    try:
        return await replay_plant(nc, plant, **options)  # type: ignore[arg-type]
    finally:
        await nc.close()


async def _keys(url: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        return await posting_keys(nc.jetstream())
    finally:
        await nc.close()


async def _readers_left(url: str) -> list[str]:
    """Return the consumers without a durable name on plantstream's streams."""
    nc = await nats.connect(url)
    try:
        jsm = nc.jsm()
        return [
            f"{stream}/{info.name}"
            for stream in (EVENTS_STREAM, POSTINGS_STREAM, DLQ_STREAM)
            for info in await jsm.consumers_info(stream)
            if not info.config.durable_name
        ]
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def stream() -> tuple[list[tuple[str, bytes]], Expected]:
    messages, expected = generate(SPEC)
    return [(m.subject, m.data) for m in messages], expected


@pytest.fixture
def processed(
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    stream: tuple[list[tuple[str, bytes]], Expected],
) -> Path:
    db = tmp_path / "db.duckdb"
    _run(nats_server, db, stream[0])
    return db


def test_replay_whole_plant_posts_nothing_new(
    nats_server: EmbeddedNatsServer, processed: Path
) -> None:
    keys_before = asyncio.run(_keys(nats_server.url))
    report = asyncio.run(_replay(nats_server.url, from_seq=1, db=processed))
    keys_after = asyncio.run(_keys(nats_server.url))
    assert report.regenerated > 0
    assert report.new == 0
    assert report.already_posted == report.regenerated
    assert report.before_start == 0
    assert keys_after == keys_before
    # The replay's readers are deleted when done, not left to the server's timeout.
    assert asyncio.run(_readers_left(nats_server.url)) == []


def test_replay_regenerates_every_plant_posting(
    nats_server: EmbeddedNatsServer, processed: Path
) -> None:
    keys = asyncio.run(_keys(nats_server.url))
    report = asyncio.run(_replay(nats_server.url, from_seq=1))
    assert report.regenerated == sum(1 for key in keys if key.startswith("P01-"))


def test_replay_keeps_state_and_totals(
    nats_server: EmbeddedNatsServer,
    processed: Path,
    tmp_path: Path,
    stream: tuple[list[tuple[str, bytes]], Expected],
) -> None:
    asyncio.run(_replay(nats_server.url, from_seq=1, db=processed))
    # A second run finds nothing pending and reports the replayed checkpoint's totals.
    result = _run(nats_server, processed, None)
    assert result.totals["applied"] == stream[1].events
    assert movement_totals(processed) == stream[1].movements


def test_replay_from_later_seq_counts_before_start(
    nats_server: EmbeddedNatsServer, processed: Path
) -> None:
    report = asyncio.run(_replay(nats_server.url, from_seq=2000))
    assert report.before_start > 0
    assert report.before_start_missing == 0
    assert report.new == 0


def test_replay_from_future_time_publishes_nothing(
    nats_server: EmbeddedNatsServer, processed: Path
) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    report = asyncio.run(_replay(nats_server.url, from_time=later))
    assert report.regenerated == 0
    assert report.before_start > 0


def test_replay_cli_prints_counts(
    nats_server: EmbeddedNatsServer,
    processed: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        ["replay", "--nats-url", nats_server.url, "--plant", "P01", "--from-seq", "1"]
    )
    output = capsys.readouterr().out
    assert code == 0
    assert "new (published)           0" in output


def test_replay_without_checkpoint_rejected(nats_server: EmbeddedNatsServer) -> None:
    with pytest.raises(OperationError, match="no checkpoint"):
        asyncio.run(_replay(nats_server.url, from_seq=1))


def test_replay_wrong_partitions_rejected(
    nats_server: EmbeddedNatsServer, processed: Path
) -> None:
    with pytest.raises(OperationError, match="--partitions 2"):
        asyncio.run(_replay(nats_server.url, from_seq=1, partitions=3))


def test_replay_naive_time_rejected(
    nats_server: EmbeddedNatsServer, processed: Path
) -> None:
    with pytest.raises(OperationError, match="no UTC offset"):
        asyncio.run(_replay(nats_server.url, from_time=dt.datetime(2026, 1, 1)))


def test_replay_leaves_checkpoint_sequence(
    nats_server: EmbeddedNatsServer, processed: Path
) -> None:
    async def manifest_seq() -> int:
        nc = await nats.connect(nats_server.url)
        try:
            checkpoint = await read_checkpoint(nc.jetstream())
        finally:
            await nc.close()
        assert checkpoint is not None
        return checkpoint[0].stream_seq

    before = asyncio.run(manifest_seq())
    asyncio.run(_replay(nats_server.url, from_seq=1))
    assert asyncio.run(manifest_seq()) == before


async def _manifest(url: str) -> CheckpointManifest:
    nc = await nats.connect(url)
    try:
        checkpoint = await read_checkpoint(nc.jetstream())
    finally:
        await nc.close()
    assert checkpoint is not None
    return checkpoint[0]


def test_checkpoints_reset_needs_yes(
    nats_server: EmbeddedNatsServer, processed: Path
) -> None:
    before = asyncio.run(_manifest(nats_server.url))
    with pytest.raises(SystemExit) as caught:
        main(["checkpoints", "reset", "--nats-url", nats_server.url])

    assert "add --yes" in str(caught.value.code)
    assert asyncio.run(_manifest(nats_server.url)) == before


def test_checkpoints_reset_rejected_under_lease(
    nats_server: EmbeddedNatsServer, processed: Path
) -> None:
    # A run that is paused or writing a checkpoint has no fetch waiting, but it still
    # holds the lease, and its next commit would need the deleted bucket.
    async def take_lease() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            lease = IngestLease(nc.jetstream())
            await lease.acquire()
        finally:
            await nc.close()

    before = asyncio.run(_manifest(nats_server.url))
    asyncio.run(take_lease())

    with pytest.raises(SystemExit) as caught:
        main(["checkpoints", "reset", "--nats-url", nats_server.url, "--yes"])

    assert "plantstream run holds the ingest lease (process" in str(caught.value.code)
    assert asyncio.run(_manifest(nats_server.url)) == before


def test_checkpoints_reset_run_starts_over(
    nats_server: EmbeddedNatsServer,
    processed: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = asyncio.run(_manifest(nats_server.url))
    keys_before = asyncio.run(_keys(nats_server.url))

    code = main(["checkpoints", "reset", "--nats-url", nats_server.url, "--yes"])

    assert code == 0
    assert (
        f"(the checkpoint at stream sequence {manifest.stream_seq}, 2 partitions)"
        in capsys.readouterr().out
    )
    assert asyncio.run(_checkpoint_or_none(nats_server.url)) is None
    # The next run applies the whole stream again; the postings stream's duplicate
    # window drops every posting it recomputes.
    again = _run(nats_server, tmp_path / "again.duckdb", None)
    assert again.report.counts["events_in"] == manifest.stream_seq
    assert asyncio.run(_keys(nats_server.url)) == keys_before


def test_checkpoints_reset_without_bucket(
    nats_server: EmbeddedNatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["checkpoints", "reset", "--nats-url", nats_server.url, "--yes"])

    assert code == 0
    assert "nothing to reset" in capsys.readouterr().out


async def _checkpoint_or_none(url: str) -> object:
    nc = await nats.connect(url)
    try:
        return await read_checkpoint(nc.jetstream())
    finally:
        await nc.close()


def test_replay_unknown_plant_rejected(
    nats_server: EmbeddedNatsServer, processed: Path
) -> None:
    before = asyncio.run(_manifest(nats_server.url))
    with pytest.raises(SystemExit) as caught:
        main(
            ["replay", "--nats-url", nats_server.url]
            + ["--plant", "NOPE", "--from-seq", "1"]
        )
    message = str(caught.value.code)
    assert message.startswith("plantstream replay: plant NOPE has no events")
    assert "Plants with events: P01, P02." in message
    assert "Check the --plant value" in message
    # The error comes before the checkpoint is rewritten.
    assert asyncio.run(_manifest(nats_server.url)) == before


def test_replay_plant_after_checkpoint_rejected(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    _run(nats_server, tmp_path / "db.duckdb", _fixable_stream())
    before = asyncio.run(_manifest(nats_server.url))

    async def publish_later_plant() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            release = msgspec.structs.replace(_release(), plant="P09")
            await nc.jetstream().publish(
                event_subject("P09", "work_order_released"), encode(release)
            )
        finally:
            await nc.close()

    asyncio.run(publish_later_plant())
    with pytest.raises(OperationError, match="plant P09 has no events") as caught:
        asyncio.run(_replay_plant(nats_server.url, "P09", from_seq=1))
    assert "Its events come later in the stream" in str(caught.value)
    assert asyncio.run(_manifest(nats_server.url)) == before


def _report(good: int = 4, source: str = "mes") -> ProductionConfirmed:
    """Return a production report of order 4711, an hour after its release."""
    return ProductionConfirmed(
        event_id="p-1",
        plant="P01",
        occurred_at=_RELEASED_AT + dt.timedelta(hours=1),
        source=source,
        order="4711",
        good=Quantity(value=Decimal(good), uom="EA"),
    )


@pytest.mark.parametrize(
    ("event_type", "source"),
    [("material_consumed", "mes"), ("production_confirmed", "mes\x00line")],
    ids=["other_type_subject", "nul_in_source"],
)
def test_replay_skips_rejected_event(
    nats_server: EmbeddedNatsServer, tmp_path: Path, event_type: str, source: str
) -> None:
    messages = [
        (event_subject("P01", "work_order_released"), encode(_release())),
        (event_subject("P01", event_type), encode(_report(source=source))),
    ]
    result = _run(nats_server, tmp_path / "db.duckdb", messages)
    assert result.totals["dead_letter:invalid"] == 1

    # The ingest dead-lettered the report, so replay must not post it either.
    replayed = asyncio.run(_replay(nats_server.url, from_seq=1))
    assert replayed.regenerated == 0
    assert replayed.new == 0
    assert replayed.dead_letters == {"invalid": 1}


def test_replay_counts_reused_id_again(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    subject = event_subject("P01", "production_confirmed")
    messages = [
        (event_subject("P01", "work_order_released"), encode(_release())),
        (subject, encode(_report(good=4))),
        (subject, encode(_report(good=5))),
    ]
    result = _run(nats_server, tmp_path / "db.duckdb", messages)
    assert result.totals["dead_letter:reused_id"] == 1

    # The replay applies the plant's messages again, so it meets the reuse again.
    replayed = asyncio.run(_replay(nats_server.url, from_seq=1))
    assert replayed.dead_letters == {"reused_id": 1}
    assert replayed.new == 0


# -- dead letters ----------------------------------------------------------------------


def _fixable_stream() -> list[tuple[str, bytes]]:
    """Return an order and a consumption stamped a year ahead, as a fast clock does."""
    release = _release()
    consumption = MaterialConsumed(
        event_id="c-1",
        plant="P01",
        occurred_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=365),
        source="mes",
        order="4711",
        material="RM-1",
        quantity=Quantity(value=Decimal(3), uom="KG"),
    )
    return [
        (event_subject("P01", "work_order_released"), encode(release)),
        (event_subject("P01", "material_consumed"), encode(consumption)),
    ]


def _dead_letter_ids(url: str, **filters: str) -> list[str]:
    async def read() -> list[str]:
        nc = await nats.connect(url)
        try:
            entries = await list_dead_letters(nc.jetstream(), **filters)
        finally:
            await nc.close()
        return [entry.letter_id for entry in entries]

    return asyncio.run(read())


def test_dlq_list_one_entry_per_letter(
    nats_server: EmbeddedNatsServer,
    processed: Path,
) -> None:
    ids = _dead_letter_ids(nats_server.url)
    with duckdb.connect(str(processed), read_only=True) as connection:
        stored = connection.execute("SELECT count(*) FROM dead_letters").fetchone()
    assert len(ids) == len(set(ids))
    assert (len(ids),) == stored


def test_dlq_list_filters_reason_and_plant(
    nats_server: EmbeddedNatsServer, processed: Path
) -> None:
    every = _dead_letter_ids(nats_server.url)
    # The plant of some malformed letter, whichever the generated stream chose.
    plant = next(i.split(".")[2] for i in every if i.endswith(":malformed"))
    ids = _dead_letter_ids(nats_server.url, reason="malformed", plant=plant)
    assert ids
    assert len(ids) < len(every)
    assert all(letter.endswith(":malformed") for letter in ids)
    assert all(letter.startswith(f"plant.events.{plant}.") for letter in ids)


def test_dlq_retry_applies_fixed_letter(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "db.duckdb"
    first = _run(nats_server, db, _fixable_stream())
    assert first.totals["dead_letter:future_time"] == 1

    code = main(
        ["dlq", "retry", "--nats-url", nats_server.url, "--reason", "future_time"]
    )
    assert code == 0
    # The cause is fixed: this host now accepts timestamps far ahead of its clock.
    fixed = StateSettings(max_future_s=10 * 365 * 86400.0)
    second = _run(nats_server, db, None, fixed)
    assert second.totals["applied"] == first.totals["applied"] + 1
    # The retried event applied under the letter's event id, which resolves it.
    assert second.totals["dead_letters_resolved"] == 1
    with duckdb.connect(str(db), read_only=True) as connection:
        issues = connection.execute(
            "SELECT count(*) FROM postings WHERE movement_type = '261'"
        ).fetchone()
    assert issues == (1,)


def test_dlq_retry_all_leaves_out_malformed(
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken = (event_subject("P01", "material_consumed"), b'{"event_id": "c-2", ')
    _run(nats_server, tmp_path / "db.duckdb", [*_fixable_stream(), broken])
    capsys.readouterr()

    assert main(["dlq", "retry", "--nats-url", nats_server.url, "--all"]) == 0
    output = capsys.readouterr().out
    retried = {e.letter.reason for e in asyncio.run(_entries(nats_server.url))
               if e.retried is not None}  # fmt: skip
    assert retried == {"future_time"}
    assert "not retried: 1 malformed, invalid or reused_id dead letters" in output
    # It names no plant, so its row takes the plant of its subject.
    with duckdb.connect(str(tmp_path / "db.duckdb"), read_only=True) as connection:
        plants = connection.execute(
            "SELECT reason, plant FROM dead_letters ORDER BY reason"
        ).fetchall()
    assert plants == [("future_time", "P01"), ("malformed", "P01")]
    # Named by its reason, the letter is sent anyway.
    assert (
        main(["dlq", "retry", "--nats-url", nats_server.url, "--reason", "malformed"])
        == 0
    )
    assert "retried 1 dead letters" in capsys.readouterr().out


def test_dlq_dismiss_closes_letter(
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _run(nats_server, tmp_path / "db.duckdb", _fixable_stream())
    url = nats_server.url
    capsys.readouterr()
    # Sequence 2 is the future_time letter of plant P01.
    note = ["--note", "posted by hand in the ERP"]
    assert main(["dlq", "dismiss", "--nats-url", url, "--seq", "2", *note]) == 0
    assert "dismissed 1 dead letters; skipped 0" in capsys.readouterr().out

    [entry] = asyncio.run(_entries(url))
    assert entry.dismissed is not None
    assert entry.dismissed.note == "posted by hand in the ERP"
    assert main(["dlq", "list", "--nats-url", url]) == 0
    assert "dismissed: posted by hand in the ERP" in capsys.readouterr().out
    assert main(["dlq", "list", "--nats-url", url, "--open"]) == 0
    assert capsys.readouterr().out == "no dead letters match\n"
    assert main(["dlq", "retry", "--nats-url", url, "--all"]) == 0
    assert "retried 0 dead letters" in capsys.readouterr().out
    assert main(["dlq", "dismiss", "--nats-url", url, "--seq", "2", *note]) == 0
    assert "dismissed 0 dead letters; skipped 1" in capsys.readouterr().out


def test_dlq_list_negative_limit_rejected(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = "nats://127.0.0.1:1"
    with pytest.raises(SystemExit) as exited:
        main(["dlq", "list", "--nats-url", url, "--limit", "-1"])
    assert exited.value.code == 2
    assert "must be 0 or more, got -1" in capsys.readouterr().err


def test_dlq_retry_not_repeated(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    _run(nats_server, tmp_path / "db.duckdb", _fixable_stream())

    async def retry_twice() -> tuple[int, int, Counter[bool]]:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            first = await retry_dead_letters(js, await list_dead_letters(js))
            second = await retry_dead_letters(js, await list_dead_letters(js))
            marked = Counter(e.retried is not None for e in await list_dead_letters(js))
        finally:
            await nc.close()
        return len(first), len(second), marked

    first, second, marked = asyncio.run(retry_twice())
    assert first == 1
    assert second == 0
    assert marked == Counter({True: 1})


def test_dlq_retry_missing_seq_message(
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _run(nats_server, tmp_path / "db.duckdb", _fixable_stream())
    capsys.readouterr()
    # Sequence 2 is the dead letter of plant P01, which --plant NOPE leaves out.
    filtered = main(
        ["dlq", "retry", "--nats-url", nats_server.url]
        + ["--seq", "2", "--plant", "NOPE"]
    )
    filtered_error = capsys.readouterr().err
    # Sequence 1 is an event that was applied, so it has no dead letter at all.
    unfiltered = main(["dlq", "retry", "--nats-url", nats_server.url, "--seq", "1"])
    unfiltered_error = capsys.readouterr().err

    assert filtered == 2
    assert "no dead letter of plant NOPE for PLANT_EVENTS sequence 2" in filtered_error
    assert "plantstream dlq list --plant NOPE" in filtered_error
    assert unfiltered == 2
    assert "no dead letter for PLANT_EVENTS sequence 1;" in unfiltered_error
    assert "of plant" not in unfiltered_error
    assert all(e.retried is None for e in asyncio.run(_entries(nats_server.url)))


def test_dlq_retry_skips_letters_of_site_losses(
    nats_server: EmbeddedNatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    letter = DeadLetter(
        reason="lost_at_site",
        detail="SITE_P01 lost sequences 20 to 24 (5 messages)",
        subject=event_subject("P01", "production_confirmed"),
        stream_seq=20,
        data=b"",
        rejected_at=dt.datetime.now(dt.UTC),
    )

    async def file_letter() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await ensure_streams(js, SETTINGS)
            await js.publish(dlq_subject("P01"), encode(letter))
        finally:
            await nc.close()

    asyncio.run(file_letter())
    code = main(["dlq", "retry", "--nats-url", nats_server.url, "--all"])

    assert code == 0
    out = capsys.readouterr().out
    assert "retried 0 dead letters" in out
    assert "not retried: 1 lost_at_site dead letters" in out
    # Retrying would have published its empty body as an event.
    assert asyncio.run(_stream_messages(nats_server.url, EVENTS_STREAM)) == 0


async def _stream_messages(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(stream)
        return info.state.messages
    finally:
        await nc.close()


async def _entries(url: str) -> list[DeadLetterEntry]:
    nc = await nats.connect(url)
    try:
        return await list_dead_letters(nc.jetstream())
    finally:
        await nc.close()


def test_dlq_list_cli_prints_letters(
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _run(nats_server, tmp_path / "db.duckdb", _fixable_stream())
    capsys.readouterr()
    code = main(["dlq", "list", "--nats-url", nats_server.url, "--plant", "P01"])
    output = capsys.readouterr().out
    assert code == 0
    assert "future_time" in output
    assert "c-1" in output


def test_dlq_list_long_id_widens_no_other_row() -> None:
    def entry(seq: int, event_id: str) -> DeadLetterEntry:
        letter = DeadLetter(
            reason="invalid", detail="bad", subject="plant.events.P1.x", stream_seq=seq,
            data=b"{}", rejected_at=dt.datetime(2026, 1, 5, tzinfo=dt.UTC),
            event_id=event_id,
        )  # fmt: skip
        return DeadLetterEntry(seq, letter)

    short, long = entry(1, "e1"), entry(2, "e" * 300)
    alone = _format_entries([short])
    together = _format_entries([short, long])
    assert together[0] == alone[0]
    assert together[1] == alone[1]
    assert all(line == line.rstrip() for line in together)


def test_dlq_list_shows_whole_detail() -> None:
    detail = "order O1 was evicted; " + "context " * 40 + "then retry this dead letter"
    letter = DeadLetter(
        reason="order_closed", detail=detail, subject="plant.events.P1.x",
        stream_seq=7, data=b"{}", rejected_at=dt.datetime(2026, 1, 5, tzinfo=dt.UTC),
    )  # fmt: skip
    lines = _format_entries([DeadLetterEntry(7, letter)])
    # A header line and the row, then the detail.
    wrapped = " ".join(line.strip() for line in lines[2:])
    assert wrapped == detail.strip()
    assert all(len(line) <= 100 for line in lines[2:])


def _consumption_and_reversal(reverses: str) -> list[tuple[str, bytes]]:
    """Return a consumption of order 4711 and reversal x-1 of event `reverses`."""
    at = _RELEASED_AT + dt.timedelta(hours=1)
    consumption = MaterialConsumed(
        event_id="c-1", plant="P01", occurred_at=at, source="mes", order="4711",
        material="RM-1", quantity=Quantity(value=Decimal(3), uom="KG"),
    )  # fmt: skip
    reversal = ConsumptionReversed(
        event_id="x-1", plant="P01", occurred_at=at, source="mes", order="4711",
        reverses_event_id=reverses,
    )  # fmt: skip
    return [
        (event_subject("P01", "material_consumed"), encode(consumption)),
        (event_subject("P01", "consumption_reversed"), encode(reversal)),
    ]


def test_corrected_event_resolves_letter(
    nats_server: EmbeddedNatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "db.duckdb"
    # The reversal names the release, which no reversal can undo.
    release = [(event_subject("P01", "work_order_released"), encode(_release()))]
    first = _run(nats_server, db, release + _consumption_and_reversal("r-1"))
    assert first.totals["dead_letter:unmatched"] == 1
    [letter] = asyncio.run(_entries(nats_server.url))
    assert letter.is_open
    with duckdb.connect(str(db), read_only=True) as connection:
        open_before = connection.execute(
            "SELECT event_id, reason FROM open_dead_letters"
        ).fetchall()
    assert open_before == [("x-1", "unmatched")]

    # The plant sends the reversal again under its id, now naming the consumption.
    # A second run resumes from the checkpoint, which must keep the rejected id.
    corrected = _consumption_and_reversal("c-1")[1:]
    second = _run(nats_server, db, corrected)
    assert second.totals["dead_letters_resolved"] == 1

    [entry] = asyncio.run(_entries(nats_server.url))
    assert entry.resolved is not None
    assert (entry.resolved.event_id, entry.resolved.stream_seq) == ("x-1", 4)
    assert not entry.is_open
    with duckdb.connect(str(db), read_only=True) as connection:
        open_after = connection.execute("FROM open_dead_letters").fetchall()
        resolutions = connection.execute(
            "SELECT letter_id, event_id, stream_seq FROM dead_letter_resolutions"
        ).fetchall()
    assert open_after == []
    assert resolutions == [(entry.letter_id, "x-1", 4)]
    capsys.readouterr()
    assert main(["dlq", "list", "--nats-url", nats_server.url]) == 0
    assert "resolved: event x-1 applied at seq 4" in capsys.readouterr().out
    assert main(["dlq", "list", "--nats-url", nats_server.url, "--open"]) == 0
    assert capsys.readouterr().out == "no dead letters match\n"
    assert main(["dlq", "retry", "--nats-url", nats_server.url, "--all"]) == 0
    out = capsys.readouterr().out
    assert "retried 0 dead letters; skipped 0 retried before, 1 resolved" in out
