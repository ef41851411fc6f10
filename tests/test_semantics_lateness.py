"""Late and skewed event time: each plant's watermark and lateness on its own."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from test_semantics_support import at, messages, query, run_on_own_server

from actors.settings import StateSettings
from contracts import events as ev


def _shipment(event_id: str, plant: str, when: dt.datetime) -> ev.ShipmentConfirmed:
    # One delivery per plant, so each plant's events share a partition and its clock.
    return ev.ShipmentConfirmed(
        event_id=event_id,
        plant=plant,
        occurred_at=when,
        source="wms",
        delivery=f"D-{plant}",
        material="FG-1",
        quantity=ev.Quantity(Decimal(1), "EA"),
    )


@pytest.fixture(scope="module")
def started() -> dt.datetime:
    """The host time of the run; the P3 events are placed around it."""
    return dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def db(
    ray_local: None, tmp_path_factory: pytest.TempPathFactory, started: dt.datetime
) -> Path:
    inputs = messages(
        # P1: a clock a day fast is rejected and does not move the watermark.
        _shipment("a1", "P1", at(0)),
        _shipment("a2", "P1", at(10)),
        _shipment("a3", "P1", started + dt.timedelta(days=1)),
        _shipment("a4", "P1", at(5)),
        _shipment("a5", "P1", at(20)),
        # P2: a link back with an hour of backlog.
        _shipment("b1", "P2", at(60)),
        _shipment("b2", "P2", at(0)),
        # P3: 100 s ahead is allowed, but the watermark stops at the host clock.
        _shipment("c1", "P3", started + dt.timedelta(seconds=100)),
        _shipment("c2", "P3", started - dt.timedelta(seconds=10)),
    )
    state = StateSettings(lateness_tolerance_s=60)
    path, _ = run_on_own_server(tmp_path_factory.mktemp("late"), inputs, state=state)
    return path


def _lateness(db: Path) -> dict[str, tuple[Any, ...]]:
    rows = query(
        db,
        "SELECT plant, events, late_events, max_lateness_s, future_rejected, "
        "watermark FROM plant_lateness",
    )
    return {row[0]: row[1:] for row in rows}


def test_future_time_rejected(db: Path) -> None:
    [(reason, event_id)] = query(db, "SELECT reason, event_id FROM dead_letters")
    assert (reason, event_id) == ("future_time", "a3")


def test_fast_clock_makes_nothing_late(db: Path) -> None:
    events, late, max_lateness, future, watermark = _lateness(db)["P1"]
    # Only a4, 5 min behind a2, is late; a5 would be months late had a3 moved the
    # watermark.
    assert (events, late, future) == (4, 1, 1)
    assert max_lateness == Decimal(300)
    assert watermark == at(20)


def test_backlog_late_per_plant(db: Path) -> None:
    events, late, max_lateness, future, watermark = _lateness(db)["P2"]
    assert (events, late, future) == (2, 1, 0)
    assert max_lateness == Decimal(3600)
    assert watermark == at(60)


def test_watermark_capped_at_host_clock(db: Path, started: dt.datetime) -> None:
    events, late, _, future, watermark = _lateness(db)["P3"]
    assert (events, late, future) == (2, 0, 0)
    assert watermark < started + dt.timedelta(seconds=100)
