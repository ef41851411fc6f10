"""Operator commands: `plantstream replay` and `plantstream dlq list|retry`.

Replay rebuilds one plant's state from the plant events stream and republishes only the
postings that ERP_POSTINGS does not hold yet, so it never doubles a posting, even after
the stream's duplicate window has passed. The dead-letter commands list the messages in
PLANTSTREAM_DLQ and send chosen ones back through the pipeline, recording each retry in
the DLQ stream so that it is not repeated by accident.

Both replay and the checkpoint readers here work on the JetStream objects that
`pipeline.ingest` writes: the manifest and the partition states in the object store
bucket `plantstream-checkpoints`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import textwrap
import typing
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats.errors
import pyarrow as pa
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from actors.partition_state import PartitionState, SourceMessage
from actors.settings import StateSettings
from cluster.cli import non_negative_int, positive_int
from cluster.lease import DEFAULT_TTL_S, lease_holder
from contracts.codec import decode_dead_letter, decode_edge_batch
from contracts.dead_letters import (
    DeadLetter,
    DeadLetterReason,
    LetterResolved,
    letter_id,
)
from contracts.keys import decode_key, is_plant_wide, partition_of, routing_key
from pipeline.checkpoints import (
    CheckpointChains,
    CheckpointManifest,
    CheckpointMismatchError,
    SavedPartition,
    read_manifest,
    read_partitions,
)
from pipeline.ingest import KeyChecker, is_edge_batch, key_rejection_reason
from pipeline.publish import publish_all
from pipeline.settings import PipelineSettings
from pipeline.sink import SnapshotWriter, merge_tables
from pipeline.streams import CHECKPOINT_BUCKET
from pipeline.subjects import (
    DISMISSED_SUFFIX,
    DLQ_PREFIX,
    DLQ_STREAM,
    EVENTS_PREFIX,
    EVENTS_STREAM,
    POSTINGS_STREAM,
    RESOLVED_SUFFIX,
    RETRIED_SUFFIX,
    dlq_subject,
    posting_subject,
    validate_token,
)

logger = logging.getLogger(__name__)

DETAIL_WIDTH = 100
"""Columns at which `dlq list` wraps a dead letter's detail."""

__all__ = [
    "DeadLetterEntry",
    "OperationError",
    "ReplayReport",
    "RetryRecord",
    "add_parser",
    "checkpoint_totals",
    "iter_stream",
    "list_dead_letters",
    "posting_keys",
    "read_checkpoint",
    "reset_checkpoints",
    "replay_plant",
    "retry_dead_letters",
]

READ_BATCH = 1000
READ_TIMEOUT_S = 2.0
"""Seconds a stream read waits for more messages before it requests the consumer's
pending count from the server."""

MAX_READ_TIMEOUTS = 5
"""Timed-out fetches in a row, with messages still pending, before a read fails."""

ACTIVE_SAMPLES = 3
"""Consumer info samples, 0.6 s apart, that replay takes to see whether the ingest runs.

A running ingest almost always has a fetch waiting, since one lasts 0.5 s by default."""


class OperationError(Exception):
    """An operator command cannot run. The message gives the cause and the next step."""


# -- reading streams and checkpoints -------------------------------------------------


async def iter_stream(
    js: JetStreamContext,
    stream: str,
    subject: str,
    *,
    start_seq: int = 1,
    through_seq: int | None = None,
    headers_only: bool = False,
) -> AsyncIterator[Msg]:
    """Yield the messages of `stream` on `subject` from `start_seq`, in stream order.

    An ephemeral consumer without acks reads them, so the ingest's durable consumer is
    not touched. Reading stops at `through_seq`, or once nothing more is pending, and
    the consumer is deleted then.
    """
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(start_seq, 1),
        filter_subject=subject,
        headers_only=headers_only or None,
        # The server removes it after this long unused, should the delete below not
        # reach it (a lost connection).
        inactive_threshold=60.0,
    )
    # Created here rather than by pull_subscribe, which keeps the name it gives the
    # consumer to itself, so that the reader can delete it when done.
    consumer = (await js.add_consumer(stream, config)).name
    try:
        subscription = await js.pull_subscribe_bind(consumer=consumer, stream=stream)
    except BaseException:
        await _delete_reader(js, stream, consumer)
        raise
    timeouts = 0
    try:
        while True:
            try:
                messages = await subscription.fetch(READ_BATCH, timeout=READ_TIMEOUT_S)
            except TimeoutError:  # nats-py raises its own subclass or asyncio's
                # A slow server can let a fetch time out with messages still there,
                # so only an empty consumer ends the reading.
                info = await subscription.consumer_info()
                if info.num_pending == 0:
                    return
                timeouts += 1
                if timeouts >= MAX_READ_TIMEOUTS:
                    raise RuntimeError(
                        f"reading {stream} timed out {timeouts} times in a row with "
                        f"{info.num_pending} messages still pending; check the load "
                        "and the health of nats-server, then run the command again"
                    ) from None
                continue
            timeouts = 0
            for message in messages:
                if through_seq is not None and (
                    message.metadata.sequence.stream > through_seq
                ):
                    return
                yield message
            if messages[-1].metadata.num_pending == 0:
                return
    finally:
        await subscription.unsubscribe()
        await _delete_reader(js, stream, consumer)


async def _delete_reader(js: JetStreamContext, stream: str, consumer: str) -> None:
    try:
        await js.delete_consumer(stream, consumer)
    except (nats.errors.Error, OSError, TimeoutError) as error:
        # A reader left behind only adds a line to the consumer list until its
        # inactive_threshold passes, so the command's result is still valid.
        logger.debug("left reader %s on %s to the server: %r", consumer, stream, error)


async def read_checkpoint(
    js: JetStreamContext,
) -> tuple[CheckpointManifest, list[SavedPartition]] | None:
    """Return the committed manifest and partitions, or None if none exists."""
    try:
        store = await js.object_store(CHECKPOINT_BUCKET)
    except NotFoundError:
        return None
    manifest = await read_manifest(store)
    if manifest is None:
        return None
    return manifest, await read_partitions(store, manifest)


async def reset_checkpoints(
    nc: NATS, settings: PipelineSettings | None = None
) -> tuple[bool, CheckpointManifest | None]:
    """Delete the checkpoint bucket, so that the next run starts from sequence 1.

    Return whether a bucket was deleted, and its manifest if one could be read. The
    ingest must be stopped, because it would write a new checkpoint at once.
    """
    settings = settings or PipelineSettings()
    js = nc.jetstream()
    await _require_stopped(js, settings, "reset")
    try:
        store = await js.object_store(CHECKPOINT_BUCKET)
    except NotFoundError:
        return False, None
    try:
        manifest = await read_manifest(store)
    except CheckpointMismatchError as error:
        # A damaged manifest is the usual reason to reset, so it must not stop it.
        logger.info("deleting a checkpoint whose manifest is damaged: %s", error)
        manifest = None
    await js.delete_object_store(CHECKPOINT_BUCKET)
    return True, manifest


def checkpoint_totals(
    manifest: CheckpointManifest, partitions: Iterable[SavedPartition]
) -> Counter[str]:
    """Return the counts `Ingest.totals()` would return for this checkpoint."""
    totals: Counter[str] = Counter(manifest.ingest_counts)
    for partition in partitions:
        # The counts lie in the state part; the orders are not needed for them.
        totals.update(PartitionState.restore(partition.state).counts)
    return totals


async def posting_keys(js: JetStreamContext, plant: str | None = None) -> list[str]:
    """Return the Nats-Msg-Id of every posting in ERP_POSTINGS, in stream order."""
    subject = posting_subject(plant) if plant else "erp.postings.>"
    keys: list[str] = []
    async for message in iter_stream(js, POSTINGS_STREAM, subject, headers_only=True):
        keys.append((message.headers or {}).get("Nats-Msg-Id", ""))
    return keys


# -- replay --------------------------------------------------------------------------


@dataclass
class ReplayReport:
    """Counts of one replay. Postings are counted by idempotency key."""

    plant: str
    from_seq: int
    through_seq: int
    messages: int = 0
    events_forgotten: int = 0
    regenerated: int = 0
    """Postings computed for messages at or after `from_seq`."""
    already_posted: int = 0
    """Of those, postings whose key ERP_POSTINGS already holds; they are not sent."""
    new: int = 0
    """Of those, postings ERP_POSTINGS did not hold; replay published them."""
    before_start: int = 0
    """Postings recomputed for messages before `from_seq`; never sent."""
    before_start_missing: int = 0
    """Of those, postings whose key ERP_POSTINGS does not hold."""
    dead_letters: Counter[str] = field(default_factory=Counter)
    parked: int = 0

    def lines(self) -> list[str]:
        rejected = ", ".join(f"{k}={v}" for k, v in sorted(self.dead_letters.items()))
        return [
            f"replayed plant {self.plant}: stream sequences 1 to {self.through_seq}, "
            f"postings published from sequence {self.from_seq}",
            f"  messages read               {self.messages}",
            f"  event ids forgotten         {self.events_forgotten}",
            f"  postings regenerated        {self.regenerated}",
            f"    already in {POSTINGS_STREAM}  {self.already_posted}",
            f"    new (published)           {self.new}",
            f"  postings before the start   {self.before_start} "
            f"({self.before_start_missing} not in {POSTINGS_STREAM}, not sent)",
            f"  dead letters (not re-sent)  {sum(self.dead_letters.values())}"
            + (f" ({rejected})" if rejected else ""),
            f"  parked after replay         {self.parked}",
        ]


async def _ingest_active(js: JetStreamContext, settings: PipelineSettings) -> bool:
    for sample in range(ACTIVE_SAMPLES):
        try:
            info = await js.consumer_info(EVENTS_STREAM, settings.consumer)
        except NotFoundError:
            return False
        if info.num_waiting:
            return True
        if sample < ACTIVE_SAMPLES - 1:
            await asyncio.sleep(0.6)
    return False


async def _plants_with_events(js: JetStreamContext) -> list[str]:
    """Return the sorted plant ids that have messages in the plant events stream."""
    # TODO: nats-py 2.16 reads only the first page of per-subject counts, which the
    # server limits, so a stream with a very large number of subjects may list only
    # part of its plants.
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=f"{EVENTS_PREFIX}.>")
    subjects = info.state.subjects or {}
    prefix = f"{EVENTS_PREFIX}."
    return sorted(
        {s[len(prefix) :].split(".", 1)[0] for s in subjects if s.startswith(prefix)}
    )


async def _require_stopped(
    js: JetStreamContext, settings: PipelineSettings, action: str
) -> None:
    """Raise OperationError while a `plantstream run` consumes the plant events."""
    # A run that is starting, paused or writing a checkpoint has no fetch waiting, but
    # it has the lease. The fetch check still covers a run that took no lease.
    holder = await lease_holder(js)
    if holder is not None:
        raise OperationError(
            f"plantstream run holds the ingest lease ({holder.describe()}); stop it, "
            f"{action}, then start it again. A run that was killed gives up the lease "
            f"within {DEFAULT_TTL_S:g} s"
        )
    if await _ingest_active(js, settings):
        raise OperationError(
            f"the ingest consumer {settings.consumer} has a fetch waiting, so "
            f"plantstream run is still consuming; stop it, {action}, then start it "
            "again"
        )


def _split_message(subject: str, data: bytes) -> list[tuple[int, bytes]] | None:
    """Return the (batch index, event bytes) pairs of a message, as ingest does, or
    None for an edge batch the ingest dead-lettered whole."""
    if not is_edge_batch(subject):
        return [(-1, data)]
    try:
        items = decode_edge_batch(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return [(index, bytes(item)) for index, item in enumerate(items)]


class _Router:
    """Step 2 of the ingest for one plant's messages: split, decode keys, partition."""

    def __init__(self, plant: str, partitions: int) -> None:
        self.plant = plant
        self.partitions = partitions
        self.event_ids: set[str] = set()
        self.groups: dict[int, list[SourceMessage]] = {}
        self._keys = KeyChecker()
        self.rejected: Counter[str] = Counter()
        """Dead letters the ingest sent before routing, by reason."""

    def add(self, seq: int, subject: str, data: bytes) -> None:
        # NOTE: this mirrors `Ingest._route` and the edge batch split in
        # `Ingest.process`; a change to routing there must be made here too.
        events = _split_message(subject, data)
        if events is None:
            self.rejected["malformed"] += 1
            return
        for index, event in events:
            try:
                key = decode_key(event)
                self._keys.check(subject, event, key, index)
            except ValueError as error:  # msgspec's errors among them
                # Dead-lettered by the ingest, so it never reaches a partition.
                self.rejected[key_rejection_reason(error)] += 1
                continue
            if key.plant != self.plant:
                continue  # belongs to the state of the plant the event names
            self.event_ids.add(key.event_id)
            partition = partition_of(key.plant, routing_key(key), self.partitions)
            self.groups.setdefault(partition, []).append(
                SourceMessage(seq, subject, event, True, index)
            )
            if is_plant_wide(key):
                for other in range(self.partitions):
                    if other != partition:
                        self.groups.setdefault(other, []).append(
                            SourceMessage(seq, subject, event, False, index)
                        )

    def take(self) -> dict[int, list[SourceMessage]]:
        groups, self.groups = self.groups, {}
        return groups


def _merge_snapshots(states: list[PartitionState]) -> dict[str, pa.Table]:
    return merge_tables([state.take_snapshot() for state in states])


async def replay_plant(
    nc: NATS,
    plant: str,
    *,
    from_seq: int | None = None,
    from_time: dt.datetime | None = None,
    partitions: int | None = None,
    db: Path | None = None,
    state_settings: StateSettings | None = None,
    pipeline_settings: PipelineSettings | None = None,
) -> ReplayReport:
    """Rebuild `plant`'s state from the plant events stream and repost what is missing.

    The plant's orders, machines, holds, parked events and event ids are dropped from
    every partition of the last checkpoint. Then every message on the plant's
    subjects, from stream sequence 1 to the checkpoint's sequence, goes through the
    partition logic again, in stream order. State is always rebuilt from the
    beginning, because the events after the start point need the orders released
    before it. Postings of messages from `from_seq` (or from the first message stored at
    or after `from_time`) are published if ERP_POSTINGS has no posting with their key.
    The others are only counted. Last, the snapshot rows go to `db` (if given) and the
    rebuilt states replace the checkpoint.

    The ingest must be stopped, because it would overwrite the checkpoint with its own
    state.
    """
    validate_token(plant, "plant")
    if (from_seq is None) == (from_time is None):
        raise OperationError("give exactly one of from_seq and from_time")
    if from_time is not None and from_time.tzinfo is None:
        raise OperationError(
            f"from_time {from_time.isoformat()} has no UTC offset; add one, such as "
            "2026-01-05T06:00:00+00:00"
        )
    settings = pipeline_settings or PipelineSettings()
    js = nc.jetstream()
    await _require_stopped(js, settings, "replay")
    checkpoint = await read_checkpoint(js)
    if checkpoint is None:
        raise OperationError(
            "no checkpoint found in the object store bucket "
            f"{CHECKPOINT_BUCKET}: nothing has been processed, so there is nothing to "
            "replay; run plantstream run first"
        )
    manifest, saved = checkpoint
    if partitions is not None and partitions != manifest.partitions:
        raise OperationError(
            f"--partitions {partitions} differs from the checkpoint's "
            f"{manifest.partitions} partitions; pass --partitions {manifest.partitions}"
        )
    info = await js.stream_info(EVENTS_STREAM)
    if info.state.first_seq > 1:
        raise OperationError(
            f"{EVENTS_STREAM} starts at sequence {info.state.first_seq}: older "
            "messages have aged out (events_max_age_s), so the plant's state "
            "cannot be rebuilt from its beginning"
        )

    subject = f"{EVENTS_PREFIX}.{plant}.>"
    stored: list[tuple[int, str, bytes, dt.datetime]] = []
    async for message in iter_stream(
        js, EVENTS_STREAM, subject, through_seq=manifest.stream_seq
    ):
        stored.append(
            (
                message.metadata.sequence.stream,
                message.subject,
                message.data,
                message.metadata.timestamp,
            )
        )
    if not stored:
        # Nothing to rebuild, so stop before the checkpoint is rewritten. A mistyped
        # plant id is the usual cause, so the error lists the plants that have events.
        plants = await _plants_with_events(js)
        if plant in plants:
            fix = (
                "Its events come later in the stream, so let plantstream run process "
                "them before a replay"
            )
        else:
            listed = ", ".join(plants) or "none"
            fix = f"Plants with events: {listed}. Check the --plant value"
        raise OperationError(
            f"plant {plant} has no events in {EVENTS_STREAM} up to the checkpoint's "
            f"sequence {manifest.stream_seq}, so there is nothing to replay. {fix}"
        )
    if from_time is not None:
        later = [seq for seq, _, _, stored_at in stored if stored_at >= from_time]
        start = later[0] if later else manifest.stream_seq + 1
    else:
        assert from_seq is not None
        start = max(from_seq, 1)
    report = ReplayReport(plant, start, manifest.stream_seq, messages=len(stored))

    states = [
        PartitionState.restore(partition.state, state_settings, partition.orders)
        for partition in saved
    ]
    before = [state.counts.copy() for state in states]
    routers = (
        _Router(plant, manifest.partitions),
        _Router(plant, manifest.partitions),
    )
    for seq, message_subject, data, _ in stored:
        routers[seq >= start].add(seq, message_subject, data)
    # Like the postings, the dead letters count from the start of the replay on.
    report.dead_letters.update(routers[1].rejected)
    all_ids = routers[0].event_ids | routers[1].event_ids
    report.events_forgotten = len(all_ids)
    for state in states:
        state.forget_plant(plant, all_ids)

    existing = set(await posting_keys(js, plant))
    to_publish: list[tuple[str, bytes, str]] = []
    for phase, router in enumerate(routers):
        for partition, batch in sorted(router.take().items()):
            result = states[partition].apply_batch(batch)
            if phase == 1:
                for letter in result.dead_letters:
                    report.dead_letters[letter.reason] += 1
            for posting in result.postings:
                known = posting.key in existing
                if phase == 0:
                    report.before_start += 1
                    report.before_start_missing += not known
                    continue
                report.regenerated += 1
                if known:
                    report.already_posted += 1
                else:
                    existing.add(posting.key)
                    to_publish.append((posting.subject, posting.data, posting.key))
    report.new = len(to_publish)
    # Prerequisite keys name their plant second, as in "release:P1:4711".
    report.parked = sum(
        len(waiting)
        for state in states
        for key, waiting in state.parked.items()
        if key.split(":", 2)[1:2] == [plant]
    )

    # Postings first: a crash after this point leaves them published and the old
    # checkpoint in place, and a second replay finds them by key and sends nothing.
    if to_publish:
        await publish_all(nc, to_publish)
    # The counts describe the stream as the ingest first processed it; replaying the
    # same messages must not count them twice.
    for state, counts in zip(states, before, strict=True):
        state.counts = counts
    if db is not None:
        tables = _merge_snapshots(states)
        with SnapshotWriter(db) as writer:
            await asyncio.to_thread(writer.write, tables)
    store = await js.object_store(CHECKPOINT_BUCKET)
    chains = CheckpointChains(manifest, manifest.partitions)
    objects = []
    for index, state in enumerate(states):
        state_part, orders_part = state.checkpoint_parts(base=True)
        objects.append(
            await chains.store(store, index, state_part, orders_part, base=True)
        )
    rewritten = CheckpointManifest(
        manifest.stream_seq,
        manifest.partitions,
        dt.datetime.now(dt.UTC).timestamp(),
        manifest.ingest_counts,
        objects,
        manifest.site_seqs,
    )
    await chains.commit(store, rewritten)
    logger.info(
        "replayed plant %s through seq %d: regenerated=%d new=%d",
        plant,
        manifest.stream_seq,
        report.regenerated,
        report.new,
    )
    return report


# -- dead letters --------------------------------------------------------------------


class RetryRecord(msgspec.Struct, kw_only=True):
    """A dead letter sent back through the pipeline, kept in the DLQ stream."""

    letter_id: str
    dlq_seq: int
    subject: str
    stream_seq: int
    batch_index: int | None
    reason: str
    republished_seq: int
    retried_at: dt.datetime


class DismissRecord(msgspec.Struct, kw_only=True):
    """A dead letter an operator closed without a retry, with the reason given."""

    letter_id: str
    dlq_seq: int
    reason: str
    note: str
    dismissed_at: dt.datetime


@dataclass
class DeadLetterEntry:
    dlq_seq: int
    letter: DeadLetter
    retried: RetryRecord | None = None
    resolved: LetterResolved | None = None
    """The record of a later event under the letter's id that was applied."""
    dismissed: DismissRecord | None = None

    @property
    def letter_id(self) -> str:
        return letter_id(self.letter)

    @property
    def is_open(self) -> bool:
        """Whether the letter may still need a retry: neither retried, resolved nor
        dismissed."""
        return self.retried is None and self.resolved is None and self.dismissed is None


async def list_dead_letters(
    js: JetStreamContext,
    *,
    plant: str | None = None,
    reason: str | None = None,
) -> list[DeadLetterEntry]:
    """Return the dead letters in the DLQ stream, once per identity, oldest first,
    each with its retry and resolution records.

    A replay after a crash can publish the same dead letter again once the DLQ stream's
    duplicate window has passed, so entries with one identity are one dead letter.

    `plant` matches the plant a dead letter names, or else the plant token of its
    original subject, because a message too broken to name its plant is filed under
    plantstream.dlq._unknown.
    """
    if plant is not None:
        validate_token(plant, "plant")
    retried: dict[str, RetryRecord] = {}
    async for message in iter_stream(
        js, DLQ_STREAM, f"{DLQ_PREFIX}.*.{RETRIED_SUFFIX}"
    ):
        record = msgspec.json.decode(message.data, type=RetryRecord)
        retried[record.letter_id] = record
    resolved: dict[str, LetterResolved] = {}
    async for message in iter_stream(
        js, DLQ_STREAM, f"{DLQ_PREFIX}.*.{RESOLVED_SUFFIX}"
    ):
        resolution = msgspec.json.decode(message.data, type=LetterResolved)
        resolved.setdefault(resolution.letter_id, resolution)
    dismissed: dict[str, DismissRecord] = {}
    async for message in iter_stream(
        js, DLQ_STREAM, f"{DLQ_PREFIX}.*.{DISMISSED_SUFFIX}"
    ):
        dismissal = msgspec.json.decode(message.data, type=DismissRecord)
        dismissed.setdefault(dismissal.letter_id, dismissal)
    entries: dict[str, DeadLetterEntry] = {}
    async for message in iter_stream(js, DLQ_STREAM, f"{DLQ_PREFIX}.*"):
        letter = decode_dead_letter(message.data)
        if reason is not None and letter.reason != reason:
            continue
        if plant is not None and _letter_plant(letter) != plant:
            continue
        key = letter_id(letter)
        if key not in entries:
            entries[key] = DeadLetterEntry(
                message.metadata.sequence.stream,
                letter,
                retried.get(key),
                resolved.get(key),
                dismissed.get(key),
            )
    return list(entries.values())


def _letter_plant(letter: DeadLetter) -> str | None:
    if letter.plant is not None:
        return letter.plant
    prefix = f"{EVENTS_PREFIX}."
    if letter.subject.startswith(prefix):
        return letter.subject[len(prefix) :].split(".", 1)[0]
    return None


async def _original_bytes(js: JetStreamContext, letter: DeadLetter) -> bytes:
    """Return the rejected bytes, from PLANT_EVENTS if the letter left them out."""
    if not letter.data_omitted:
        return letter.data
    stored = await js.get_msg(EVENTS_STREAM, letter.stream_seq)
    if stored.data is None:
        raise ValueError(
            f"PLANT_EVENTS no longer has sequence {letter.stream_seq}, whose body "
            "the dead letter left out; it cannot be retried"
        )
    if letter.batch_index is None:
        return stored.data
    return bytes(decode_edge_batch(stored.data)[letter.batch_index])


async def _retry_payload(js: JetStreamContext, letter: DeadLetter) -> bytes:
    data = await _original_bytes(js, letter)
    # An event rejected from an edge batch is stored alone. The batch subject expects a
    # JSON array, so the event goes back as an array of one.
    if letter.batch_index is not None and is_edge_batch(letter.subject):
        return b"[" + data + b"]"
    return data


async def retry_dead_letters(
    js: JetStreamContext, entries: Iterable[DeadLetterEntry]
) -> list[RetryRecord]:
    """Republish each entry's bytes to its original subject and record the retry.

    Entries already retried or resolved are skipped, and so are `lost_at_site`
    letters, which hold no bytes to send. The republish carries a Nats-Msg-Id made of
    the dead letter's identity, so two retries within the events stream's duplicate
    window store one message.
    """
    records: list[RetryRecord] = []
    for entry in entries:
        if not entry.is_open or entry.letter.reason == "lost_at_site":
            continue
        letter = entry.letter
        ack = await js.publish(
            letter.subject,
            await _retry_payload(js, letter),
            headers={"Nats-Msg-Id": f"retry:{entry.letter_id}"},
        )
        record = RetryRecord(
            letter_id=entry.letter_id,
            dlq_seq=entry.dlq_seq,
            subject=letter.subject,
            stream_seq=letter.stream_seq,
            batch_index=letter.batch_index,
            reason=letter.reason,
            republished_seq=ack.seq,
            retried_at=dt.datetime.now(dt.UTC),
        )
        await js.publish(
            f"{dlq_subject(letter.plant)}.{RETRIED_SUFFIX}",
            msgspec.json.encode(record),
            headers={"Nats-Msg-Id": f"retried:{entry.letter_id}"},
        )
        entry.retried = record
        records.append(record)
        logger.info(
            "retried dead letter %s (dlq seq %d) as %s seq %d",
            entry.letter_id,
            entry.dlq_seq,
            letter.subject,
            ack.seq,
        )
    return records


async def dismiss_dead_letters(
    js: JetStreamContext, entries: Iterable[DeadLetterEntry], note: str
) -> list[DismissRecord]:
    """Record each open entry as dismissed with `note`; skip the others.

    For letters no retry can fix: a malformed message the plant sent again as a new
    event, a site's lost messages published again by the plant systems.
    """
    records: list[DismissRecord] = []
    for entry in entries:
        if not entry.is_open:
            continue
        record = DismissRecord(
            letter_id=entry.letter_id,
            dlq_seq=entry.dlq_seq,
            reason=entry.letter.reason,
            note=note,
            dismissed_at=dt.datetime.now(dt.UTC),
        )
        await js.publish(
            f"{dlq_subject(_letter_plant(entry.letter))}.{DISMISSED_SUFFIX}",
            msgspec.json.encode(record),
            headers={"Nats-Msg-Id": f"dismissed:{entry.letter_id}"},
        )
        entry.dismissed = record
        records.append(record)
        logger.info("dismissed dead letter %s: %s", entry.letter_id, note)
    return records


# -- the command line ----------------------------------------------------------------


def _parse_time(value: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"invalid ISO 8601 time {value!r}: {error}"
        ) from error
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"time {value!r} has no UTC offset; add one, such as {value}+00:00"
        )
    return parsed


async def _connect(url: str) -> NATS:
    from cluster.job import connect_nats

    return await connect_nats(url)


def _cmd_replay(args: argparse.Namespace) -> int:
    async def replay() -> ReplayReport:
        nc = await _connect(args.nats_url)
        try:
            return await replay_plant(
                nc,
                args.plant,
                from_seq=args.from_seq,
                from_time=args.from_time,
                partitions=args.partitions,
                db=args.db,
                state_settings=StateSettings.from_env(),
                pipeline_settings=PipelineSettings.from_env(),
            )
        finally:
            await nc.close()

    try:
        report = asyncio.run(replay())
    except OperationError as error:
        raise SystemExit(f"plantstream replay: {error}") from error
    print("\n".join(report.lines()))
    return 0


def _cmd_checkpoints_reset(args: argparse.Namespace) -> int:
    if not args.yes:
        raise SystemExit(
            "plantstream checkpoints reset: this deletes every partition's state, so "
            f"the next run processes {EVENTS_STREAM} again from sequence 1 (postings "
            "older than the postings stream's duplicate window are stored twice); "
            "add --yes to go ahead"
        )

    async def reset() -> tuple[bool, CheckpointManifest | None]:
        nc = await _connect(args.nats_url)
        try:
            return await reset_checkpoints(nc, PipelineSettings.from_env())
        finally:
            await nc.close()

    try:
        deleted, manifest = asyncio.run(reset())
    except OperationError as error:
        raise SystemExit(f"plantstream checkpoints reset: {error}") from error
    if not deleted:
        print(f"no object store bucket {CHECKPOINT_BUCKET}: nothing to reset")
        return 0
    covered = (
        "a checkpoint whose manifest could not be read"
        if manifest is None
        else f"the checkpoint at stream sequence {manifest.stream_seq}, "
        f"{manifest.partitions} partitions"
    )
    print(
        f"deleted the object store bucket {CHECKPOINT_BUCKET} ({covered}); the next "
        f"plantstream run processes {EVENTS_STREAM} from sequence 1"
    )
    return 0


MAX_COLUMN_WIDTH = 40
"""Maximum padded width of a `dlq list` column. Longer values are printed whole."""


def _format_entries(entries: list[DeadLetterEntry]) -> list[str]:
    headers = ("dlq_seq", "reason", "subject", "stream_seq", "batch_index", "event_id")
    rows = [
        (
            str(entry.dlq_seq),
            entry.letter.reason,
            entry.letter.subject,
            str(entry.letter.stream_seq),
            "" if entry.letter.batch_index is None else str(entry.letter.batch_index),
            entry.letter.event_id or "",
        )
        for entry in entries
    ]
    # A column is as wide as its longest value up to MAX_COLUMN_WIDTH, so one very
    # long subject or id does not push every other row apart.
    widths = [
        min(max(len(row[i]) for row in [headers, *rows]), MAX_COLUMN_WIDTH)
        for i in range(len(headers))
    ]
    header = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    lines = [header.rstrip()]
    for entry, row in zip(entries, rows, strict=True):
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
        lines.append(line.rstrip())
        status = _status(entry)
        # The whole detail, wrapped: its last sentence is usually the fix.
        lines += textwrap.wrap(
            f"{status}{entry.letter.detail}",
            width=DETAIL_WIDTH,
            initial_indent="    ",
            subsequent_indent="    ",
        )
    return lines


def _status(entry: DeadLetterEntry) -> str:
    """Return what happened to `entry` since, as the start of its detail line."""
    parts = []
    if entry.retried is not None:
        parts.append(f"retried as seq {entry.retried.republished_seq}; ")
    if entry.dismissed is not None:
        parts.append(f"dismissed: {entry.dismissed.note}; ")
    if entry.resolved is not None:
        index = entry.resolved.batch_index
        at = "" if index is None else f" index {index}"
        parts.append(
            f"resolved: event {entry.resolved.event_id} applied at seq "
            f"{entry.resolved.stream_seq}{at}; "
        )
    return "".join(parts)


def _cmd_dlq_list(args: argparse.Namespace) -> int:
    async def read() -> list[DeadLetterEntry]:
        nc = await _connect(args.nats_url)
        try:
            return await list_dead_letters(
                nc.jetstream(), plant=args.plant, reason=args.reason
            )
        finally:
            await nc.close()

    entries = asyncio.run(read())
    if args.open:
        entries = [entry for entry in entries if entry.is_open]
    shown = entries[: args.limit] if args.limit else entries
    if not shown:
        print("no dead letters match")
        return 0
    print("\n".join(_format_entries(shown)))
    if len(shown) < len(entries):
        print(f"showing {len(shown)} of {len(entries)}; raise --limit to see more")
    return 0


def _missing_letters_message(missing: set[int], plant: str | None) -> str:
    """Return the error for --seq values that match no dead letter."""
    sequences = ", ".join(map(str, sorted(missing)))
    if plant is None:
        return (
            f"no dead letter for {EVENTS_STREAM} sequence {sequences}; "
            "plantstream dlq list shows the sequences"
        )
    # The sequence may have a dead letter of another plant, which --plant hides.
    return (
        f"no dead letter of plant {plant} for {EVENTS_STREAM} sequence {sequences}; "
        f"plantstream dlq list --plant {plant} shows that plant's sequences, and "
        "without --plant it shows those of every plant"
    )


def _letters_at(
    entries: list[DeadLetterEntry], sequences: list[int], plant: str | None
) -> list[DeadLetterEntry]:
    """Return the entries at the PLANT_EVENTS `sequences`; raise ValueError naming
    the sequences that have none."""
    chosen = set(sequences)
    found = [entry for entry in entries if entry.letter.stream_seq in chosen]
    missing = chosen - {entry.letter.stream_seq for entry in found}
    if missing:
        raise ValueError(_missing_letters_message(missing, plant))
    return found


def _cmd_dlq_retry(args: argparse.Namespace) -> int:
    async def retry() -> tuple[list[DeadLetterEntry], list[RetryRecord]]:
        nc = await _connect(args.nats_url)
        try:
            js = nc.jetstream()
            entries = await list_dead_letters(js, plant=args.plant, reason=args.reason)
            if args.seq:
                entries = _letters_at(entries, args.seq, args.plant)
            if args.all:
                chosen = [e for e in entries if e.letter.reason not in REJECTED_AGAIN]
            else:
                chosen = entries
            return entries, await retry_dead_letters(js, chosen)
        finally:
            await nc.close()

    entries, records = asyncio.run(retry())
    lost = sum(entry.letter.reason == "lost_at_site" for entry in entries)
    futile = [e for e in entries if e.is_open and e.letter.reason in REJECTED_AGAIN]
    # Counted before the retry marked the entries it sent.
    just_sent = {record.letter_id for record in records}
    retried = sum(
        e.retried is not None and e.letter_id not in just_sent for e in entries
    )
    resolved = sum(e.resolved is not None and e.retried is None for e in entries)
    dismissed = sum(
        e.dismissed is not None and e.retried is None and e.resolved is None
        for e in entries
    )
    for record in records:
        print(
            f"retried {record.letter_id} (dlq seq {record.dlq_seq}) as "
            f"{record.subject} seq {record.republished_seq}"
        )
    print(
        f"retried {len(records)} dead letters; skipped {retried} retried before, "
        f"{resolved} resolved by a later event under their id and {dismissed} "
        "dismissed"
        if entries
        else "no dead letters match"
    )
    if lost:
        print(
            f"not retried: {lost} lost_at_site dead letters, whose messages a site "
            "dropped before the hub copied them, so no bytes are left to send; have "
            "the plant systems publish those events again"
        )
    if futile and args.all:
        print(
            f"not retried: {len(futile)} malformed, invalid or reused_id dead "
            "letters, whose bytes would be rejected again. Have the plant send the "
            "corrected event (under the same event id, or a new one for reused_id), "
            "then dismiss the letters it does not resolve with `plantstream dlq "
            "dismiss`. --seq or --reason sends them anyway, as after an upgrade "
            "that accepts them"
        )
    return 0


def _cmd_dlq_dismiss(args: argparse.Namespace) -> int:
    async def dismiss() -> tuple[list[DeadLetterEntry], list[DismissRecord]]:
        nc = await _connect(args.nats_url)
        try:
            js = nc.jetstream()
            entries = await list_dead_letters(js, plant=args.plant)
            entries = _letters_at(entries, args.seq, args.plant)
            return entries, await dismiss_dead_letters(js, entries, args.note)
        finally:
            await nc.close()

    if not args.note.strip():
        raise ValueError(
            "--note is empty; give the reason the letters need no retry, which dlq "
            "list shows next to them"
        )
    entries, records = asyncio.run(dismiss())
    for record in records:
        print(f"dismissed {record.letter_id} (dlq seq {record.dlq_seq})")
    print(
        f"dismissed {len(records)} dead letters; skipped {len(entries) - len(records)} "
        "retried, resolved or dismissed before"
    )
    return 0


REASONS = list(typing.get_args(DeadLetterReason))

REJECTED_AGAIN = ("malformed", "invalid", "reused_id")
"""Reasons whose unchanged bytes are rejected again: broken JSON stays broken, an
event that breaks the contract or its order's BOM still does, and the first payload
keeps its event id. `dlq retry --all` leaves these out."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the replay, checkpoints and dlq subcommands on the `plantstream`
    parser."""
    replay = commands.add_parser(
        "replay",
        help="rebuild one plant's state from the stream and repost missing postings",
        description="Stop plantstream run first. Drops the plant's state from the last "
        "checkpoint, applies the plant's events again from stream sequence 1 to the "
        "checkpoint's sequence, and publishes the postings of events from the start "
        "point whose idempotency key ERP_POSTINGS does not hold yet. For an unchanged "
        "input it publishes nothing. The rebuilt state replaces the checkpoint.",
    )
    replay.add_argument("--nats-url", required=True, help="NATS server of the pipeline")
    replay.add_argument("--plant", required=True, help="plant id to replay")
    start = replay.add_mutually_exclusive_group(required=True)
    start.add_argument(
        "--from-seq",
        type=int,
        help="PLANT_EVENTS stream sequence from which postings are published",
    )
    start.add_argument(
        "--from-time",
        type=_parse_time,
        help="ISO 8601 time with a UTC offset; postings are published from the first "
        "message the stream stored at or after it",
    )
    replay.add_argument(
        "--db", type=Path, help="DuckDB file to upsert the rebuilt snapshot rows into"
    )
    replay.add_argument(
        "--partitions",
        type=positive_int,
        help="partition count of the checkpoint (default: the checkpoint's own)",
    )
    replay.set_defaults(handler=_cmd_replay)

    checkpoints = commands.add_parser(
        "checkpoints", help="manage the checkpoints in plantstream-checkpoints"
    )
    checkpoint_actions = checkpoints.add_subparsers(
        dest="checkpoints_command", required=True
    )
    reset = checkpoint_actions.add_parser(
        "reset",
        help="delete every partition's state, so the next run starts from sequence 1",
        description="Stop plantstream run first. Deletes the object store bucket "
        f"{CHECKPOINT_BUCKET}: the fix for a damaged checkpoint. A run with another "
        "partition count needs no reset, because it splits the checkpoint at start. "
        "The next run applies every event still in PLANT_EVENTS "
        "again; postings stored within the postings stream's duplicate window (24 h by "
        "default) are not stored twice.",
    )
    reset.add_argument("--nats-url", required=True, help="NATS server of the pipeline")
    reset.add_argument(
        "--yes", action="store_true", help="confirm the deletion (required)"
    )
    reset.set_defaults(handler=_cmd_checkpoints_reset)

    dlq = commands.add_parser(
        "dlq",
        help="list dead letters, send them back through the pipeline, or dismiss them",
    )
    actions = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = actions.add_parser(
        "list",
        help="show dead letters with reason, subject, sequence and detail",
        description="Lists each dead letter once, oldest first. Retried ones say so, "
        "and so do resolved ones: a later event under the letter's event id was "
        "applied, such as the corrected event a plant sent again.",
    )
    listing.add_argument("--nats-url", required=True, help="NATS server to read from")
    listing.add_argument("--plant", help="only dead letters of this plant")
    listing.add_argument(
        "--reason", choices=REASONS, help="only dead letters with this reason"
    )
    listing.add_argument(
        "--limit",
        type=non_negative_int,
        default=50,
        help="rows to show, 0 for all (default: 50)",
    )
    listing.add_argument(
        "--open",
        action="store_true",
        help="only dead letters neither retried nor resolved",
    )
    listing.set_defaults(handler=_cmd_dlq_list)

    retry = actions.add_parser(
        "retry",
        help="republish dead letters to their original subject after fixing the cause",
        description="Sends each chosen dead letter's original bytes to its original "
        "subject, where the running ingest processes them again, and records the retry "
        "in PLANTSTREAM_DLQ. A dead letter retried before, or resolved by a later "
        "event under its event id, is skipped. An event "
        "rejected from an edge batch goes back as a batch of one.",
    )
    retry.add_argument("--nats-url", required=True, help="NATS server to use")
    chosen = retry.add_mutually_exclusive_group(required=True)
    chosen.add_argument(
        "--seq",
        type=positive_int,
        nargs="+",
        help="PLANT_EVENTS stream sequences of the rejected messages",
    )
    chosen.add_argument(
        "--reason", choices=REASONS, help="every dead letter with this reason"
    )
    chosen.add_argument(
        "--all",
        action="store_true",
        help="every dead letter but malformed, invalid and reused_id ones, whose "
        "bytes would be rejected again",
    )
    retry.add_argument("--plant", help="only dead letters of this plant")
    retry.set_defaults(handler=_cmd_dlq_retry)

    dismiss = actions.add_parser(
        "dismiss",
        help="close dead letters that need no retry, with a note of the reason",
        description="Records each chosen dead letter as dismissed in PLANTSTREAM_DLQ, "
        "beside the retry records. dlq list shows the note, and dlq list --open and "
        "dlq retry leave the letter out. Use it once a letter's cause is handled "
        "outside plantstream, such as a malformed message the plant sent again as a "
        "new event. The snapshot file does not record it.",
    )
    dismiss.add_argument("--nats-url", required=True, help="NATS server to use")
    dismiss.add_argument(
        "--seq",
        type=positive_int,
        nargs="+",
        required=True,
        help="PLANT_EVENTS stream sequences of the rejected messages",
    )
    dismiss.add_argument("--plant", help="only dead letters of this plant")
    dismiss.add_argument("--note", required=True, help="why the letters need no retry")
    dismiss.set_defaults(handler=_cmd_dlq_dismiss)
