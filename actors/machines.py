"""Machine time by state: intervals built from state changes and down time events.

A machine's state changes close the previous interval and open the next. Down time
events open and close intervals of their own (state "down", or "maintenance" when
planned), which may overlap the state intervals and each other; the `oee` view takes the
union of down time, so overlaps are never counted twice.

A state change that arrives after a later one is inserted into the machine's recent
history: the interval it falls into ends at its time, and it lasts until the next one
starts, as if it had arrived in order. Each machine keeps `history_limit` closed
intervals for this; a state change older than all of them is rejected.
"""

from __future__ import annotations

import bisect
import datetime as dt
import sys

import msgspec

from contracts import events as ev

__all__ = ["MachineTrack", "apply_machine_event"]


# Neither struct can be part of a reference cycle, because an interval contains only
# scalars and a track contains only intervals. gc=False drops the 16-byte GC header of
# each of the up to `history_limit` intervals a machine keeps.


class OpenInterval(msgspec.Struct, gc=False):
    state: str
    planned: bool
    reason: str | None
    started_at: dt.datetime
    source_event_id: str

    def __post_init__(self) -> None:
        # A decoded checkpoint makes a new string of each interval's state, and there
        # are only five states. Reasons are free text, so they are not interned.
        self.state = sys.intern(self.state)


class MachineTrack(msgspec.Struct, gc=False):
    plant: str
    machine: str
    current: OpenInterval | None = None
    downtimes: dict[str, OpenInterval] = {}
    history: list[OpenInterval] = []
    """Closed state intervals before `current`, oldest first."""
    history_trimmed: bool = False


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


def _trim_history(track: MachineTrack, history_limit: int) -> None:
    """Drop the oldest closed intervals beyond `history_limit` (their rows are kept)."""
    if len(track.history) > history_limit:
        del track.history[: len(track.history) - history_limit]
        track.history_trimmed = True


def _insert_late(
    track: MachineTrack, interval: OpenInterval, event_id: str, history_limit: int
) -> list[dict[str, object]]:
    """Insert a state interval that starts before the current one into the history."""
    history = track.history
    at = interval.started_at
    if not history or at < history[0].started_at:
        if track.history_trimmed:
            # A restored interval's time is in UTC. Shown in the event's offset, the
            # two times compare at a glance.
            oldest = history[0].started_at.astimezone(at.tzinfo)
            raise ValueError(
                f"state change {event_id} at {at.isoformat()} is older than the "
                f"{len(history)} state intervals machine {track.machine} keeps (the "
                f"oldest starts {oldest.isoformat()}); raise "
                "PLANTSTREAM_MACHINE_HISTORY or replay the machine's events in time "
                "order"
            )
        following = history[0] if history else track.current
        assert following is not None
        history.insert(0, interval)
        rows = [interval_row(track, interval, following.started_at)]
    else:
        position = bisect.bisect_right(history, at, key=lambda i: i.started_at)
        previous = history[position - 1]
        following = history[position] if position < len(history) else track.current
        assert following is not None
        history.insert(position, interval)
        rows = [
            interval_row(track, previous, at),
            interval_row(track, interval, following.started_at),
        ]
    # Late state changes add intervals too, so they trim the history as in-order
    # changes do.
    _trim_history(track, history_limit)
    return rows


def apply_machine_event(
    track: MachineTrack, event: ev.PlantEvent, history_limit: int = 256
) -> list[dict[str, object]]:
    """Apply a machine event; return the `machine_states` rows it opened or changed."""
    rows: list[dict[str, object]] = []
    match event:
        case ev.MachineStateChanged():
            interval = OpenInterval(
                event.state,
                event.planned,
                event.reason,
                event.occurred_at,
                event.event_id,
            )
            current = track.current
            if current is not None and event.occurred_at < current.started_at:
                return _insert_late(track, interval, event.event_id, history_limit)
            if current is not None:
                rows.append(interval_row(track, current, event.occurred_at))
                track.history.append(current)
                _trim_history(track, history_limit)
            track.current = interval
            rows.append(interval_row(track, interval, None))
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
                started_at = started.started_at.astimezone(event.occurred_at.tzinfo)
                raise ValueError(
                    f"down time {event.downtime_id} ends at "
                    f"{event.occurred_at.isoformat()}, before it started at "
                    f"{started_at.isoformat()}"
                )
            rows.append(interval_row(track, started, event.occurred_at))
        case _:
            raise ValueError(f"event {event.event_id} is not a machine event")
    return rows
