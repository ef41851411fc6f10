"""Time zones: any offset form is accepted, stored in UTC, bucketed in plant time."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from test_semantics_support import Message, message, query, release, run_on_own_server

from actors.settings import StateSettings
from pipeline.subjects import event_subject

ZONES = "P1=Europe/Berlin,P2=America/Chicago"


def _report(event_id: str, plant: str, order: str, occurred_at: str) -> Message:
    body = (
        f'{{"event_type":"production_confirmed","event_id":"{event_id}",'
        f'"plant":"{plant}","occurred_at":"{occurred_at}","source":"mes",'
        f'"order":"{order}","good":{{"value":"1","uom":"EA"}},"operation":"10"}}'
    )
    return event_subject(plant, "production_confirmed"), body.encode()


# (event id, plant, occurred_at as sent, expected shift date, expected shift)
REPORTS = [
    # Berlin, UTC+1 in March: the night shift (22:00 to 06:00) belongs to its start day.
    ("p1", "P1", "2026-03-02T23:30:00+01:00", "2026-03-02", 3),
    ("p2", "P1", "2026-03-03T04:30:00Z", "2026-03-02", 3),
    ("p3", "P1", "2026-03-03T06:00:00+0100", "2026-03-03", 1),
    ("p4", "P1", "2026-03-03T13:59:59.5+01:00", "2026-03-03", 1),
    # Chicago, UTC-6 until its summer time starts on 8 March 2026, UTC-5 after.
    ("q1", "P2", "2026-03-02T05:59:00-06:00", "2026-03-01", 3),
    ("q2", "P2", "2026-03-02T12:00:00z", "2026-03-02", 1),
    ("q3", "P2", "2026-03-09T11:00:00Z", "2026-03-09", 1),
    # No zone configured: the offset the event carried decides.
    ("r1", "P3", "2026-03-02T07:00:00+05:30", "2026-03-02", 1),
]


@pytest.fixture(scope="module")
def db(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    inputs = [
        message(release("O1", plant="P1")),
        message(release("O2", plant="P2")),
        message(release("O3", plant="P3")),
        *(
            _report(event_id, plant, f"O{plant[1]}", sent)
            for event_id, plant, sent, _, _ in REPORTS
        ),
        _report("n1", "P1", "O1", "2026-03-03T08:00:00"),
    ]
    state = StateSettings(plant_timezones=ZONES)
    path, _ = run_on_own_server(tmp_path_factory.mktemp("tz"), inputs, state=state)
    return path


def test_naive_timestamp_rejected(db: Path) -> None:
    [(reason, detail)] = query(db, "SELECT reason, detail FROM dead_letters")
    assert reason == "invalid"
    assert "timezone" in detail


def test_stored_in_utc(db: Path) -> None:
    stored = dict(query(db, "SELECT event_id, occurred_at FROM production"))
    for event_id, _, sent, _, _ in REPORTS:
        instant = dt.datetime.fromisoformat(sent.replace("z", "Z"))
        assert stored[event_id] == instant, event_id
        assert stored[event_id].utcoffset() == dt.timedelta(0)


def test_shift_in_plant_time(db: Path) -> None:
    buckets = {
        row[0]: (str(row[1]), row[2])
        for row in query(db, "SELECT event_id, shift_date, shift FROM production_local")
    }
    for event_id, _, _, shift_date, shift in REPORTS:
        assert buckets[event_id] == (shift_date, shift), event_id


def test_day_view_sums_per_plant_day(db: Path) -> None:
    rows = query(
        db,
        "SELECT plant, CAST(local_date AS VARCHAR), reports FROM production_by_day "
        "ORDER BY 1, 2",
    )
    assert rows == [
        ("P1", "2026-03-02", 1),
        ("P1", "2026-03-03", 3),
        ("P2", "2026-03-02", 2),
        ("P2", "2026-03-09", 1),
        ("P3", "2026-03-02", 1),
    ]


def test_invalid_zone_setting_rejected() -> None:
    with pytest.raises(ValueError, match="Mars/Olympus"):
        StateSettings(plant_timezones="P1=Mars/Olympus")
