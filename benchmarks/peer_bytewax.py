"""The peer: plantstream's deduplication and correlation as a Bytewax dataflow.

The dataflow decodes each message with the same msgspec contract and keys it by the
same entity as the ingest (plant and order, machine or delivery). Per key, Bytewax's
managed state contains the event ids seen with their payload hash, the order or
machine, and the events parked until their prerequisite arrives. It applies events with
the same functions in `actors.orders` and `actors.machines` and emits every posting
encoded as JSON, as plantstream's partition state does. It does not build snapshot
rows and treats plant-wide holds (no order) as applied, because the generated stream
has none. It runs in this process with one worker (`bytewax.testing.run_main`), like
the in-process figure of PartitionState it is compared with.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from actors.machines import DowntimeNotStarted, MachineTrack, apply_machine_event
from actors.orders import OrderState, Unmatched, apply_order_event, release_order
from actors.settings import StateSettings
from contracts import events as ev
from contracts.codec import decode_event, encode, encode_posting

logger = logging.getLogger(__name__)

__all__ = ["bytewax_available", "bytewax_rate", "bytewax_version"]

_MACHINE_EVENTS = (ev.MachineStateChanged, ev.DowntimeStarted, ev.DowntimeEnded)
_MAX_AHEAD = dt.timedelta(seconds=StateSettings().max_future_s)


def bytewax_available() -> bool:
    return importlib.util.find_spec("bytewax") is not None


def bytewax_version() -> str | None:
    if not bytewax_available():
        return None
    from importlib.metadata import version

    return version("bytewax")


@dataclass
class _KeyState:
    """Everything one key (an order, a machine or a delivery) keeps."""

    seen: dict[str, int] = field(default_factory=dict)
    order: OrderState | None = None
    machine: MachineTrack | None = None
    parked: list[ev.PlantEvent] = field(default_factory=list)


def _payload_hash(event: ev.PlantEvent) -> int:
    return int.from_bytes(hashlib.blake2b(encode(event), digest_size=8).digest(), "big")


def _route(event: ev.PlantEvent) -> str:
    machine = getattr(event, "machine", None)
    if machine:
        return f"{event.plant}\x1fmachine:{machine}"
    if event.order:
        return f"{event.plant}\x1forder:{event.order}"
    delivery = getattr(event, "delivery", None)
    if delivery:
        return f"{event.plant}\x1fdelivery:{delivery}"
    return f"{event.plant}\x1fplant"


def _decode(message: tuple[str, bytes]) -> ev.PlantEvent | None:
    try:
        return decode_event(message[1])
    except (msgspec.DecodeError, msgspec.ValidationError):
        # plantstream dead-letters it; the peer drops it.
        return None


def _apply(state: _KeyState, event: ev.PlantEvent) -> list[bytes] | None:
    """Apply one event; return its encoded postings, or None if it must wait."""
    try:
        return _apply_or_raise(state, event)
    except ValueError:
        # plantstream dead-letters an event that breaks a rule; the peer drops it.
        return []


def _apply_or_raise(state: _KeyState, event: ev.PlantEvent) -> list[bytes] | None:
    if event.occurred_at - dt.datetime.now(dt.UTC) > _MAX_AHEAD:
        return []
    if isinstance(event, _MACHINE_EVENTS):
        if state.machine is None:
            state.machine = MachineTrack(event.plant, event.machine)
        try:
            apply_machine_event(state.machine, event)
        except DowntimeNotStarted:
            return None
        return []
    if isinstance(event, ev.ShipmentConfirmed) or event.order is None:
        return []
    if isinstance(event, ev.WorkOrderReleased):
        if state.order is None:
            state.order = release_order(event)
        return []
    if state.order is None:
        return None
    try:
        outcome = apply_order_event(state.order, event)
    except Unmatched:
        return None
    return [encode_posting(posting) for posting in outcome.postings]


def _step(
    state: _KeyState | None, event: ev.PlantEvent
) -> tuple[_KeyState, list[bytes]]:
    if state is None:
        state = _KeyState()
    payload_hash = _payload_hash(event)
    if event.event_id in state.seen:
        return state, []
    state.seen[event.event_id] = payload_hash
    postings = _apply(state, event)
    if postings is None:
        state.parked.append(event)
        return state, []
    # Something was applied, so parked events may now find their prerequisite.
    while state.parked:
        still_waiting: list[ev.PlantEvent] = []
        progressed = False
        for parked in state.parked:
            result = _apply(state, parked)
            if result is None:
                still_waiting.append(parked)
            else:
                postings.extend(result)
                progressed = True
        state.parked = still_waiting
        if not progressed:
            break
    return state, postings


def bytewax_rate(
    messages: Sequence[tuple[str, bytes]], batch_size: int = 2000
) -> tuple[int, float, int]:
    """Run the dataflow over `messages`; return (events, seconds, postings emitted)."""
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow, Stream
    from bytewax.testing import TestingSink, TestingSource, run_main

    postings: list[tuple[str, bytes]] = []
    flow = Dataflow("plantstream_peer")
    source = op.input("events", flow, TestingSource(list(messages), batch_size))
    decoded: Stream[ev.PlantEvent] = op.filter_map("decode", source, _decode)
    keyed = op.key_on("route", decoded, _route)
    applied = op.stateful_flat_map("apply", keyed, _step)
    op.output("postings", applied, TestingSink(postings))
    started = time.perf_counter()
    run_main(flow)
    elapsed = time.perf_counter() - started
    return len(messages), elapsed, len(postings)
