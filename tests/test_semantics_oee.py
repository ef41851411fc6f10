"""OEE (ISO 22400) through the pipeline, and null ratios without machine-state data."""

from __future__ import annotations

import pytest
from test_semantics_support import (
    base,
    confirm,
    messages,
    qty,
    query,
    release,
    run_on_own_server,
)

from contracts import events as ev


def _state(
    event_id: str, minutes: float, state: ev.MachineState
) -> ev.MachineStateChanged:
    return ev.MachineStateChanged(
        **base(event_id, minutes, None), machine="M1", state=state
    )


@pytest.fixture(scope="module")
def oee(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    inputs = messages(
        release("O1", work_center="M1"),
        release("O2", work_center="M2"),
        _state("s0", 0, "running"),
        _state("s1", 60, "down"),
        _state("s2", 90, "running"),
        _state("s3", 120, "idle"),
        confirm("c1", "O1", "110", minutes=100, scrap=qty("10")),
        confirm("c2", "O2", "50", minutes=100),
    )
    db, _ = run_on_own_server(tmp_path_factory.mktemp("oee"), inputs)
    rows = query(
        db,
        "SELECT machine, availability, performance, quality, oee, has_state_data, "
        "planned_busy_time_s FROM oee",
    )
    return {row[0]: row[1:] for row in rows}


def test_oee_from_states_and_reports(oee: dict) -> None:
    availability, performance, quality, value, has_state, busy = oee["M1"]
    # 120 min window, 30 min unplanned down; 120 pieces at 30 s in 90 min running.
    assert busy == 7200
    assert availability == pytest.approx(0.75)
    assert performance == pytest.approx(3600 / 5400)
    assert quality == pytest.approx(110 / 120)
    assert value == pytest.approx(0.75 * 3600 / 5400 * 110 / 120)
    assert has_state is True


def test_oee_null_without_states(oee: dict) -> None:
    availability, performance, quality, value, has_state, busy = oee["M2"]
    assert availability is None
    assert performance is None
    assert value is None
    assert busy is None
    assert quality == pytest.approx(1.0)
    assert has_state is False
