"""The state one partition actor owns: its share of orders, machines and event ids.

`PartitionState` is plain Python so that it runs the same inside a Ray actor and in a
test. For each message of a batch it:

1. decodes and validates the whole event (a failure becomes a dead letter);
2. drops it if its event id was seen with the same payload, and dead-letters it if the
   id was seen with a different payload (a reused id is an anomaly, never a duplicate);
3. parks it if a prerequisite is missing (its order's release, the event it cancels, the
   hold it releases), to apply it when the prerequisite arrives;
4. applies it to the order or machine, collecting the ERP postings and snapshot rows;
5. records what became of it (applied, parked, duplicate or dead letter) in the event
   ledger, which `plantstream reconcile` checks the postings against.

docs/semantics.md states the rules for duplicates, order of arrival, late events, holds,
reversals and units that these steps implement.

The whole state round-trips through `checkpoint()` and `restore()` as MessagePack.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import sys
import time
import typing
from collections import Counter
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any, cast

import msgspec
import pyarrow as pa

# Table.group_by imports pyarrow.acero, and with it pyarrow.dataset, on its first call.
# Imported here, that takes its 20 ms when the actor starts instead of stalling the
# first checkpoint.
import pyarrow.acero  # noqa: F401
import pyarrow.compute as pc

from actors.id_table import (
    BLAKE2B_64,
    IdTable,
    IdTableChanges,
    IdTableData,
    add_packed_id,
    event_hash,
    find_packed_id,
    stable_hash,
)
from actors.machines import DowntimeNotStarted, MachineTrack, apply_machine_event
from actors.orders import (
    HoldState,
    NegativeStock,
    OrderState,
    Outcome,
    Unmatched,
    UnmatchedReversal,
    applied_event_type,
    apply_hold,
    apply_order_event,
    describe_reversal_mismatch,
    hold_facts,
    hold_from_event,
    release_hold,
    release_order,
    reversed_event_id,
)
from actors.settings import StateSettings
from contracts import events as ev
from contracts.codec import (
    decode_event,
    describe_decode_error,
    encode,
    encode_posting,
)
from contracts.dead_letters import (
    DeadLetter,
    DeadLetterReason,
    LetterResolved,
    letter_id_at,
)
from contracts.keys import EventKey, decode_key
from contracts.postings import GoodsMovement, MovementType, Posting
from contracts.snapshots import TABLES, table_from_rows
from pipeline.subjects import posting_subject

logger = logging.getLogger(__name__)

__all__ = [
    "BatchResult",
    "CheckpointFormatError",
    "OrdersCheckpoint",
    "PartitionState",
    "SourceMessage",
]

_MACHINE_EVENTS = (ev.MachineStateChanged, ev.DowntimeStarted, ev.DowntimeEnded)
_ORDER_EVENTS = frozenset(
    {
        ev.ProductionConfirmed,
        ev.ProductionCancelled,
        ev.MaterialConsumed,
        ev.ConsumptionReversed,
        ev.InspectionRecorded,
        ev.QualityHoldApplied,
        ev.QualityHoldReleased,
        ev.OperationStarted,
        ev.OperationCompleted,
    }
)
"""Event types that change a released order, applied by actors.orders."""
_HOLD_EVENTS = (ev.QualityHoldApplied, ev.QualityHoldReleased)
_REVERSAL_EVENTS = (ev.ProductionCancelled, ev.ConsumptionReversed)

CHUNK_ROWS = 1000
"""Ledger rows (about one per event) collected before they and the other snapshot rows
are turned into Arrow tables."""

EXPIRY_SCAN_INTERVAL_S = 5.0
"""Seconds between scans for expired parked events; every batch would cost more."""

REJECTED_MAX_IDS = 100_000
"""Event ids whose dead letters a partition keeps, to report them resolved when a
corrected event under the id is applied. Past it the oldest id is dropped, and its
letters stay open in `plantstream dlq list`."""

PAYLOAD_HASH_BITS = 30
"""Bits of the payload hash kept per event id. 30 bits keep each hash in one 28-byte
CPython int. Two different payloads under one reused id collide with odds of 1 in 2**30
(about 1 in 10**9), and then the reuse is dropped as a duplicate instead of
dead-lettered."""


class SourceMessage(msgspec.Struct, array_like=True, gc=False):
    """One message of the plant events stream, as the ingest hands it to a partition.

    A plant-wide hold is sent to every partition; only the copy with `primary` set
    counts in the statistics and reports dead letters, so the totals stay per message.
    """

    stream_seq: int
    subject: str
    data: bytes
    primary: bool = True
    index: int = -1
    """Position in an edge batch message; -1 for a message that carries one event."""


class OutgoingPosting(msgspec.Struct, array_like=True, gc=False):
    subject: str
    key: str
    movement: str  # movement type, or "conf" for an order confirmation
    data: bytes


class BatchResult(msgspec.Struct):
    """Postings, dead letters and counts of one batch, for the ingest to publish."""

    postings: list[OutgoingPosting]
    dead_letters: list[DeadLetter]
    counts: dict[str, int]
    last_seq: int
    resolved: list[LetterResolved] = []
    """Dead letters that an event applied in this batch made needless."""


class Parked(msgspec.Struct, array_like=True, gc=False):
    stream_seq: int
    subject: str
    data: bytes
    event_id: str
    waiting_for: str
    parked_at: float  # wall clock, seconds since the epoch
    index: int = -1
    primary: bool = True


class PlantClock(msgspec.Struct, gc=False):
    """Event time of one plant as this partition has seen it."""

    watermark: dt.datetime | None = None
    events: int = 0
    late_events: int = 0
    max_lateness_us: int = 0
    future_rejected: int = 0


class Checkpoint(msgspec.Struct):
    """Everything a restarted partition needs, and the stream position it covers."""

    partition: int
    last_seq: int
    seen: IdTableData
    orders: dict[str, OrderState]
    machines: dict[str, MachineTrack]
    parked: dict[str, list[Parked]]
    plant_holds: dict[str, HoldState]
    counts: dict[str, int]
    clocks: dict[str, PlantClock] = {}
    closed_orders: dict[str, IdTableData] = {}
    ids_keyed_by_plant: bool = False
    """Whether the remembered event ids are keyed by plant and id (`event_hash`).
    Versions before it keyed them by the id alone, which a restore cannot convert."""
    rejected: dict[int, list[str]] = {}
    """`PartitionState.rejected`."""


class OrdersCheckpoint(msgspec.Struct):
    """A partition's orders and remembered event ids, kept apart from the rest of its
    checkpoint.

    Serialising every order at every checkpoint took most of a checkpoint's time once
    a partition held thousands of orders, and grew with them. So a checkpoint may
    carry only the orders changed since the one before (`base` False), and a restore
    applies those on top of the last one with every order (`base` True). The id table
    is chained the same way: it is 12 bytes per id, 24 MB per partition at the default
    2,000,000 ids, and stored whole only in a base.
    """

    base: bool
    orders: dict[str, OrderState]
    dropped: list[str] = []
    """Orders evicted or forgotten since the previous checkpoint."""
    partition: int = -1
    last_seq: int = -1
    """The state's last stream sequence when this part was written, so that a restore
    can tell a part of another partition or an older checkpoint from the right one."""
    seen: IdTableData | None = None
    """The whole id table: in a base, and in a delta whose changes could not be
    replayed (`IdTable.take_changes`). None in parts written before the id table
    moved here from `Checkpoint.seen`."""
    seen_changes: IdTableChanges | None = None
    """In a delta, the ids added and popped since the part before."""
    closed: dict[str, IdTableData] | None = None
    """Every plant's table of evicted orders, whole: in a base, and in a delta where
    one table's changes could not be replayed. None in parts written before the
    tables moved here from `Checkpoint.closed_orders`."""
    closed_changes: dict[str, IdTableChanges] = {}
    """In a delta, per plant, the evicted orders added since the part before."""
    closed_forgotten: list[str] = []
    """In a delta, the plants whose table `forget_plant` dropped since the part
    before. A restore drops them before it applies `closed_changes`."""


def _key_or_none(data: bytes) -> EventKey | None:
    # An event that fails the full contract may still name its id, plant and order,
    # which makes its dead letter much easier to trace.
    try:
        return decode_key(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _payload_hash(event: ev.PlantEvent) -> int:
    # Hash the re-encoded event, not the raw bytes, so the same event sent with other
    # white space or key order is still a duplicate. blake2b is stable across processes,
    # unlike hash(), which matters because the hashes outlive the process in
    # checkpoints.
    hasher = BLAKE2B_64.copy()
    hasher.update(encode(event))
    return int.from_bytes(hasher.digest(), "big") >> (64 - PAYLOAD_HASH_BITS)


class PartitionState:
    """Deduplicate, park and apply the events of one partition's keys."""

    def __init__(self, partition: int, settings: StateSettings | None = None) -> None:
        self.partition = partition
        self.settings = settings or StateSettings()
        self.last_seq = 0
        # The last (stream sequence, edge batch index) taken; anything at or before it
        # is a redelivery. Checkpoints fall between whole messages, so a restored state
        # has taken every event of its last message.
        self._position: tuple[int, int] = (0, -1)
        # Event ids of each plant by their 64-bit event_hash, with the payload hash as
        # value. Two
        # different ids share a 64-bit hash with odds of about n**2 / 2**65: about 1 in
        # 10**7 for 2,000,000 remembered ids. Then the later id is taken for a duplicate
        # or a reused id, so one event is dropped or dead-lettered.
        self.seen = IdTable(self.settings.dedup_max_ids)
        # Per plant, the orders evicted by evict_closed_orders: order key hash to the
        # completion time in seconds since the epoch. Per plant so that forget_plant
        # can drop them for a replay.
        self.closed_orders: dict[str, IdTable] = {}
        self.orders: dict[str, OrderState] = {}
        self.machines: dict[str, MachineTrack] = {}
        self.parked: dict[str, list[Parked]] = {}
        self.plant_holds: dict[str, HoldState] = {}
        self.counts: Counter[str] = Counter()
        self.clocks: dict[str, PlantClock] = {}
        self.rejected: dict[int, list[str]] = {}
        """Dead letter ids by event_hash, for events whose id applying rejected and
        forgot, oldest first; at most REJECTED_MAX_IDS ids."""
        self._dirty_orders: set[str] = set()
        # Orders changed since the last checkpoint_parts and already taken by
        # take_snapshot, which empties _dirty_orders; and orders dropped since then.
        self._unsaved_orders: set[str] = set()
        self._dropped_orders: set[str] = set()
        # Orders whose snapshot rows a restore rewrites. Unlike _dirty_orders they are
        # in the checkpoint already, so the next delta leaves them out.
        self._rewrite_orders: set[str] = set()
        self._evicted_unwritten: list[OrderState] = []
        """Orders evicted before take_snapshot wrote their latest rows, which it
        writes from here."""
        self._dirty_clocks: set[str] = set()
        # Plants whose closed-order table forget_plant dropped since the last
        # checkpoint_parts.
        self._forgotten_closed: set[str] = set()
        # Whether the next checkpoint_parts must store the id tables whole: after a
        # restore from parts that did not carry them, a delta would have no base.
        self._whole_tables_due = False
        self._calendars_written: set[str] = set()
        self._facts: dict[str, object] = {}
        self._posting_subjects: dict[str, str] = {}
        self._ledger_rows: list[tuple[object, ...]] = []
        self._posting_rows: list[Posting] = []
        """Postings for the `postings` table, turned into Arrow columns by
        _build_chunks. A row dict per posting cost more than keeping the posting."""
        self._chunks: dict[str, list[pa.Table]] = {}
        """Snapshot rows already turned into Arrow tables, in the order collected."""
        self._reledgered: set[tuple[int, int]] = set()
        """Ledger keys (stream_seq, batch_index) given a second row since the last
        snapshot, such as a parked event that was applied. Only these can repeat."""
        self.chunk_rows = CHUNK_ROWS
        """Ledger rows that make apply_batch turn the collected rows into Arrow."""
        self._rows: dict[str, list[dict[str, object]]] = {}
        self._last_expiry_scan = time.time()
        self._eviction_block = 0
        """The stream sequence block (stream_seq // eviction_interval_seqs) of the last
        scan for completed orders to evict."""
        self._max_ahead = dt.timedelta(seconds=self.settings.max_future_s)
        self._now = dt.datetime.now(dt.UTC)
        """The host clock, read once per batch by apply_batch."""
        self._future_limit = self._now + self._max_ahead
        self._local_clock: dict[dt.tzinfo, tuple[dt.datetime, dt.datetime]] = {}
        """Per fixed UTC offset, _now and _future_limit at that offset. Python compares
        two times fast only when they share a tzinfo object, as decoded times of one
        offset do. Comparing with the host clock in UTC took 2% of the time."""
        # Per batch, reset by apply_batch.
        self._postings: list[OutgoingPosting] = []
        self._dead: list[DeadLetter] = []
        self._resolved: list[LetterResolved] = []

    # -- the batch -------------------------------------------------------------------

    def apply_batch(self, messages: list[SourceMessage]) -> BatchResult:
        """Apply messages in stream order and return the postings and dead letters."""
        self._postings = []
        self._dead = []
        self._resolved = []
        before = self.counts.copy()
        interval = self.settings.eviction_interval_seqs
        # One reading of the host clock per batch, because a batch takes milliseconds,
        # far less than max_future_s, and a reading per event showed in the profile.
        self._now = dt.datetime.now(dt.UTC)
        self._future_limit = self._now + self._max_ahead
        self._local_clock = {}
        primaries = 0
        for message in messages:
            primaries += message.primary
            if message.stream_seq // interval > self._eviction_block:
                # At fixed stream positions, so that a restored state evicts before
                # the same messages as the process before it.
                self._eviction_block = message.stream_seq // interval
                self.evict_closed_orders()
            try:
                self._accept(message)
            except Exception as error:
                # One message must not stop the partition: a bug it triggers becomes a
                # dead letter with the traceback logged, and the batch goes on.
                logger.exception(
                    "applying seq %d on %s failed", message.stream_seq, message.subject
                )
                self._reject(
                    message,
                    "internal_error",
                    f"{type(error).__name__}: {error}; this is a plantstream bug, "
                    "please report it with this dead letter",
                    _key_or_none(message.data),
                )
            if message.stream_seq > self.last_seq:
                self.last_seq = message.stream_seq
            position = (message.stream_seq, message.index)
            if position > self._position:
                self._position = position
        if primaries:
            self.counts["events_in"] += primaries
        if self.seen.forgotten:
            self.counts["ids_forgotten"] += self.seen.forgotten
            self.seen.forgotten = 0
        now = time.time()
        if now - self._last_expiry_scan >= EXPIRY_SCAN_INTERVAL_S:
            if self.parked:
                self._expire_parked(now)
            self._last_expiry_scan = now
        delta = {
            k: v - before.get(k, 0)
            for k, v in self.counts.items()
            if v != before.get(k)
        }
        if len(self._ledger_rows) >= self.chunk_rows:
            self._build_chunks()
        return BatchResult(
            self._postings, self._dead, delta, self.last_seq, self._resolved
        )

    def _accept(self, message: SourceMessage) -> None:
        if not message.primary:
            self._accept_copy(message)
            return
        if (message.stream_seq, message.index) <= self._position:
            # JetStream delivered a message this partition already took (a stalled
            # ack, a server restart). The id table would miss it, because it drops
            # the id of an event that applying rejected, and its oldest ids when
            # full. So such a message would be judged, and dead-lettered, again.
            self.counts["redelivered"] += 1
            return
        try:
            event = decode_event(message.data)
        except msgspec.ValidationError as error:
            detail = describe_decode_error(error, message.data)
            self._reject(message, "invalid", detail, _key_or_none(message.data))
            return
        except msgspec.DecodeError as error:
            detail = describe_decode_error(error, message.data)
            self._reject(message, "malformed", detail, _key_or_none(message.data))
            return

        occurred_at = event.occurred_at
        local = self._local_clock.get(occurred_at.tzinfo)  # type: ignore[arg-type]
        now, future_limit = local or self._host_clock_at(occurred_at.tzinfo)
        plant = event.plant
        clock = (
            self.clocks[plant] if plant in self._dirty_clocks else self._clock(plant)
        )
        if occurred_at > future_limit:
            # Rejected before the watermark moves, so a fast clock never makes the
            # plant's correct events look late.
            clock.future_rejected += 1
            self._reject(
                message,
                "future_time",
                f"occurred_at {event.occurred_at.isoformat()} is more than "
                f"{self.settings.max_future_s:g} s ahead of this host's clock; check "
                f"the clock of plant {plant}'s source {event.source}",
                event,
            )
            # Its id was never remembered, so a retry or a corrected event applies.
            self._keep_letter(event_hash(plant, event.event_id), message, "future_time")
            return

        payload_hash = _payload_hash(event)
        id_hash = event_hash(plant, event.event_id)
        # A new id, the usual case, is remembered by this same lookup.
        known = self.seen.get_or_put(id_hash, payload_hash)
        order_key = None if event.order is None else f"{plant}\x1f{event.order}"
        if known is None and order_key is not None and self.seen.dropped:
            # An order's ids outlive the id table's, but they can contain an id the
            # table lacks only after the table dropped some.
            order = self.orders.get(order_key)
            if order is not None and order.event_ids:
                # Always bytes once decoded: __post_init__ packs the dict of older
                # checkpoints.
                known = find_packed_id(cast(bytes, order.event_ids), id_hash)
                if known is not None:
                    # The id table had forgotten it: remember the first payload again.
                    self.seen.put(id_hash, known)
        if known is not None:
            if known == payload_hash:
                self.counts["duplicates"] += 1
                self._ledger(event, message, "duplicate")
            else:
                self._reject(
                    message,
                    "reused_id",
                    f"event id {event.event_id} was seen before with payload hash "
                    f"{known:08x}; this payload hashes to {payload_hash:08x} (the top "
                    f"{PAYLOAD_HASH_BITS} bits of blake2b); send a changed event "
                    "under a new event id, then close this letter with "
                    "`plantstream dlq dismiss`",
                    event,
                )
            return
        self._observe_time(clock, occurred_at, now)
        self._apply(event, message, payload_hash, id_hash, order_key)

    def _host_clock_at(self, tz: dt.tzinfo | None) -> tuple[dt.datetime, dt.datetime]:
        """Return this batch's host clock and future limit at the offset `tz`."""
        if type(tz) is not dt.timezone:
            # A time zone with daylight saving time (an event built in Python). Times
            # that share such a tzinfo compare by wall clock, so compare in UTC.
            return self._now, self._future_limit
        local = self._local_clock[tz] = (
            self._now.astimezone(tz),
            self._future_limit.astimezone(tz),
        )
        return local

    def _clock(self, plant: str) -> PlantClock:
        if plant in self._dirty_clocks:
            # Only this method adds to _dirty_clocks, after it made the clock and wrote
            # the calendar row, so nothing else is left to do for this plant.
            return self.clocks[plant]
        clock = self.clocks.get(plant)
        if clock is None:
            clock = self.clocks[plant] = PlantClock()
        if plant not in self._calendars_written:
            self._calendars_written.add(plant)
            self._rows.setdefault("plant_calendars", []).append(
                {
                    "plant": plant,
                    "time_zone": self.settings.time_zones().get(plant),
                    "shift_start_min": self.settings.shift_start_min(),
                    "shift_length_min": self.settings.shift_hours * 60,
                }
            )
        self._dirty_clocks.add(plant)
        return clock

    def _observe_time(
        self, clock: PlantClock, occurred_at: dt.datetime, now: dt.datetime
    ) -> None:
        # The watermark never passes the host clock: an event allowed a little ahead
        # (max_future_s) must not make the plant's next correct events count as late.
        clock.events += 1
        watermark = clock.watermark
        if watermark is None or occurred_at > watermark:
            clock.watermark = occurred_at if occurred_at < now else now
            return
        lateness = watermark - occurred_at
        if lateness.total_seconds() > self.settings.lateness_tolerance_s:
            clock.late_events += 1
        lateness_us = lateness // dt.timedelta(microseconds=1)
        if lateness_us > clock.max_lateness_us:
            clock.max_lateness_us = lateness_us

    def _ledger(
        self,
        event: ev.PlantEvent,
        message: SourceMessage,
        status: str,
        reason: str | None = None,
        facts: dict[str, object] | None = None,
    ) -> None:
        # Ledger rows are tuples in the column order of the `events` table, turned into
        # Arrow columns at the snapshot, because a dict per message costs more.
        tz = event.occurred_at.tzinfo
        offset = _OFFSET_SECONDS.get(tz)
        if offset is None:
            offset = _offset_seconds(event.occurred_at)
            if type(tz) is dt.timezone:
                # A fixed offset, as every decoded time has. A zone with daylight
                # saving time (an event built in Python) is queried for each event.
                _OFFSET_SECONDS[tz] = offset
        self._ledger_rows.append(
            (
                message.stream_seq,
                message.index,
                event.event_id,
                event.plant,
                event.order,
                event.__struct_config__.tag,
                status,
                reason,
                event.occurred_at,
                offset,
            )
            + (_NO_FACTS if not facts else tuple(map(facts.get, FACT_COLUMNS)))
        )

    def _accept_copy(self, message: SourceMessage) -> None:
        # The primary copy validates and reports; a copy only applies what is valid.
        try:
            event = decode_event(message.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        id_hash = event_hash(event.plant, event.event_id)
        if id_hash in self.seen:
            return
        self._remember(id_hash, _payload_hash(event))
        if isinstance(event, _HOLD_EVENTS):
            self._apply_copy(event, message)

    def _apply_copy(
        self,
        event: ev.QualityHoldApplied | ev.QualityHoldReleased,
        message: SourceMessage,
    ) -> None:
        # A release can reach this partition before its hold: the copy waits like the
        # primary does, but silently, because the primary reports and expires it.
        try:
            satisfied = self._apply_plant_hold(event, record=False)
        except _Park as park:
            self.parked.setdefault(park.waiting_for, []).append(
                Parked(
                    message.stream_seq,
                    message.subject,
                    message.data,
                    event.event_id,
                    park.waiting_for,
                    time.time(),
                    message.index,
                    primary=False,
                )
            )
            return
        except ValueError:
            return  # the primary copy dead-letters it
        if self.parked:
            for key in satisfied:
                self._unpark(key)

    def _apply_plant_hold(
        self, event: ev.QualityHoldApplied | ev.QualityHoldReleased, *, record: bool
    ) -> list[str]:
        """Apply a hold without an order to every order of its plant in this partition.

        A lot or material hold blocks the matching stock of each order; orders released
        later in this partition take it on at release, until the hold is released.
        """
        outcome = Outcome()
        if isinstance(event, ev.QualityHoldApplied):
            if event.scope == "order":
                raise ValueError(
                    f"hold {event.hold_id} has scope order but names no order; give "
                    "its order, or use scope lot or material for a plant-wide hold"
                )
            hold = hold_from_event(event)
            self.plant_holds[f"{event.plant}\x1f{event.hold_id}"] = hold
            for key, order in self.orders.items():
                if order.plant == event.plant:
                    apply_hold(order, event, hold, outcome, record=False)
                    self._dirty_orders.add(key)
            if record:
                outcome.add_row("holds", _plant_hold_row(event.plant, hold, None))
            self._collect(outcome)
            return [f"hold:{event.plant}:{event.hold_id}"]
        released = self.plant_holds.pop(f"{event.plant}\x1f{event.hold_id}", None)
        if released is None:
            raise _Park(f"hold:{event.plant}:{event.hold_id}")
        for key, order in self.orders.items():
            if order.plant == event.plant and release_hold(
                order, event, outcome, record=False
            ):
                self._dirty_orders.add(key)
        if record:
            outcome.add_row(
                "holds", _plant_hold_row(event.plant, released, event.occurred_at)
            )
        self._collect(outcome)
        return []

    def _remember(self, id_hash: int, payload_hash: int) -> None:
        # The table drops its oldest id when it is full, and apply_batch counts those.
        self.seen.put(id_hash, payload_hash)

    def _reject(
        self,
        message: SourceMessage,
        reason: DeadLetterReason,
        detail: str,
        event: ev.PlantEvent | EventKey | None = None,
    ) -> None:
        self.counts[f"dead_letter:{reason}"] += 1
        if isinstance(event, ev.Event):
            self._ledger(event, message, "dead_letter", reason)
        self._dead.append(
            DeadLetter(
                reason=reason,
                detail=detail,
                subject=message.subject,
                stream_seq=message.stream_seq,
                batch_index=None if message.index < 0 else message.index,
                data=message.data,
                rejected_at=dt.datetime.now(dt.UTC),
                event_id=event.event_id if event else None,
                plant=event.plant if event else None,
                order=event.order if event else None,
            )
        )

    def _reject_unapplied(
        self,
        message: SourceMessage,
        reason: DeadLetterReason,
        detail: str,
        event: ev.PlantEvent,
    ) -> None:
        """Dead-letter an event that applying rejected, and forget its id.

        Nothing of the event was applied, so its id must not block what comes under
        it later: the corrected event that a plant sends again under the same id, or
        this dead letter retried once its cause is fixed. Either is judged afresh.
        """
        id_hash = event_hash(event.plant, event.event_id)
        self.seen.pop(id_hash)
        self._reject(message, reason, detail, event)
        self._keep_letter(id_hash, message, reason)

    def _keep_letter(
        self, id_hash: int, message: SourceMessage, reason: DeadLetterReason
    ) -> None:
        """Keep the letter's id under its event's, for `_resolve_letters`."""
        index = None if message.index < 0 else message.index
        letter = letter_id_at(message.subject, message.stream_seq, index, reason)
        letters = self.rejected.get(id_hash)
        if letters is None:
            if len(self.rejected) >= REJECTED_MAX_IDS:
                del self.rejected[next(iter(self.rejected))]
            self.rejected[id_hash] = [letter]
        elif letter not in letters:
            # A replay rejects the same message again under the same letter id.
            letters.append(letter)

    def _resolve_letters(
        self, event: ev.PlantEvent, message: SourceMessage, id_hash: int | None
    ) -> None:
        """Report the kept letters of `event`'s id as resolved, now that it applied."""
        if id_hash is None:
            id_hash = event_hash(event.plant, event.event_id)
        letters = self.rejected.pop(id_hash, None)
        if letters is None:
            return
        now = dt.datetime.now(dt.UTC)
        index = None if message.index < 0 else message.index
        rows = self._rows.setdefault("dead_letter_resolutions", [])
        for letter in letters:
            resolved = LetterResolved(
                letter_id=letter,
                plant=event.plant,
                event_id=event.event_id,
                subject=message.subject,
                stream_seq=message.stream_seq,
                batch_index=index,
                resolved_at=now,
            )
            self._resolved.append(resolved)
            row = msgspec.structs.asdict(resolved)
            # A key column cannot be null: -1 marks a message that carried one event.
            row["batch_index"] = message.index
            rows.append(row)
        self.counts["dead_letters_resolved"] += len(letters)

    # -- applying ----------------------------------------------------------------------

    def _apply(
        self,
        event: ev.PlantEvent,
        message: SourceMessage,
        payload_hash: int | None = None,
        id_hash: int | None = None,
        order_key: str | None = None,
    ) -> None:
        self._facts = _NO_FACT_DICT
        if order_key is None and event.order is not None:
            order_key = f"{event.plant}\x1f{event.order}"
        try:
            satisfied = self._dispatch(event, order_key)
        except _Park as park:
            self._park(event, message, park.waiting_for)
            self._ledger(event, message, "parked")
            return
        except NegativeStock as error:
            self._reject_unapplied(message, "negative_stock", str(error), event)
            return
        except UnmatchedReversal as error:
            self._reject_unapplied(message, "unmatched", str(error), event)
            return
        except _OrderClosed as closed:
            detail = self._closed_detail(closed)
            self._reject_unapplied(message, "order_closed", detail, event)
            return
        except ValueError as error:
            self._reject_unapplied(message, "invalid", str(error), event)
            return
        self.counts["applied"] += 1
        self._ledger(event, message, "applied", facts=self._facts)
        if self.rejected:
            self._resolve_letters(event, message, id_hash)
        if order_key is not None:
            order = self.orders.get(order_key)
            if order is not None:
                if payload_hash is None:
                    payload_hash = _payload_hash(event)
                if id_hash is None:
                    id_hash = event_hash(event.plant, event.event_id)
                order.event_ids = add_packed_id(
                    cast(bytes, order.event_ids), id_hash, payload_hash
                )
        if self.parked:
            # Built only now: with nothing parked, the keys would go unused.
            self._unpark(f"event:{event.plant}:{event.event_id}")
            for key in satisfied:
                self._unpark(key)

    def _dispatch(self, event: ev.PlantEvent, order_key: str | None) -> Sequence[str]:
        """Apply one event; return the prerequisite keys it satisfies besides its own
        event id."""
        if order_key is not None and type(event) in _ORDER_EVENTS:
            # Most events belong to a released order: go straight to it.
            order = self.orders.get(order_key)
            if order is not None:
                return self._apply_to_order(order, order_key, event)
        plant = event.plant
        satisfied: list[str] = []
        if isinstance(event, _MACHINE_EVENTS):
            track = self.machines.get(f"{plant}\x1f{event.machine}")
            if track is None:
                track = MachineTrack(plant, event.machine)
                self.machines[f"{plant}\x1f{event.machine}"] = track
            try:
                rows = apply_machine_event(track, event, self.settings.machine_history)
            except DowntimeNotStarted as missing:
                raise _Park(
                    f"downtime:{plant}:{event.machine}:{missing.downtime_id}"
                ) from None
            self._rows.setdefault("machine_states", []).extend(rows)
            if isinstance(event, ev.DowntimeStarted):
                satisfied.append(
                    f"downtime:{plant}:{event.machine}:{event.downtime_id}"
                )
            return satisfied
        if isinstance(event, ev.ShipmentConfirmed):
            self._rows.setdefault("shipments", []).append(
                {
                    "event_id": event.event_id,
                    "plant": plant,
                    "delivery": event.delivery,
                    "material": event.material,
                    "quantity": event.quantity.value,
                    "uom": event.quantity.uom,
                    "customer": event.customer,
                    "occurred_at": event.occurred_at,
                }
            )
            self._facts = {
                "material": event.material,
                "quantity": event.quantity.value,
                "uom": event.quantity.uom,
            }
            return satisfied
        if event.order is None and isinstance(
            event, ev.QualityHoldApplied | ev.QualityHoldReleased
        ):
            satisfied += self._apply_plant_hold(event, record=True)
            if isinstance(event, ev.QualityHoldApplied):
                self._facts = hold_facts(
                    self.plant_holds[f"{plant}\x1f{event.hold_id}"]
                )
            else:
                self._facts = {"hold_id": event.hold_id}
            return satisfied
        if event.order is None:
            raise ValueError(
                f"{event.__struct_config__.tag} event {event.event_id} names no order; "
                "this event type must carry the production order it belongs to"
            )
        assert order_key is not None  # _apply builds it for every event with an order
        if order_key not in self.orders and plant in self.closed_orders:
            completed = self.closed_orders[plant].get(stable_hash(order_key))
            if completed is not None:
                raise _OrderClosed(event.order, plant, completed)
        if isinstance(event, ev.WorkOrderReleased):
            if order_key in self.orders:
                raise ValueError(
                    f"order {event.order} of plant {plant} is already released; a "
                    "changed release needs a new order number"
                )
            order = release_order(event)
            for hold_key, hold in self.plant_holds.items():
                if hold_key.startswith(f"{plant}\x1f"):
                    order.add_hold(hold)
            self.orders[order_key] = order
            self._dirty_orders.add(order_key)
            self._facts = {
                "material": event.material,
                "quantity": event.quantity.value,
                "uom": event.quantity.uom,
            }
            satisfied.append(f"release:{plant}:{event.order}")
            return satisfied
        order = self.orders.get(order_key)
        if order is None:
            raise _Park(f"release:{plant}:{event.order}")
        return self._apply_to_order(order, order_key, event)

    def _apply_to_order(
        self, order: OrderState, order_key: str, event: ev.PlantEvent
    ) -> Sequence[str]:
        try:
            outcome = apply_order_event(order, event)
        except Unmatched as unmatched:
            # Prerequisite keys are plant-scoped: "event:P1:e-17", "hold:P1:H-3".
            kind, _, ident = unmatched.waiting_for.partition(":")
            if isinstance(event, _REVERSAL_EVENTS):
                self._reject_reversal_of_other_order(order, event)
            raise _Park(f"{kind}:{event.plant}:{ident}") from None
        self._dirty_orders.add(order_key)
        self._collect(outcome)
        self._facts = outcome.facts
        if isinstance(event, ev.QualityHoldApplied):
            return [f"hold:{event.plant}:{event.hold_id}"]
        return ()

    def _reject_reversal_of_other_order(
        self,
        order: OrderState,
        event: ev.ProductionCancelled | ev.ConsumptionReversed,
    ) -> None:
        """Raise UnmatchedReversal if another order of this partition applied the
        event that `event` names, which can then never arrive for `order`.

        NOTE: an event of an order in another partition or of an evicted order, and an
        id that the id table has forgotten, are not found. Such a reversal is still
        parked and expires as `parked_expired`, whose detail names this possibility.
        """
        named = reversed_event_id(event)
        named_hash = event_hash(order.plant, named)
        # A reversal that misses its event usually arrived before it, so the partition
        # has not seen that id yet. One lookup settles those without a scan.
        if named_hash not in self.seen:
            return
        for other in self.orders.values():
            if other is order or other.plant != order.plant:
                continue
            found_type = applied_event_type(other, named, named_hash)
            if found_type is not None:
                raise UnmatchedReversal(
                    describe_reversal_mismatch(order, event, other, found_type)
                )

    def _collect(self, outcome: Outcome) -> None:
        counts = self.counts
        for posting in outcome.postings:
            movement = (
                posting.movement_type if isinstance(posting, GoodsMovement) else "conf"
            )
            subject = self._posting_subjects.get(posting.plant)
            if subject is None:
                subject = posting_subject(posting.plant)
                self._posting_subjects[posting.plant] = subject
            self._postings.append(
                OutgoingPosting(subject, posting.key, movement, encode_posting(posting))
            )
            counts[_POSTING_COUNTS.get(movement) or f"posting:{movement}"] += 1
        self._posting_rows += outcome.postings
        for table, rows in outcome.rows.items():
            self._rows.setdefault(table, []).extend(rows)

    # -- parking ----------------------------------------------------------------------

    def _park(
        self, event: ev.PlantEvent, message: SourceMessage, waiting_for: str
    ) -> None:
        self.counts["parked"] += 1
        self.parked.setdefault(waiting_for, []).append(
            Parked(
                message.stream_seq,
                message.subject,
                message.data,
                event.event_id,
                waiting_for,
                time.time(),
                message.index,
            )
        )
        self._parked_row(event, message.stream_seq, waiting_for, "parked")
        logger.debug("parked %s until %s", event.event_id, waiting_for)

    def _parked_row(
        self, event: ev.PlantEvent, stream_seq: int, waiting_for: str, status: str
    ) -> None:
        self._rows.setdefault("parked_events", []).append(
            {
                "event_id": event.event_id,
                "plant": event.plant,
                "order_id": event.order,
                "event_type": event.__struct_config__.tag,
                "waiting_for": waiting_for,
                "stream_seq": stream_seq,
                "occurred_at": event.occurred_at,
                "status": status,
            }
        )

    def _unpark(self, key: str) -> None:
        waiting = self.parked.pop(key, None)
        if not waiting:
            return
        for parked in sorted(waiting, key=lambda p: (p.stream_seq, p.index)):
            event = decode_event(parked.data)
            message = SourceMessage(
                parked.stream_seq,
                parked.subject,
                parked.data,
                parked.primary,
                parked.index,
            )
            if not parked.primary:
                self._apply_copy(event, message)  # type: ignore[arg-type]
                continue
            self.counts["unparked"] += 1
            self._parked_row(event, parked.stream_seq, key, "applied")
            self._reledgered.add((parked.stream_seq, parked.index))
            letters = len(self._dead)
            self._apply(event, message)
            # Released but then rejected, as a second cancellation of one report is:
            # the later row replaces "applied". A letter of another message, from the
            # events this one released in turn, does not count.
            index = None if parked.index < 0 else parked.index
            if any(
                letter.stream_seq == parked.stream_seq and letter.batch_index == index
                for letter in self._dead[letters:]
            ):
                self._parked_row(event, parked.stream_seq, key, "dead_letter")

    def _expire_parked(self, now: float) -> None:
        # NOTE: wall-clock time decides this, unlike the evictions, so a state restored
        # after a crash may apply an event its old process had just expired.
        deadline = now - self.settings.park_timeout_s
        for key in [k for k, v in self.parked.items() if v[0].parked_at < deadline]:
            keep: list[Parked] = []
            for parked in self.parked.pop(key):
                if parked.parked_at >= deadline:
                    keep.append(parked)
                    continue
                if not parked.primary:
                    continue  # its primary copy expires and reports it
                event = decode_event(parked.data)
                message = SourceMessage(
                    parked.stream_seq, parked.subject, parked.data, True, parked.index
                )
                self._parked_row(event, parked.stream_seq, key, "expired")
                self._reledgered.add((parked.stream_seq, parked.index))
                # Forget the id, so that the dead letter applies when it is retried.
                id_hash = event_hash(event.plant, parked.event_id)
                self.seen.pop(id_hash)
                self._reject(
                    message,
                    "parked_expired",
                    f"waited {self.settings.park_timeout_s:g} s for {key} and it never "
                    "arrived; publish the missing event, then retry this dead letter"
                    + _expired_reversal_hint(event, key),
                    event,
                )
                self._keep_letter(id_hash, message, "parked_expired")
            if keep:
                self.parked[key] = keep

    # -- evicting completed orders ---------------------------------------------------

    def evict_closed_orders(self) -> int:
        """Drop completed orders that lie `closed_order_retention_s` of event time
        behind their plant's watermark; return how many were dropped.

        An order with blocked stock or an active hold is kept. Each dropped order is
        remembered in `closed_orders`, so that a later event for it becomes an
        `order_closed` dead letter. The next take_snapshot writes the rows of a
        dropped order whose latest rows it has not written yet.
        """
        retention = dt.timedelta(seconds=self.settings.closed_order_retention_s)
        evicted = [
            key
            for key, order in self.orders.items()
            if order.status == "completed"
            and not order.holds
            and self._retention_passed(order, retention)
            and not order.blocked_quantity()
        ]
        for key in evicted:
            order = self.orders.pop(key)
            self._dropped_orders.add(key)
            if key in self._dirty_orders or key in self._rewrite_orders:
                # Its latest rows are not written yet: it changed since the last
                # snapshot, or a restore left its rows to rewrite.
                self._dirty_orders.discard(key)
                self._rewrite_orders.discard(key)
                self._evicted_unwritten.append(order)
            completed_at = order.completed_at or order.last_event_at
            assert completed_at is not None  # _retention_passed checked last_event_at
            table = self.closed_orders.get(order.plant)
            if table is None:
                table = IdTable(self.settings.closed_order_max_keys)
                self.closed_orders[order.plant] = table
            # The table stores 32-bit unsigned seconds (1970 to 2106).
            seconds = min(max(int(completed_at.timestamp()), 0), 0xFFFF_FFFF)
            table.put(stable_hash(key), seconds)
        if evicted:
            self.counts["orders_evicted"] += len(evicted)
            logger.debug("evicted %d completed orders", len(evicted))
        return len(evicted)

    def _retention_passed(self, order: OrderState, retention: dt.timedelta) -> bool:
        clock = self.clocks.get(order.plant)
        if clock is None or clock.watermark is None or order.last_event_at is None:
            return False
        return clock.watermark - order.last_event_at > retention

    def _closed_detail(self, closed: _OrderClosed) -> str:
        completed = dt.datetime.fromtimestamp(closed.completed_at, dt.UTC)
        return (
            f"order {closed.order} of plant {closed.plant} completed at "
            f"{completed.isoformat()} and was evicted from memory once the "
            "retention of completed orders (PLANTSTREAM_CLOSED_ORDER_RETENTION_S, "
            f"{self.settings.closed_order_retention_s:g} s of event time now) had "
            "passed; its final state is in DuckDB. To apply late events to "
            "completed orders, raise PLANTSTREAM_CLOSED_ORDER_RETENTION_S, replay the "
            "plant, then retry this dead letter"
        )

    # -- snapshots and checkpoints ----------------------------------------------------

    def _build_chunks(self) -> None:
        """Turn the rows collected so far into Arrow tables, kept until the snapshot.

        Called after each batch once enough rows wait, so that the snapshot at a
        checkpoint only joins the chunks: building all rows of a checkpoint interval
        at once stopped the partition for hundreds of milliseconds.
        """
        # TODO: a row Arrow cannot convert (an order total past DECIMAL(38, 9)) fails
        # every later checkpoint. The 15-digit limit on event quantities keeps totals
        # far below that, but the state does not check the totals it builds.
        if self._ledger_rows:
            self._chunks.setdefault("events", []).append(
                _ledger_table(self._ledger_rows)
            )
            self._ledger_rows = []
        if self._posting_rows:
            self._chunks.setdefault("postings", []).append(
                _postings_table(self._posting_rows)
            )
            self._posting_rows = []
        for table, table_rows in self._rows.items():
            if table_rows:
                self._chunks.setdefault(table, []).append(
                    table_from_rows(table, table_rows)
                )
        self._rows = {}

    def take_snapshot(self) -> dict[str, pa.Table]:
        """Return the rows changed since the last snapshot, as Arrow tables."""
        self._build_chunks()
        tables: dict[str, pa.Table] = {}
        for table, chunks in self._chunks.items():
            joined = chunks[0] if len(chunks) == 1 else pa.concat_tables(chunks)
            if table == "events":
                joined = _drop_superseded_ledger_rows(joined, self._reledgered)
            elif table not in _WRITTEN_ONCE:
                joined = _last_row_per_key(joined, TABLES[table].primary_key)
            # One chunk per column instead of one per apply_batch: Ray pickled a
            # checkpoint's tables about 2.5 times faster, and DuckDB read them faster.
            tables[table] = joined.combine_chunks()
        self._chunks = {}
        self._reledgered = set()
        rows: dict[str, list[dict[str, object]]] = {}
        if self._dirty_clocks:
            rows["plant_clocks"] = [
                _clock_row(plant, self.partition, self.clocks[plant])
                for plant in sorted(self._dirty_clocks)
            ]
            self._dirty_clocks = set()
        # Evicted orders first: the sink keeps the last row of a key, and an order
        # released again under an evicted key is the newer one.
        orders = self._evicted_unwritten + [
            self.orders[key]
            for key in sorted(self._dirty_orders | self._rewrite_orders)
            if key in self.orders
        ]
        self._evicted_unwritten = []
        self._unsaved_orders |= self._dirty_orders
        self._dirty_orders = set()
        self._rewrite_orders = set()
        if orders:
            rows["orders"] = [_order_row(order) for order in orders]
            rows["order_components"] = [
                {
                    "plant": order.plant,
                    "order_id": order.order_id,
                    "material": material,
                    "uom": component.uom,
                    "standard_quantity": component.standard_quantity(),
                    "actual_quantity": component.actual,
                }
                for order in orders
                for material, component in order.components.items()
            ]
        for table, table_rows in rows.items():
            if table_rows:
                tables[table] = table_from_rows(table, table_rows)
        return tables

    def checkpoint(self) -> bytes:
        """Serialise the state, with the last stream sequence it has applied."""
        return self._encode_state(self.orders)

    def checkpoint_parts(self, *, base: bool) -> tuple[bytes, bytes]:
        """Serialise the state without its orders, and the orders apart.

        With `base` the orders part contains every order; otherwise only the orders
        changed or dropped since the previous call. `restore` takes the state part and
        the orders parts from the last base on.
        """
        changed = self._unsaved_orders | self._dirty_orders
        if base:
            part = OrdersCheckpoint(
                True, self.orders, [], self.partition, self.last_seq
            )
            changes = None
        else:
            orders = self.orders
            part = OrdersCheckpoint(
                False,
                {key: orders[key] for key in changed if key in orders},
                sorted(self._dropped_orders),
                self.partition,
                self.last_seq,
            )
            changes = None if self._whole_tables_due else self.seen.take_changes()
        if changes is None:
            part.seen = self.seen.to_data()
            self.seen.mark()
        else:
            part.seen_changes = changes
        self._chain_closed_orders(part, whole=base or self._whole_tables_due)
        self._whole_tables_due = False
        self._unsaved_orders = set()
        self._dropped_orders = set()
        # The state part's id tables are left empty: the orders parts carry them.
        state = self._encode_state(
            {}, IdTableData(self.seen.max_entries), with_closed_orders=False
        )
        return state, msgspec.msgpack.encode(part)

    def _chain_closed_orders(self, part: OrdersCheckpoint, *, whole: bool) -> None:
        """Put the closed-order tables into `part`: whole, or their changes."""
        tables = self.closed_orders
        if not whole:
            changes: dict[str, IdTableChanges] = {}
            for plant, table in tables.items():
                plant_changes = table.take_changes()
                if plant_changes is None:
                    whole = True
                    break
                if plant_changes.keys or plant_changes.pops:
                    changes[plant] = plant_changes
        if whole:
            part.closed = {plant: table.to_data() for plant, table in tables.items()}
            for table in tables.values():
                table.mark()
        else:
            part.closed_changes = changes
            part.closed_forgotten = sorted(self._forgotten_closed)
        self._forgotten_closed = set()

    def _encode_state(
        self,
        orders: dict[str, OrderState],
        seen: IdTableData | None = None,
        *,
        with_closed_orders: bool = True,
    ) -> bytes:
        closed_orders = (
            {plant: table.to_data() for plant, table in self.closed_orders.items()}
            if with_closed_orders
            else {}
        )
        return msgspec.msgpack.encode(
            Checkpoint(
                self.partition,
                self.last_seq,
                self.seen.to_data() if seen is None else seen,
                orders,
                self.machines,
                self.parked,
                self.plant_holds,
                dict(self.counts),
                self.clocks,
                closed_orders,
                ids_keyed_by_plant=True,
                rejected=self.rejected,
            )
        )

    @classmethod
    def restore(
        cls,
        data: bytes,
        settings: StateSettings | None = None,
        orders: Sequence[bytes] = (),
    ) -> PartitionState:
        """Rebuild a state from `checkpoint()`, or from `checkpoint_parts`: the state
        part and the orders parts of one base and the deltas after it, in order."""
        saved = _decode_checkpoint(data, Checkpoint, 0)
        if not saved.ids_keyed_by_plant:
            # The checkpoint has only the hashes, so they cannot be keyed again.
            raise CheckpointFormatError(
                f"the checkpoint of partition {saved.partition} was written by a "
                "plantstream version that remembered event ids without their plant, "
                "and this version cannot read those. Delete the object store bucket "
                "plantstream-checkpoints and start again, which replays the plant "
                "events stream from sequence 1",
                part=0,
            )
        parts = [
            _decode_checkpoint(part, OrdersCheckpoint, index)
            for index, part in enumerate(orders, start=1)
        ]
        if parts:
            saved.orders = _merge_orders(parts, saved)
        state = cls(saved.partition, settings)
        state.resume_after(saved.last_seq)
        state.seen = _merge_seen(parts, saved, state.settings.dedup_max_ids)
        state.closed_orders = _merge_closed(
            parts, saved, state.settings.closed_order_max_keys
        )
        # Parts of a version that kept the id tables in the state part: the next
        # delta has no base for their changes, so it stores them whole.
        state._whole_tables_due = bool(parts) and all(
            part.seen is None and part.closed is None for part in parts
        )
        state.orders = saved.orders
        state.machines = saved.machines
        state.parked = saved.parked
        state.plant_holds = saved.plant_holds
        state.counts = Counter(saved.counts)
        state.clocks = saved.clocks
        state.rejected = saved.rejected
        state.rewrite_rows()
        return state

    def resume_after(self, last_seq: int) -> None:
        """Take every message up to stream sequence `last_seq` as applied, so that a
        redelivery of one is dropped, and its block as scanned for evictions."""
        self.last_seq = last_seq
        # Checkpoints fall between whole messages, so every event of the last one
        # was taken.
        self._position = (last_seq, sys.maxsize)
        # The process that wrote the checkpoint scanned when its last message entered
        # this block, so the next scan is at the next block, as it would have been.
        self._eviction_block = last_seq // self.settings.eviction_interval_seqs

    def rewrite_rows(self) -> None:
        """Write every order's and every plant clock's snapshot rows, and each plant's
        calendar, again at the next snapshot.

        A restored state needs it: the rows an old process collected after its last
        checkpoint were lost with it, and DuckDB may hold rows of a later state than
        the checkpoint's. Rewriting them brings the tables back in step.
        """
        self._rewrite_orders = set(self.orders)
        for plant in self.clocks:
            self._clock(plant)

    def parked_count(self) -> int:
        return sum(len(v) for v in self.parked.values())

    def stats(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "orders": len(self.orders),
            "machines": len(self.machines),
            "remembered_ids": len(self.seen),
            "closed_orders": sum(len(t) for t in self.closed_orders.values()),
            "orders_evicted": self.counts["orders_evicted"],
            "parked": self.parked_count(),
            "last_seq": self.last_seq,
            "counts": dict(self.counts),
        }

    def forget_plant(self, plant: str, event_ids: Iterable[str]) -> int:
        """Drop a plant's orders (live and evicted), machines, holds, parked events,
        clock and `event_ids`.

        `plantstream replay` calls this before it applies the plant's events again, so
        that they are applied instead of dropped as duplicates. Return the number of
        orders, machines and plant-wide holds dropped.
        """
        # The replayed messages lie at or before the restored position, which would
        # count a repeated id as a redelivery rather than a duplicate or a reused id.
        self._position = (0, -1)
        prefix = f"{plant}\x1f"
        dropped = 0
        for entities in (self.orders, self.machines, self.plant_holds):
            for key in [key for key in entities if key.startswith(prefix)]:
                del entities[key]
                dropped += 1
                if entities is self.orders:
                    self._dropped_orders.add(key)
        self._dirty_orders = {k for k in self._dirty_orders if not k.startswith(prefix)}
        self._evicted_unwritten = [
            order for order in self._evicted_unwritten if order.plant != plant
        ]
        # Prerequisite keys name their plant second: "release:P1:4711".
        for key in [key for key in self.parked if key.split(":", 2)[1:2] == [plant]]:
            del self.parked[key]
        self.clocks.pop(plant, None)
        self._dirty_clocks.discard(plant)
        if self.closed_orders.pop(plant, None) is not None:
            self._forgotten_closed.add(plant)
        for event_id in event_ids:
            self.seen.pop(event_hash(plant, event_id))
        return dropped


FACT_COLUMNS = (
    "material",
    "quantity",
    "uom",
    "lot",
    "refers_to",
    "hold_id",
    "hold_scope",
)
"""Ledger columns that come from what applying the event found (`Outcome.facts`)."""

_T = typing.TypeVar("_T")

_NO_FACTS = (None,) * len(FACT_COLUMNS)
_NO_FACT_DICT: dict[str, object] = {}
_OFFSET_SECONDS: dict[dt.tzinfo | None, int] = {}
"""UTC offset in seconds by fixed-offset time zone. The decoder shares one object per
offset, so there are as many as the plants use."""


def _decode_checkpoint(data: bytes, kind: type[_T], part: int) -> _T:
    try:
        return msgspec.msgpack.decode(data, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        # The ingest compares each object's digest with the manifest before a
        # restore, so an object that passed it and still fails here was most likely
        # written by a version with another format.
        raise CheckpointFormatError(
            f"the checkpoint cannot be read ({error}): it was written by another "
            "plantstream version, or damaged before its digest was recorded. Delete "
            "the object store bucket plantstream-checkpoints and start again, which "
            "replays the plant events stream from sequence 1",
            part=part,
        ) from error


def _merge_seen(
    parts: list[OrdersCheckpoint], saved: Checkpoint, max_entries: int
) -> IdTable:
    # The last whole table of the chain, then the changes of each part after it.
    # Parts written before the id table joined them carry neither.
    last_whole = None
    for index, part in enumerate(parts):
        if part.seen is not None:
            last_whole = index
    if last_whole is None:
        if any(part.seen_changes is not None for part in parts):
            raise CheckpointFormatError(
                "the checkpoint's orders parts contain id table changes but no whole "
                "id table to apply them to, so the remembered event ids cannot be "
                "rebuilt and the object store bucket plantstream-checkpoints is "
                "damaged. Delete it and start again, which replays the plant events "
                "stream from sequence 1"
            )
        return IdTable.from_data(saved.seen, max_entries)
    whole = parts[last_whole].seen
    assert whole is not None
    # Part numbers as CheckpointFormatError counts them: 1 is the first orders part.
    part_number = last_whole + 1
    try:
        table = IdTable.from_data(whole, max_entries)
        for part in parts[last_whole + 1 :]:
            part_number += 1
            if part.seen_changes is not None:
                table.apply_changes(part.seen_changes)
    except ValueError as error:
        raise CheckpointFormatError(
            f"the checkpoint's remembered event ids cannot be rebuilt ({error}). "
            "Delete the object store bucket plantstream-checkpoints and start again, "
            "which replays the plant events stream from sequence 1",
            part=part_number,
        ) from error
    return table


def _merge_closed(
    parts: list[OrdersCheckpoint], saved: Checkpoint, max_keys: int
) -> dict[str, IdTable]:
    # As _merge_seen: the last whole set of tables, then the changes after it.
    last_whole = None
    for index, part in enumerate(parts):
        if part.closed is not None:
            last_whole = index
    if last_whole is None and any(
        part.closed_changes or part.closed_forgotten for part in parts
    ):
        raise CheckpointFormatError(
            "the checkpoint's orders parts contain changes of evicted orders but no "
            "whole tables to apply them to, so the object store bucket "
            "plantstream-checkpoints is damaged. Delete it and start again, which "
            "replays the plant events stream from sequence 1"
        )
    whole = saved.closed_orders if last_whole is None else parts[last_whole].closed
    assert whole is not None
    later = parts[last_whole + 1 :] if last_whole is not None else parts
    part_number = 0 if last_whole is None else last_whole + 1
    try:
        tables = {
            plant: IdTable.from_data(data, max_keys) for plant, data in whole.items()
        }
        for part in later:
            part_number += 1
            for plant in part.closed_forgotten:
                tables.pop(plant, None)
            for plant, changes in part.closed_changes.items():
                table = tables.get(plant)
                if table is None:
                    table = tables[plant] = IdTable(max_keys)
                table.apply_changes(changes)
    except ValueError as error:
        raise CheckpointFormatError(
            f"the checkpoint's evicted orders cannot be rebuilt ({error}). Delete the "
            "object store bucket plantstream-checkpoints and start again, which "
            "replays the plant events stream from sequence 1",
            part=part_number,
        ) from error
    return tables


def _merge_orders(
    parts: list[OrdersCheckpoint], saved: Checkpoint
) -> dict[str, OrderState]:
    problem = None
    if not parts[0].base or any(part.base for part in parts[1:]):
        problem = "do not start with exactly one part that contains every order"
    elif any(part.partition != saved.partition for part in parts):
        problem = f"are not all of partition {saved.partition}"
    elif any(a.last_seq > b.last_seq for a, b in itertools.pairwise(parts)):
        problem = "are not in the order they were written"
    elif parts[-1].last_seq != saved.last_seq:
        problem = (
            f"end at stream sequence {parts[-1].last_seq}, not at the state's "
            f"{saved.last_seq}"
        )
    if problem is not None:
        raise CheckpointFormatError(
            f"the checkpoint's orders parts {problem}, so the orders cannot be "
            "rebuilt and the object store bucket plantstream-checkpoints is damaged. "
            "Delete it and start again, which replays the plant events stream from "
            "sequence 1"
        )
    orders = parts[0].orders
    for part in parts[1:]:
        # Dropped first: an order dropped and then changed again is kept.
        for key in part.dropped:
            orders.pop(key, None)
        orders.update(part.orders)
    return orders


def _offset_seconds(moment: dt.datetime) -> int:
    offset = moment.utcoffset()
    assert offset is not None  # contracts.events rejects naive times
    return int(offset.total_seconds())


"""Shared by every event without facts; nothing writes into it."""


_WRITTEN_ONCE = frozenset({"postings", "inspections", "shipments"})
"""Tables whose key is the id of the one posting or event that writes the row, so a
snapshot contains each key once. The others are deduplicated at the snapshot, which took
about 1.5 µs per row. If a key ever repeats, the sink still keeps its last row."""


def _drop_superseded_ledger_rows(
    table: pa.Table, reledgered: set[tuple[int, int]]
) -> pa.Table:
    """Keep only the last ledger row of each key in `reledgered`.

    Grouping the whole ledger by key cost about 2 µs per row, while only the keys in
    `reledgered` (parked events applied or expired) can have more than one row.
    """
    if not reledgered:
        return table
    seqs = pa.array(sorted({seq for seq, _ in reledgered}), pa.int64())
    candidates = pc.indices_nonzero(pc.is_in(table["stream_seq"], value_set=seqs))
    if not len(candidates):
        return table
    rows = candidates.to_pylist()
    keys = zip(
        table["stream_seq"].take(candidates).to_pylist(),
        table["batch_index"].take(candidates).to_pylist(),
        strict=True,
    )
    # Later rows overwrite earlier ones, so each key ends with its last row.
    last = dict(zip(keys, rows, strict=True))
    superseded = sorted(set(rows) - set(last.values()))
    if not superseded:
        return table
    # The slices between the few superseded rows, which keeps the others in order.
    parts, start = [], 0
    for row in superseded:
        parts.append(table.slice(start, row - start))
        start = row + 1
    parts.append(table.slice(start))
    return pa.concat_tables(parts)


def _last_row_per_key(table: pa.Table, key: tuple[str, ...]) -> pa.Table:
    """Keep the last row of each key, in the order the kept rows had in `table`."""
    numbered = table.append_column(
        "__row", pa.array(range(table.num_rows), type=pa.int64())
    )
    last = numbered.group_by(list(key), use_threads=False).aggregate(
        [("__row", "max")]
    )["__row_max"]
    if len(last) == table.num_rows:
        return table  # no key repeats, so copying every column would change nothing
    return table.take(pc.take(last, pc.sort_indices(last)))


_POSTING_COUNTS = {
    movement: f"posting:{movement}"
    for movement in (*typing.get_args(MovementType), "conf")
}
"""Count keys of every movement type and of confirmations, built once instead of per
posting."""


def _postings_table(postings: list[Posting]) -> pa.Table:
    # Column by column from the posting structs: goods movements and confirmations
    # fill different columns, and the other kind's columns stay null. Posting keys are
    # unique, and the sink removes repeated keys in any case, so no dedup pass here.
    movements = [p for p in postings if isinstance(p, GoodsMovement)]
    confirmations = [p for p in postings if not isinstance(p, GoodsMovement)]
    schema = TABLES["postings"].schema
    tables = []

    if movements:
        none = [None] * len(movements)
        columns: dict[str, list[object]] = {
            "key": [p.key for p in movements],
            "posting_type": ["goods_movement"] * len(movements),
            "plant": [p.plant for p in movements],
            "order_id": [p.order for p in movements],
            "movement_type": [p.movement_type for p in movements],
            "material": [p.material for p in movements],
            "quantity": [p.quantity for p in movements],
            "uom": [p.uom for p in movements],
            "stock_type": [p.stock_type for p in movements],
            "batch": [p.batch for p in movements],
            "storage_location": [p.storage_location for p in movements],
            "posting_date": [p.posting_date for p in movements],
            "occurred_at": [p.occurred_at for p in movements],
            "reference": [p.reference for p in movements],
            "reverses": [p.reverses for p in movements],
            "lineage": [p.lineage for p in movements],
        }
        tables.append(_table_from_columns(schema, columns, none))

    if confirmations:
        none = [None] * len(confirmations)
        columns = {
            "key": [p.key for p in confirmations],
            "posting_type": ["order_confirmation"] * len(confirmations),
            "plant": [p.plant for p in confirmations],
            "order_id": [p.order for p in confirmations],
            "uom": [p.uom for p in confirmations],
            "operation": [p.operation for p in confirmations],
            "work_center": [p.work_center for p in confirmations],
            "yield_quantity": [p.yield_quantity for p in confirmations],
            "scrap_quantity": [p.scrap_quantity for p in confirmations],
            "rework_quantity": [p.rework_quantity for p in confirmations],
            "final": [p.final for p in confirmations],
            "posting_date": [p.finished_at.date() for p in confirmations],
            "occurred_at": [p.finished_at for p in confirmations],
            "reference": [p.lineage[0] for p in confirmations],
            "reverses": [p.reverses for p in confirmations],
            "lineage": [p.lineage for p in confirmations],
        }
        tables.append(_table_from_columns(schema, columns, none))
    # Goods movements come before confirmations within a chunk. The table has no order
    # of its own, so the rows are not sorted back into posting order.
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def _table_from_columns(
    schema: pa.Schema, columns: dict[str, list[object]], none: list[None]
) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(columns.get(f.name, none), type=f.type) for f in schema],
        schema=schema,
    )


_LEDGER_ROW = pa.struct(list(TABLES["events"].schema))


def _ledger_table(rows: list[tuple[object, ...]]) -> pa.Table:
    # Repeated keys are removed at the snapshot, from the few keys that PartitionState
    # records as written twice (_drop_superseded_ledger_rows). Arrow reads the tuples
    # as structs in C++, which took less than half the time of splitting them into
    # columns in Python first.
    rows_as_structs = pa.array(rows, type=_LEDGER_ROW)
    return pa.Table.from_batches([pa.RecordBatch.from_struct_array(rows_as_structs)])


class CheckpointFormatError(ValueError):
    """A checkpoint written by an incompatible version of the partition state."""

    def __init__(
        self, message: str, *, part: int | None = None, partition: int | None = None
    ) -> None:
        super().__init__(message)
        self.part = part
        """Which data passed to `restore` failed: 0 for the state, 1 for the first
        orders part. None when each part decodes but the parts do not fit together."""
        self.partition = partition
        """The checkpoint's partition the data belongs to, where it differs from the
        restoring actor's (a checkpoint split among another partition count)."""


class _Park(Exception):
    def __init__(self, waiting_for: str) -> None:
        super().__init__(waiting_for)
        self.waiting_for = waiting_for


class _OrderClosed(Exception):
    def __init__(self, order: str, plant: str, completed_at: int) -> None:
        super().__init__(order)
        self.order = order
        self.plant = plant
        self.completed_at = completed_at


def _expired_reversal_hint(event: ev.PlantEvent, key: str) -> str:
    # A reversal that names an event of an order in another partition waits here for
    # an event that is applied elsewhere, so "publish the missing event" misleads.
    if not isinstance(event, _REVERSAL_EVENTS) or not key.startswith("event:"):
        return ""
    return (
        f". If {reversed_event_id(event)} was applied to another order, this "
        f"reversal names the wrong order ({event.order}): publish it again under a "
        "new event id with the order of the event it reverses"
    )


def _clock_row(plant: str, partition: int, clock: PlantClock) -> dict[str, object]:
    return {
        "plant": plant,
        "partition": partition,
        "watermark": clock.watermark,
        "events": clock.events,
        "late_events": clock.late_events,
        "max_lateness_s": Decimal(clock.max_lateness_us).scaleb(-6),
        "future_rejected": clock.future_rejected,
    }


def _plant_hold_row(
    plant: str, hold: HoldState, released_at: dt.datetime | None
) -> dict[str, object]:
    return {
        "plant": plant,
        "hold_id": hold.hold_id,
        "scope": hold.scope,
        "order_id": None,
        "lot": hold.lot,
        "material": hold.material,
        "reason": hold.reason,
        "applied_at": hold.applied_at,
        "released_at": released_at,
    }


def _order_row(order: OrderState) -> dict[str, object]:
    return {
        "plant": order.plant,
        "order_id": order.order_id,
        "status": order.status,
        "material": order.material,
        "planned_quantity": order.planned,
        "uom": order.uom,
        "good_quantity": order.good,
        "scrap_quantity": order.scrap,
        "rework_quantity": order.rework,
        "blocked_quantity": order.blocked_quantity(),
        "released_at": order.released_at,
        "first_activity_at": order.first_activity_at,
        "last_event_at": order.last_event_at,
        "completed_at": order.completed_at,
        "active_holds": len(order.holds or ()),
        "events_applied": order.events_applied,
    }
