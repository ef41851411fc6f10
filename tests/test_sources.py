"""Readers of the real data files: counts, order of events, ids, times and bad input."""

from __future__ import annotations

import csv
import datetime as dt
import logging
import re
import shutil
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

import pytest

from contracts.codec import decode_event, encode
from contracts.events import (
    DowntimeEnded,
    DowntimeStarted,
    InspectionRecorded,
    MachineStateChanged,
    MaterialConsumed,
    PlantEvent,
    ProductionConfirmed,
    QualityHoldApplied,
    WorkOrderReleased,
)
from pipeline.sources import (
    detect_kind,
    read_ai4i,
    read_b2mml,
    read_events,
    read_messages,
    read_secom,
)
from pipeline.sources.b2mml import parse_timestamp
from pipeline.sources.generated import StreamSpec, generate

SCHEDULE = "b2mml/PRO-20121210181416-27942.xml"
PERFORMANCE = "b2mml/PES-20121229115825-53107.xml"
SUB_LOT_STATUS = "b2mml/INV-20121210175555-0001L0001_01.xml"
LOT = "b2mml/LOT-20121210170718-0001L0001.xml"
MATERIAL = "b2mml/MAT-20121210170256-CRBN0001.xml"

T = TypeVar("T")

AI4I_HEADER = (
    "UDI,Product ID,Type,Air temperature [K],Process temperature [K],"
    "Rotational speed [rpm],Torque [Nm],Tool wear [min],Machine failure,"
    "TWF,HDF,PWF,OSF,RNF\r\n"
)


@pytest.fixture(scope="module")
def ai4i_events(data_dir: Path) -> list[PlantEvent]:
    return list(read_ai4i(data_dir / "ai4i2020.csv"))


@pytest.fixture(scope="module")
def secom_events(data_dir: Path) -> list[PlantEvent]:
    return list(read_secom(data_dir / "secom_labels.data"))


def _of_type(events: list[PlantEvent], kind: type[T]) -> list[T]:
    return [event for event in events if isinstance(event, kind)]


def _tool_lives(path: Path) -> int:
    """Count tool lives straight from the CSV: one, plus one per drop in tool wear."""
    with path.open(encoding="utf-8-sig", newline="") as file:
        wear = [int(row["Tool wear [min]"]) for row in csv.DictReader(file)]
    return 1 + sum(
        1 for before, after in zip(wear, wear[1:], strict=False) if after < before
    )


# -- AI4I 2020 -------------------------------------------------------------------------


def test_ai4i_unit_confirmations(ai4i_events: list[PlantEvent]) -> None:
    confirmations = _of_type(ai4i_events, ProductionConfirmed)
    assert len(confirmations) == 10_000
    units = [
        (event.good.value + (event.scrap.value if event.scrap else 0))
        for event in confirmations
    ]
    assert set(units) == {Decimal(1)}


def test_ai4i_scrap_units(ai4i_events: list[PlantEvent]) -> None:
    confirmations = _of_type(ai4i_events, ProductionConfirmed)
    scrap = [event for event in confirmations if event.scrap is not None]
    assert len(scrap) == 339
    assert {event.good.value for event in scrap} == {Decimal(0)}
    assert {event.scrap.value for event in scrap if event.scrap} == {Decimal(1)}


def test_ai4i_failure_downtimes(ai4i_events: list[PlantEvent]) -> None:
    started = [e for e in _of_type(ai4i_events, DowntimeStarted) if not e.planned]
    started_ids = {event.downtime_id for event in started}
    ended_ids = {event.downtime_id for event in _of_type(ai4i_events, DowntimeEnded)}
    reasons = Counter(event.reason for event in started)
    assert len(started) == 339
    assert len(started_ids) == 339
    assert started_ids <= ended_ids
    assert reasons["HDF"] == 106
    assert reasons["PWF+OSF"] == 11
    assert reasons["unspecified"] == 9


def test_ai4i_downtime_pairs_close(ai4i_events: list[PlantEvent]) -> None:
    open_downtimes: set[str] = set()
    for event in ai4i_events:
        if isinstance(event, DowntimeStarted):
            assert not open_downtimes
            open_downtimes.add(event.downtime_id)
        elif isinstance(event, DowntimeEnded):
            assert open_downtimes == {event.downtime_id}
            open_downtimes.clear()
    assert not open_downtimes


def test_ai4i_order_per_tool_life(
    ai4i_events: list[PlantEvent], data_dir: Path
) -> None:
    releases = _of_type(ai4i_events, WorkOrderReleased)
    finals = [e for e in _of_type(ai4i_events, ProductionConfirmed) if e.final]
    assert len(releases) == _tool_lives(data_dir / "ai4i2020.csv")
    assert len(releases) == 120
    assert sum(event.quantity.value for event in releases) == 10_000
    assert len(finals) == len(releases)


def test_ai4i_release_before_production(ai4i_events: list[PlantEvent]) -> None:
    released: set[str] = set()
    for event in ai4i_events:
        if isinstance(event, WorkOrderReleased):
            assert event.order not in released
            released.add(event.order or "")
        elif event.order is not None:
            assert event.order in released


def test_ai4i_times_aware_increasing(ai4i_events: list[PlantEvent]) -> None:
    times = [event.occurred_at for event in ai4i_events]
    assert all(time.utcoffset() == dt.timedelta(0) for time in times)
    assert times == sorted(times)
    assert isinstance(ai4i_events[0], MachineStateChanged)
    assert ai4i_events[0].state == "running"


def test_ai4i_time_line_from_tool_wear(ai4i_events: list[PlantEvent]) -> None:
    # Unit 1 is variant M (3 minutes), unit 2 is L (2 minutes).
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    confirmations = _of_type(ai4i_events, ProductionConfirmed)
    assert confirmations[0].started_at == start
    assert confirmations[0].occurred_at == start + dt.timedelta(minutes=3)
    assert confirmations[1].occurred_at == start + dt.timedelta(minutes=5)
    assert confirmations[0].operation == "MACHINING-M"


def test_ai4i_routing_and_components(ai4i_events: list[PlantEvent]) -> None:
    release = _of_type(ai4i_events, WorkOrderReleased)[0]
    cycle_times = {op.operation: op.ideal_cycle_time_s for op in release.operations}
    consumed = _of_type(ai4i_events, MaterialConsumed)
    assert cycle_times == {
        "MACHINING-L": Decimal(120),
        "MACHINING-M": Decimal(180),
        "MACHINING-H": Decimal(300),
    }
    assert sum(c.quantity.value for c in release.components) == release.quantity.value
    assert len(consumed) == 10_000


def test_ai4i_naive_start_rejected(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="UTC offset"):
        read_ai4i(data_dir / "ai4i2020.csv", start=dt.datetime(2020, 1, 1))


def test_ai4i_plant_not_a_token(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="subject token"):
        read_ai4i(data_dir / "ai4i2020.csv", plant="plant.one")


def test_ai4i_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "ai4i.csv"
    path.write_text(
        "\ufeff"
        + AI4I_HEADER
        + "1,M1,M,298.1,308.6,1551,42.8,0,0,0,0,0,0,0\r\n"
        + "2,L2,L,298.2,308.7,1408,46.3,three,0,0,0,0,0,0\r\n",
        encoding="utf-8",
        newline="",
    )
    with pytest.raises(ValueError) as error:
        read_ai4i(path)
    assert f"{path}:3:" in str(error.value)
    assert "'three'" in str(error.value)
    assert "Tool wear [min]" in str(error.value)


def test_ai4i_bad_variant(tmp_path: Path) -> None:
    path = tmp_path / "ai4i.csv"
    path.write_text(AI4I_HEADER + "1,X1,X,298.1,308.6,1551,42.8,0,0,0,0,0,0,0\r\n")
    with pytest.raises(ValueError, match=r":2: invalid 'Type' value 'X'"):
        read_ai4i(path)


# -- SECOM -----------------------------------------------------------------------------


def test_secom_inspections(secom_events: list[PlantEvent]) -> None:
    inspections = _of_type(secom_events, InspectionRecorded)
    results = Counter(event.result for event in inspections)
    assert len(inspections) == 1567
    assert results["fail"] == 104
    assert all(event.lot == event.order for event in inspections)


def test_secom_times_in_utc(secom_events: list[PlantEvent]) -> None:
    first = secom_events[0].occurred_at
    assert all(event.occurred_at.tzinfo is dt.UTC for event in secom_events)
    assert first == dt.datetime(2008, 7, 19, 11, 55, tzinfo=dt.UTC)


def test_secom_order_lifecycle(secom_events: list[PlantEvent]) -> None:
    kinds = [type(event) for event in secom_events[:3]]
    releases = _of_type(secom_events, WorkOrderReleased)
    assert kinds == [WorkOrderReleased, ProductionConfirmed, InspectionRecorded]
    assert len({event.order for event in releases}) == 1567


def test_secom_time_zone(data_dir: Path) -> None:
    events = read_secom(data_dir / "secom_labels.data", tz="Europe/Berlin")
    first = next(iter(events))
    assert first.occurred_at == dt.datetime(2008, 7, 19, 9, 55, tzinfo=dt.UTC)


def test_secom_unknown_time_zone(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="Mars/Olympus"):
        read_secom(data_dir / "secom_labels.data", tz="Mars/Olympus")


def test_secom_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "labels.data"
    path.write_bytes(b'-1 "19/07/2008 11:55:00"\r\r\n1 "31/02/2008 12:32:00"\r\r\n')
    with pytest.raises(ValueError) as error:
        read_secom(path)
    assert f"{path}:2:" in str(error.value)
    assert "31/02/2008 12:32:00" in str(error.value)


# -- B2MML -----------------------------------------------------------------------------


def test_b2mml_schedule_release(data_dir: Path) -> None:
    (release,) = read_b2mml(data_dir / SCHEDULE)
    assert isinstance(release, WorkOrderReleased)
    assert release.order == "258456"
    assert release.material == "SO1215"
    assert str(release.quantity.value) == "1.000"
    assert release.quantity.uom == "KG"
    assert release.occurred_at == dt.datetime(2009, 12, 10, 17, 14, 16, tzinfo=dt.UTC)


def test_b2mml_schedule_components(data_dir: Path) -> None:
    (release,) = read_b2mml(data_dir / SCHEDULE)
    assert isinstance(release, WorkOrderReleased)
    lines = [
        (c.material, str(c.quantity.value), c.quantity.uom, c.operation)
        for c in release.components
    ]
    assert lines == [
        ("CRBN0001", "5.000", "KG", "Weighing"),
        ("CRBN0002", "50.000", "KG", "Weighing"),
        ("CRBN0001", "811.000", "KG", "Weighing"),
        ("CRBN0003", "100.000", "KG", "Weighing"),
    ]
    assert [op.operation for op in release.operations] == ["Weighing", "Contenair"]


def test_b2mml_performance_consumption(data_dir: Path) -> None:
    (consumed,) = read_b2mml(data_dir / PERFORMANCE)
    assert isinstance(consumed, MaterialConsumed)
    # The response id differs from the schedule's request id, and stays as sent.
    assert consumed.order == "53107"
    assert consumed.material == "CRBN0001"
    assert consumed.quantity.value == Decimal("0.41")
    assert consumed.quantity.uom == "KG"
    assert consumed.lot == "CRBN0001_LOT01"
    assert consumed.operation == "Weighing"
    assert consumed.occurred_at == dt.datetime(
        2012, 11, 29, 10, 58, 25, 314955, tzinfo=dt.UTC
    )


def test_b2mml_material_use_in_any_case(data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "performance.xml"
    text = (data_dir / PERFORMANCE).read_bytes()
    path.write_bytes(text.replace(b"MaterialUse>Consumed<", b"MaterialUse> consumed <"))
    (consumed,) = read_b2mml(path)
    assert isinstance(consumed, MaterialConsumed)
    assert consumed.quantity.value == Decimal("0.41")


def test_b2mml_sub_lot_hold(data_dir: Path) -> None:
    (hold,) = read_b2mml(data_dir / SUB_LOT_STATUS)
    assert isinstance(hold, QualityHoldApplied)
    assert hold.scope == "lot"
    assert hold.lot == "CRBN0001_LOT01"
    assert hold.material == "CRBN0001"
    assert "NotValid" in (hold.reason or "")


@pytest.mark.parametrize("name", [LOT, MATERIAL])
def test_b2mml_master_data_silent(
    data_dir: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="pipeline.sources.b2mml"):
        events = list(read_b2mml(data_dir / name))
    assert events == []
    assert "no plant event" in caplog.text


def test_b2mml_bad_quantity(data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "schedule.xml"
    text = (data_dir / SCHEDULE).read_bytes().replace(b">50.000<", b">50,000<")
    path.write_bytes(text)
    with pytest.raises(ValueError) as error:
        read_b2mml(path)
    assert f"{path}:67:" in str(error.value)
    assert "'50,000'" in str(error.value)


def test_b2mml_unsafe_xml(tmp_path: Path) -> None:
    path = tmp_path / "entities.xml"
    path.write_text(
        '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;">]>'
        '<SyncProductionSchedule xmlns="http://www.wbf.org/xml/B2MML-V0401">&b;'
        "</SyncProductionSchedule>"
    )
    with pytest.raises(ValueError, match="unsafe XML"):
        read_b2mml(path)


def test_b2mml_other_namespace(tmp_path: Path) -> None:
    path = tmp_path / "v6.xml"
    path.write_text(
        '<SyncProductionSchedule xmlns="http://www.mesa.org/xml/B2MML-V0600"/>'
    )
    with pytest.raises(ValueError, match="not a supported B2MML V0401 message"):
        read_b2mml(path)


def test_timestamp_seven_digit_fraction() -> None:
    parsed = parse_timestamp("2012-11-29T11:58:25.3149559+01:00")
    assert parsed == dt.datetime(2012, 11, 29, 10, 58, 25, 314955, tzinfo=dt.UTC)


def test_timestamp_naive_rejected() -> None:
    with pytest.raises(ValueError, match="offset"):
        parse_timestamp("2012-11-29T11:58:25")


# -- dispatch, ids and the wire --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("ai4i2020.csv", "ai4i"),
        ("secom_labels.data", "secom"),
        (SCHEDULE, "b2mml"),
        (MATERIAL, "b2mml"),
        ("SOURCES.md", None),
    ],
)
def test_detect_kind(data_dir: Path, name: str, kind: str | None) -> None:
    assert detect_kind(data_dir / name) == kind


@pytest.mark.parametrize(
    "name", ["ai4i2020.csv", "secom_labels.data", SCHEDULE, PERFORMANCE, SUB_LOT_STATUS]
)
def test_read_twice_same_ids(data_dir: Path, name: str) -> None:
    first = [event.event_id for event in read_events(data_dir / name)]
    second = [event.event_id for event in read_events(data_dir / name)]
    assert first == second
    assert len(set(first)) == len(first)


def test_folder_dispatch_order(data_dir: Path, tmp_path: Path) -> None:
    # Performance sorts before schedule by name, but must come after it.
    for name in (PERFORMANCE, SCHEDULE, SUB_LOT_STATUS, MATERIAL):
        shutil.copy(data_dir / name, tmp_path / Path(name).name)
    shutil.copy(data_dir / "secom_labels.data", tmp_path / "secom_labels.data")
    (tmp_path / "notes.txt").write_text("not an input file\n")
    kinds = [type(event) for event in read_events(tmp_path)]
    b2mml = [kind for kind in kinds if kind is not InspectionRecorded]
    assert b2mml[0] is QualityHoldApplied
    assert b2mml[1] is WorkOrderReleased
    assert kinds[-1] is MaterialConsumed
    assert kinds.count(InspectionRecorded) == 1567


def _event_lines() -> list[bytes]:
    """A clean generated stream of one plant, one event per line."""
    spec = StreamSpec(
        plants=1, orders_per_plant=3, duplicate_rate=0, bad_rate=0, anomaly_rate=0
    )
    messages, _ = generate(spec)
    return [message.data for message in messages]


def test_event_lines_kind_and_subjects(tmp_path: Path) -> None:
    lines = _event_lines()
    path = tmp_path / "events.jsonl"
    # Blank lines and CRLF line ends are allowed; the bytes of each line are kept.
    path.write_bytes(b"\r\n".join(lines) + b"\r\n\r\n")
    assert detect_kind(path) == "events"
    messages = list(read_messages(path))
    assert [data for _, data in messages] == lines
    first = decode_event(lines[0])
    assert messages[0][0] == f"plant.events.{first.plant}.{first.__struct_config__.tag}"
    assert [event.event_id for event in read_events(path)] == [
        decode_event(line).event_id for line in lines
    ]


def test_event_lines_keep_invalid_events(tmp_path: Path) -> None:
    # The pipeline, not the reader, rejects an event that breaks the contract.
    invalid = b'{"event_type":"material_consumed","plant":"P1","event_id":"x"}'
    path = tmp_path / "events.jsonl"
    path.write_bytes(invalid + b"\n")
    assert list(read_messages(path)) == [("plant.events.P1.material_consumed", invalid)]
    with pytest.raises(ValueError, match=rf"{path}:1: Object missing required field"):
        read_events(path)


def test_event_lines_keep_bad_json(tmp_path: Path) -> None:
    # A bad escape or trailing text is for the pipeline to dead-letter, with its detail,
    # as long as the subject can be read.
    lines = [
        rb'{"plant":"P1","event_type":"material_consumed","source":"m\ud800"}',
        b'{"plant":"P1","event_type":"material_consumed"} trailing',
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n\n" + b"\n".join(lines) + b"\n")
    assert detect_kind(path) == "events"  # after blank lines
    assert list(read_messages(path)) == [
        ("plant.events.P1.material_consumed", line) for line in lines
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        # Not valid JSON, and a plant nested before the event's own.
        (
            rb'{"quantity":{"plant":"X9"},"plant":"P1","event_type":"x","s":"\ud800"}',
            "cannot be told apart from other fields",
        ),
        (b'{"plant":"P1","event_type":"batch"}', "the subject token of edge batches"),
    ],
)
def test_event_lines_subject_unclear(tmp_path: Path, line: bytes, problem: str) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(line + b"\n")
    with pytest.raises(ValueError, match=f"{path}:1: .*{problem}"):
        list(read_messages(path))


def test_empty_input_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n  \n")
    with pytest.raises(ValueError, match="the file is empty"):
        read_events(path)


def test_other_json_not_event_lines(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_bytes(b'{"name": "line 3", "shifts": 2}\n')
    assert detect_kind(path) is None


def test_event_lines_longer_than_max_payload(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    short = _event_lines()[0]
    long = b'{"plant":"P1","event_type":"x","lot":"' + b"y" * len(short) + b'"}'
    path.write_bytes(short + b"\n" + long + b"\n")
    with pytest.raises(ValueError, match=f"{path}:2: the line is {len(long):,} bytes"):
        list(read_messages(path, max_bytes=len(short)))


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b'{"event_type":"material_consumed"}', "missing required field `plant`"),
        (b'{"plant":"P 1","event_type":"x"}', "plant 'P 1' cannot be a NATS subject"),
        (b'{"plant":"P1","event_type":"a.b"}', "event_type 'a.b' cannot be a NATS"),
        (b'{"plant":"P1","event_type":', "truncated"),
    ],
)
def test_event_lines_without_subject(tmp_path: Path, line: bytes, problem: str) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(_event_lines()[0] + b"\n" + line + b"\n")
    with pytest.raises(ValueError, match=f"{path}:2: .*{re.escape(problem)}"):
        list(read_messages(path))


def test_unknown_file_kind(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("shift notes: line 3 stopped twice\n")
    with pytest.raises(ValueError) as error:
        read_events(path)
    assert str(path) in str(error.value)
    assert "AI4I 2020 CSV" in str(error.value)
    assert "B2MML V0401" in str(error.value)


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_events(tmp_path / "absent.csv")


def test_events_round_trip(
    data_dir: Path,
    ai4i_events: list[PlantEvent],
    secom_events: list[PlantEvent],
) -> None:
    # The whole data folder: every reader, and SOURCES.md skipped as no input. The five
    # B2MML files give one hold, one release and one consumption.
    count = 0
    for event in read_events(data_dir):
        assert decode_event(encode(event)) == event
        count += 1
    assert count == len(ai4i_events) + len(secom_events) + 3
