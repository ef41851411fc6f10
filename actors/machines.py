"""Machine time by state: intervals built from state changes and down time events.

A machine's state changes close the previous interval and open the next. Down time events
open and close intervals of their own (state "down", or "maintenance" when planned), which
may overlap the state intervals and each other; the `oee` view takes the union of down time,
so overlaps are never counted twice.
"""

from __future__ import annotations

import datetime as dt

import msgspec

from contracts import events as ev

__all__ = ["MachineTrack", "apply_machine_event"]


class OpenInterval(msgspec.Struct):
    state: str
    planned: bool
    reason: str | None
    started_at: dt.datetime
    source_event_id: str


class MachineTrack(msgspec.Struct):
    plant: str
    machine: str
    current: OpenInterval | None = None
    downtimes: dict[str, OpenInterval] = {}


def interval_row(
    track: MachineTrack, interval: OpenInterval, ended_at: dt.datetime | None
) -> dict[str, object]:
    return {
        "plant": track.plant,
        "machine": track.machine,
        "state": interval.state,
        "planned": interval.planned,
        "reason": interval.reason,
        "started_at": interval.started_at,
        "ended_at": ended_at,
        "source_event_id": interval.source_event_id,
    }


class DowntimeNotStarted(Exception):
    def __init__(self, downtime_id: str) -> None:
        super().__init__(f"down time {downtime_id} ended before any start was received")
        self.downtime_id = downtime_id


def apply_machine_event(
    track: MachineTrack, event: ev.PlantEvent
) -> list[dict[str, object]]:
    """Apply a machine event and return the `machine_states` rows it opened or closed."""
    rows: list[dict[str, object]] = []
    match event:
        case ev.MachineStateChanged():
            if track.current is not None:
                if event.occurred_at < track.current.started_at:
                    # TODO: insert a late state change into the interval history instead
                    # of rejecting it; today it needs a replay in time order.
                    raise ValueError(
                        f"state change {event.event_id} at {event.occurred_at.isoformat()} "
                        f"is older than the current state of machine {track.machine}, "
                        f"which started {track.current.started_at.isoformat()}"
                    )
                rows.append(interval_row(track, track.current, event.occurred_at))
            track.current = OpenInterval(
                event.state,
                event.planned,
                event.reason,
                event.occurred_at,
                event.event_id,
            )
            rows.append(interval_row(track, track.current, None))
        case ev.DowntimeStarted():
            interval = OpenInterval(
                "maintenance" if event.planned else "down",
                event.planned,
                event.reason,
                event.occurred_at,
                event.event_id,
            )
            track.downtimes[event.downtime_id] = interval
            rows.append(interval_row(track, interval, None))
        case ev.DowntimeEnded():
            started = track.downtimes.pop(event.downtime_id, None)
            if started is None:
                raise DowntimeNotStarted(event.downtime_id)
            if event.occurred_at < started.started_at:
                raise ValueError(
                    f"down time {event.downtime_id} ends at "
                    f"{event.occurred_at.isoformat()}, before it started at "
                    f"{started.started_at.isoformat()}"
                )
            rows.append(interval_row(track, started, event.occurred_at))
        case _:
            raise ValueError(f"event {event.event_id} is not a machine event")
    return rows
