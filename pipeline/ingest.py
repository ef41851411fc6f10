"""The ingest loop: plant events from JetStream through the partition actors and back.

How an event becomes state, a posting and an acknowledgement:

1. Fetch a batch from the durable pull consumer on PLANT_EVENTS.
2. Decode only the key fields of each message (msgspec, `contracts.keys`). A message
   that has no valid key becomes a dead letter here; the rest are grouped by partition,
   a stable hash of (plant, order or machine).
3. Send each partition its share of the batch in one Ray call; all partitions run at
   once.
4. Publish the postings they return to ERP_POSTINGS with the idempotency key as
   Nats-Msg-Id, and the dead letters to PLANTSTREAM_DLQ, and wait for JetStream's acks.
5. At a checkpoint (every `checkpoint_interval_s`, or `max_unacked` messages): collect
   every partition's state and changed snapshot rows, write the rows to DuckDB, store
   each state in the checkpoint object store, then store the manifest with the last
   stream sequence it covers. The manifest is the commit point.
6. Acknowledge every source message up to that sequence.

A crash between any two steps loses nothing: nothing is acknowledged before the state
that it changed is in a checkpoint, and on start-up the consumer is re-created from the
manifest's sequence, so every later message is applied again to the checkpointed state.
Repeats are harmless: postings carry deterministic keys, which the postings stream
deduplicates, snapshot rows are upserts, and events already in a partition's state are
dropped as duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import secrets
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import nats.errors
import ray
import ray.exceptions
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.object_store import ObjectStore

from actors.partition import PartitionCheckpoint
from actors.partition_state import BatchResult, CheckpointFormatError, SourceMessage
from contracts.codec import (
    decode_edge_batch,
    describe_decode_error,
    encode,
    lone_surrogate_detail,
)
from contracts.dead_letters import (
    DeadLetter,
    DeadLetterReason,
    letter_id,
    shorten_letter,
)
from contracts.events import EVENT_TYPES
from contracts.keys import (
    EventKey,
    check_no_nul,
    decode_key,
    is_plant_wide,
    partition_of,
    routing_key,
)
from contracts.snapshots import table_from_rows
from pipeline.checkpoints import (
    MANIFEST,
    CheckpointChains,
    CheckpointManifest,
    CheckpointMismatchError,
    object_names,
    read_manifest,
    read_partitions,
)
from pipeline.fetch import PullFetcher, pending_after, stream_sequence
from pipeline.publish import Publisher, PublishError
from pipeline.settings import PipelineSettings
from pipeline.sink import SinkError, SnapshotBehindError, SnapshotWriter, merge_tables
from pipeline.site_streams import SiteSequences, source_position
from pipeline.streams import (
    CHECKPOINT_BUCKET,
    consumer_config,
    consumer_rejected_error,
    ensure_streams,
)
from pipeline.subjects import (
    EDGE_BATCH_TYPE_TOKEN,
    EVENTS_STREAM,
    dlq_resolved_subject,
    dlq_subject,
    event_subject,
    validate_token,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST",
    "CheckpointManifest",
    "CheckpointMismatchError",
    "Ingest",
    "IngestReport",
    "KeyChecker",
    "RecoveriesExhaustedError",
    "StartStoppedError",
    "check_event_subject",
    "is_edge_batch",
    "key_rejection_reason",
]

RECOVERABLE: tuple[type[BaseException], ...] = (
    ray.exceptions.RayError,
    nats.errors.Error,
    PublishError,
    SinkError,
    ConnectionError,
    asyncio.TimeoutError,
)
"""Failures the ingest survives by resuming from its last checkpoint."""

EDGE_BATCH_SUFFIX = f".{EDGE_BATCH_TYPE_TOKEN}"
"""Subjects plant.events.<plant>.batch carry edge batches: a JSON array of events."""


def is_edge_batch(subject: str) -> bool:
    """Return whether `subject` is plant.events.<plant>.batch, an edge batch subject.

    A longer subject that ends in .batch is a single event's subject with a wrong type
    token, which the subject check rejects.
    """
    return subject.endswith(EDGE_BATCH_SUFFIX) and subject.count(".") == 3


class KeyChecker:
    """Run every check the ingest makes on an event before it routes it, beyond
    decoding its key: no NUL in any string, a valid plant token and a subject that
    names the event's plant and type.

    Replay routes with the same checks, so an event the ingest dead-lettered never
    reaches a replayed partition.
    """

    def __init__(self) -> None:
        self._subjects: dict[str, tuple[str, str | None]] = {}
        """(plant, event type) each subject was checked for, so that each event of a
        busy subject skips the token and subject checks. The event type is None for
        an edge batch subject, whose type token is not checked."""

    def check(self, subject: str, data: bytes, key: EventKey, index: int) -> None:
        """Raise ValueError if the event `data` with the decoded `key` must not be
        routed. `index` is its position in an edge batch, or -1. An event nested too
        deeply to search for NUL characters raises msgspec.DecodeError."""
        check_no_nul(data)
        # Before the subject check, whose advice would name a subject of a type that
        # does not exist, such as the very subject the event came on.
        if key.event_type not in _EVENT_TYPE_SET:
            raise ValueError(
                f"event_type {key.event_type!r} is not an event type; use one of "
                f"{', '.join(EVENT_TYPES)}"
            )
        # Events of an edge batch (index >= 0) carry many types on one subject.
        checked = (key.plant, key.event_type if index < 0 else None)
        if self._subjects.get(subject) != checked:
            validate_token(key.plant, "plant")
            check_event_subject(subject, key.plant, checked[1])
            if len(self._subjects) >= SUBJECT_CACHE_SIZE:
                self._subjects.clear()
            self._subjects[subject] = checked


_EVENT_TYPE_SET = frozenset(EVENT_TYPES)


def key_rejection_reason(error: ValueError) -> DeadLetterReason:
    """Return the dead-letter reason for an error of `decode_key` or
    `KeyChecker.check`: malformed for unreadable JSON, invalid for the rest."""
    if isinstance(error, msgspec.DecodeError) and not isinstance(
        error, msgspec.ValidationError
    ):
        return "malformed"
    return "invalid"


MIN_MAX_PAYLOAD = 128 * 1024
"""The smallest max_payload the ingest runs with: nats-py stores checkpoint objects in
chunks of 128 KiB."""

IDLE_TICK_S = 5.0
"""Seconds without a batch after which an idle service sends the partitions an empty
one. They expire parked events only when a batch arrives."""

MAX_BATCHES_IN_FLIGHT = 2
"""Batches sent to the actors but not yet collected; two keep actors and driver busy."""

DISPATCH_MAX_BYTES = 1 << 20
"""Bytes of message data sent to the actors in one call. A fetch of edge batches
contains a hundred times as many events as one of single events. Split into parts of
this size, the driver routes one part while the actors apply the one before."""

COMMIT_DEFER_S = 0.4
"""Seconds a checkpoint's commit waits, once the partitions have handed over their
state, before it writes DuckDB and the object store. The partitions apply nothing
while they serialise, so events queue up behind the checkpoint. The commit's CPU work
waits until the ingest has worked through them. At half the maximum rate on the
2-core benchmark machine, the p99 from publish to posting stored was 150 ms (108 to
173) with the wait and 185 ms (144 to 208) without, medians of five runs each. Once
batches were completed while the fetch waits (`_next_fetch`), it was 136 ms against
150 ms, medians of four. In an earlier comparison waits of 0.25 s and 0.7 s gave 160
and 165 ms, against 120 ms for 0.4 s (medians of three). The wait is at most a
quarter of checkpoint_interval_s. It ends at once when the ingest loop itself waits
for the commit, and is skipped while the ingest is more than a fetch behind the
stream, which would keep it busy for the whole wait."""

PUBLISH_STALL_S = 10.0
"""How long a posting may wait for JetStream's ack, or for room among the publishes
in flight, before the ingest treats NATS as failed and recovers."""

PUBLISH_WINDOW = 16_384
"""Postings and dead letters in flight before the next publish waits for acks. Larger
than one fetch's postings, so a checkpoint is the only point that waits for acks."""

_batch_encoder = msgspec.msgpack.Encoder()
_result_decoder = msgspec.msgpack.Decoder(BatchResult)

RECOVERY_FIRST_DELAY_S = 0.5
"""Wait before the second recovery attempt; it doubles up to RECOVERY_MAX_DELAY_S."""

RECOVERY_MAX_DELAY_S = 10.0

RECONNECT_POLL_S = 0.1
"""Seconds between two looks at a reconnecting NATS client's state."""

MAX_RECOVERIES_WITHOUT_PROGRESS = 8
"""Recoveries in a row with no checkpoint committed before the ingest gives up; with the
backoff above that is about 45 s of retrying, longer than a nats-server restart."""

SUBJECT_CACHE_SIZE = 65_536
"""Subjects whose plant and event type check is remembered; the cache starts over when
full."""

DEAD_LETTER_HEADROOM = 4096
"""Bytes kept free below max_payload for a dead letter's headers."""

DEAD_LETTER_LOG_FIRST = 5
"""Dead letters per reason logged at WARNING; after that, every 1000th."""


class RecoveriesExhaustedError(RuntimeError):
    """An error for an ingest that failed again after MAX_RECOVERIES_WITHOUT_PROGRESS
    recoveries without a committed checkpoint, so it stopped retrying. The last failure
    is its cause."""


class StartStoppedError(RuntimeError):
    """The run was asked to stop while the ingest start waited to be retried."""


@dataclass
class _InFlight:
    """A batch whose shares are with the actors."""

    messages: list[Msg]
    dead: list[DeadLetter]
    results: asyncio.Future[list[bytes]]
    empty_edge_batches: int = 0


@dataclass
class _Barrier:
    """A checkpoint sent to the actors behind the batches before it.

    Each actor runs its calls in the order sent, so the state it returns covers exactly
    the batches queued before the barrier. Once those are collected, the barrier's
    commit can start.
    """

    results: asyncio.Future[list[PartitionCheckpoint]]
    bases: list[bool]
    covered_seq: int
    site_seqs: dict[str, int]
    """The highest sequence of each site stream among the messages covered."""


@dataclass
class IngestReport:
    """Counts of this process: events, duplicates, dead letters, postings, recoveries.

    After a recovery the replayed events count again here; `Ingest.totals()` gives the
    exact totals, from the checkpointed counts of every partition.
    """

    counts: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    checkpoints: int = 0
    recoveries: int = 0
    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    """Wall time in seconds per step: fetch, route, apply, publish, snapshot, ack."""
    started: float = field(default_factory=time.monotonic)
    committed_seq: int = 0
    """The stream sequence the last committed checkpoint covers, restored or new."""
    stop_error: str | None = None
    """Why the run may have lost a partition's state at its end: the checkpoint on
    stop failed, or a partition was restarted empty. `Ingest.totals()` then leaves
    out its counts, and the next start processes the messages after
    `committed_seq` again."""

    @property
    def dead_letters(self) -> dict[str, int]:
        return {
            k.split(":", 1)[1]: v
            for k, v in self.counts.items()
            if k.startswith("dead_letter:")
        }

    @property
    def postings(self) -> dict[str, int]:
        return {
            k.split(":", 1)[1]: v
            for k, v in self.counts.items()
            if k.startswith("posting:")
        }


def _dead_letter_row(letter: DeadLetter) -> dict[str, object]:
    return {
        "reason": letter.reason,
        "detail": letter.detail,
        "subject": letter.subject,
        "stream_seq": letter.stream_seq,
        "event_id": letter.event_id,
        # A message too broken to name its plant, or a site's lost messages, still
        # belongs to the plant of its subject, as in the DLQ subject.
        "plant": letter.plant or _subject_plant(letter.subject),
        "order_id": letter.order,
        "rejected_at": letter.rejected_at,
        # A key column cannot be null: -1 marks a message that carried one event.
        "batch_index": -1 if letter.batch_index is None else letter.batch_index,
        "data": letter.data,
    }


class Ingest:
    """Drive the partition actors from the plant events stream.

    `writer` is the DuckDB snapshot sink, or None to skip snapshots (some benchmarks).
    """

    def __init__(
        self,
        nc: NATS,
        actors: Sequence[ray.actor.ActorHandle],
        writer: SnapshotWriter | None,
        settings: PipelineSettings | None = None,
        *,
        commit_guard: Callable[[], Awaitable[None]] | None = None,
        on_restore: Callable[[], None] | None = None,
    ) -> None:
        self.nc = nc
        self.commit_guard = commit_guard
        """Awaited just before each checkpoint's commit point. It raises to stop the
        commit, as the ingest lease does once another run has taken it."""
        self.on_restore = on_restore
        """Called at each start and recovery, before the committed checkpoint is read,
        as the ingest lease needs to know that the state is the committed one."""
        self.js: JetStreamContext = nc.jetstream()
        self.actors = list(actors)
        self.writer = writer
        self.settings = settings or PipelineSettings()
        self.report = IngestReport()
        self._store: ObjectStore | None = None
        self._chains = CheckpointChains(None, len(self.actors))
        self._restore_token: str | None = None
        """The token of the last restore, which every apply and checkpoint call
        carries (see PartitionActor)."""
        self._fetcher: PullFetcher | None = None
        self._keys = KeyChecker()
        self._unacked: list[Msg] = []
        self._max_seq = 0
        self._dead_rows: list[dict[str, object]] = []
        self._ingest_counts: Counter[str] = Counter()
        self._site_seqs = SiteSequences()
        self._last_manifest: tuple[int, float] | None = None
        """(stream_seq, written_at) of the manifest this process restored or committed
        last; None before the first checkpoint."""
        self._commit_task: asyncio.Task[None] | None = None
        self._commit_hurried = False
        """Set when the commit in flight should skip or end its COMMIT_DEFER_S wait."""
        self._commit_deferral: asyncio.Future[None] | None = None
        self._recoveries_without_progress = 0
        self._dead_logged: Counter[str] = Counter()
        self._fetch_task: asyncio.Task[list[Msg]] | None = None
        self._in_flight: deque[_InFlight | _Barrier] = deque()
        self._publisher = Publisher(
            nc, window=PUBLISH_WINDOW, ack_timeout_s=PUBLISH_STALL_S
        )
        self._last_checkpoint = time.monotonic()
        self._last_sent = time.monotonic()
        """When a batch last went to the actors (time.monotonic())."""

    # -- start-up and recovery ---------------------------------------------------------

    async def start(self) -> int:
        """Create streams, restore every partition, and position the consumer.

        Return the stream sequence of the checkpoint restored from (0 for none).
        """
        if self.nc.max_payload < MIN_MAX_PAYLOAD:
            # Checkpoints go to the object store in chunks of this size, which would
            # fail only at the first checkpoint, and then on every retry.
            raise ValueError(
                f"the NATS server takes at most {self.nc.max_payload:,} bytes per "
                f"message (max_payload), and plantstream needs {MIN_MAX_PAYLOAD:,} "
                "for its checkpoints; raise max_payload in the server's config (the "
                "default is 1 MB)"
            )
        await ensure_streams(self.js, self.settings)
        await self._publisher.start()
        self._store = await self.js.object_store(CHECKPOINT_BUCKET)
        if self.on_restore is not None:
            self.on_restore()
        resumed = await self._restore_partitions()
        # Logged here, not in the actors: Ray merges similar lines from several actors
        # into one, which would hide all but one process id.
        pids: list[int] = await asyncio.gather(
            *(actor.pid.remote() for actor in self.actors)
        )
        logger.info(
            "partition processes: %s",
            ", ".join(f"{index}={pid}" for index, pid in enumerate(pids)),
        )
        if self.writer is not None and resumed > 0:
            # The file is written before each checkpoint commits, so it covers at
            # least the checkpoint unless it is another file than the runs before
            # wrote: a new one, or an older copy.
            through_seq = await asyncio.to_thread(self.writer.through_seq)
            if through_seq is not None and through_seq < resumed:
                raise SnapshotBehindError(self.writer.path, through_seq, resumed)
        await self._recreate_consumer(resumed + 1)
        self._max_seq = resumed
        logger.info(
            "ingest started: partitions=%d resume_after_seq=%d consumer=%s",
            len(self.actors),
            resumed,
            self.settings.consumer,
        )
        return resumed

    async def _restore_partitions(self) -> int:
        assert self._store is not None
        manifest = await read_manifest(self._store)
        self._chains = CheckpointChains(manifest, len(self.actors))
        # A new token per restore: an actor that Ray restarts afterwards lacks it and
        # rejects the next call, instead of applying it to an empty state.
        token = self._restore_token = secrets.token_hex(8)
        self._last_manifest = (
            None if manifest is None else (manifest.stream_seq, manifest.written_at)
        )
        if manifest is None:
            self._ingest_counts = Counter()
            self._site_seqs = SiteSequences()
            await asyncio.gather(
                *(actor.restore.remote(None, (), token) for actor in self.actors)
            )
            return 0
        self._ingest_counts = Counter(manifest.ingest_counts)
        self._site_seqs = SiteSequences(manifest.site_seqs)
        saved = await read_partitions(self._store, manifest)
        partitions = len(self.actors)
        if manifest.partitions == partitions:
            calls = [
                actor.restore.remote(partition.state, partition.orders, token)
                for actor, partition in zip(self.actors, saved, strict=True)
            ]
        else:
            logger.info(
                "splitting the checkpoint's %d partitions among %d; the first "
                "checkpoint of this run stores them in the new layout",
                manifest.partitions,
                partitions,
            )
            # One copy in Ray's object store, which every actor reads its share from.
            shared = ray.put(
                [(partition.state, partition.orders) for partition in saved]
            )
            calls = [
                actor.restore_share.remote(
                    shared, partitions, manifest.stream_seq, token
                )
                for actor in self.actors
            ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for index, outcome in enumerate(outcomes):
            # Retrying cannot help with a damaged checkpoint or one of another
            # format, so this one is not among the RECOVERABLE errors.
            if isinstance(outcome, ray.exceptions.RayTaskError) and isinstance(
                outcome.cause, CheckpointFormatError
            ):
                stored = outcome.cause.partition
                if stored is None:
                    stored = index
                names = object_names(manifest, stored)
                part = outcome.cause.part
                if part is not None and part < len(names):
                    place = f"object {names[part]}"
                else:
                    place = f"objects {', '.join(names)}"
                raise CheckpointMismatchError(
                    f"partition {stored}, {place}: {outcome.cause}"
                ) from outcome
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        logger.info("restored %d partitions from checkpoint at seq %d",
                    len(self.actors), manifest.stream_seq)  # fmt: skip
        self.report.committed_seq = manifest.stream_seq
        return manifest.stream_seq

    async def _recreate_consumer(self, start_seq: int) -> None:
        # Re-creating the durable consumer at the checkpoint's sequence redelivers every
        # message the checkpoint does not cover at once, instead of after ack_wait.
        try:
            await self.js.delete_consumer(EVENTS_STREAM, self.settings.consumer)
        except NotFoundError:
            pass
        config: ConsumerConfig = consumer_config(self.settings)
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = max(start_seq, 1)
        try:
            await self.js.add_consumer(EVENTS_STREAM, config)
        except BadRequestError as error:
            # Not among RECOVERABLE, because the same configuration fails again.
            raise consumer_rejected_error(self.settings, config, error) from error
        if self._fetcher is not None:
            # What the old consumer delivered is delivered again by the new one.
            await self._fetcher.close()
        self._fetcher = PullFetcher(self.nc, EVENTS_STREAM, self.settings.consumer)
        await self._fetcher.start()

    # -- the loop ---------------------------------------------------------------------

    async def run(
        self, *, until_drained: bool = True, stop: asyncio.Event | None = None
    ) -> IngestReport:
        """Process batches until the stream is drained (or `stop` is set).

        A failure of an actor, of NATS or of the DuckDB file does not end the loop: the
        ingest recovers from the last checkpoint and replays what it did not cover.
        """
        assert self._fetcher is not None, "call start() first"
        while stop is None or not stop.is_set():
            try:
                drained = await self._step(until_drained)
            except RECOVERABLE as error:
                try:
                    await self._recover(error, stop)
                except StartStoppedError:
                    # The recovery dropped everything after the last checkpoint, so
                    # there is nothing left to commit.
                    self.report.stop_error = (
                        "stopped while recovering from "
                        f"{brief_error(error)}, before NATS and the partitions were "
                        "back"
                    )
                    logger.warning(
                        "%s. Nothing is lost: the next start restores the checkpoint "
                        "through stream sequence %d and processes the messages after "
                        "it again",
                        self.report.stop_error,
                        self.report.committed_seq,
                    )
                    return self.report
                continue
            if drained:
                break
        self._stop_fetching()
        try:
            if self._unacked or self._dead_rows or self._in_flight:
                # Stopped by `stop`: commit what was processed, so that the next start
                # does not process it again.
                await self.checkpoint()
            await self._complete_in_flight(0)
            await self._finish_commit()
        except RECOVERABLE as error:
            self.report.stop_error = (
                f"the checkpoint on stop failed: {brief_error(error)}"
            )
            logger.warning(
                "%s. Nothing is lost: the next start "
                "restores the checkpoint through stream sequence %d and processes the "
                "messages after it again",
                self.report.stop_error,
                self.report.committed_seq,
            )
        return self.report

    async def _step(self, until_drained: bool) -> bool:
        """Take one fetched batch through the pipeline; return True once drained.

        The stages overlap: the next fetch runs while this batch is routed, and the
        actors apply a batch while the driver routes the next one. A checkpoint goes to
        the actors behind the batches in flight, so the state it takes matches the
        messages it acknowledges.
        """
        if self._commit_task is not None and self._commit_task.done():
            # A failed commit is raised here, for the loop to recover from, and not
            # only at the next checkpoint, which an idle stream may not reach for long.
            await self._finish_commit()
        messages = await self._next_fetch()
        if messages and pending_after(messages[-1]) > self.settings.fetch_batch:
            # More than another full fetch waits on the server, so the ingest is
            # behind the stream and deferring the commit would only delay it.
            self._hurry_commit()
        if messages:
            await self.process(messages)
        else:
            await self._complete_in_flight(0)
            if not until_drained and time.monotonic() - self._last_sent >= IDLE_TICK_S:
                # The actors expire parked events only when a batch reaches them,
                # and a quiet stream brings none.
                self._in_flight.append(self._dispatch([], every_partition=True))
                await self._complete_in_flight(0)
        # An empty fetch brings the checkpoint forward only when draining. Under
        # steady load fetches also come back empty between bursts, and a checkpoint
        # at each of them (three or four a second) took the cores from the events.
        # At half the maximum rate on the 2-core benchmark machine, the p99 from
        # publish to posting stored was 268-473 ms with them and 203-213 ms without.
        if self._checkpoint_due(idle=not messages and until_drained):
            await self.checkpoint()
        if messages or not until_drained:
            return False
        return await self._drained()

    async def _next_fetch(self) -> list[Msg]:
        """Return the batch fetched in the background, and start fetching the next.

        While the fetch waits for messages, batches the actors have finished are
        completed, so that a quiet stream does not hold their postings back until
        the next message arrives or the fetch times out.
        """
        task = self._fetch_task or asyncio.create_task(self._fetch())
        # Kept until the fetch returns, so that a recovery meanwhile cancels it.
        self._fetch_task = task
        while not task.done() and self._in_flight:
            oldest = self._in_flight[0]
            if isinstance(oldest, _InFlight) and not oldest.results.done():
                started = time.perf_counter()
                await asyncio.wait(
                    (task, oldest.results), return_when=asyncio.FIRST_COMPLETED
                )
                self.report.seconds["fetch"] += time.perf_counter() - started
                if not oldest.results.done():
                    break
            await self._complete_oldest()
        started = time.perf_counter()
        messages = await task
        self.report.seconds["fetch"] += time.perf_counter() - started
        self._fetch_task = None
        if messages:
            self._fetch_task = asyncio.create_task(self._fetch())
        return messages

    async def _fetch(self) -> list[Msg]:
        assert self._fetcher is not None
        return await self._fetcher.fetch(
            self.settings.fetch_batch, self.settings.fetch_timeout_s
        )

    def _stop_fetching(self) -> None:
        # A batch fetched but never processed is not acknowledged; the next start
        # re-creates the consumer at the checkpoint, which delivers it again.
        if self._fetch_task is not None:
            self._fetch_task.cancel()
            self._fetch_task = None

    async def _recover(
        self, error: BaseException, stop: asyncio.Event | None = None
    ) -> None:
        """Drop everything since the last checkpoint and resume from it.

        A failure that comes back after every recovery is not transient: after
        `MAX_RECOVERIES_WITHOUT_PROGRESS` recoveries with no checkpoint committed in
        between, it raises RecoveriesExhaustedError instead of looping forever. Raises
        StartStoppedError if `stop` is set while it waits for NATS or an actor.
        """
        self.report.recoveries += 1
        self._recoveries_without_progress += 1
        if self._recoveries_without_progress > MAX_RECOVERIES_WITHOUT_PROGRESS:
            # A SinkError's message names the file and the fix, which the 200
            # characters that brief_error keeps can cut off.
            last = (
                f"{type(error).__name__}: {error}"
                if isinstance(error, SinkError)
                else brief_error(error)
            )
            raise RecoveriesExhaustedError(
                f"the ingest failed {self._recoveries_without_progress} times in a row "
                f"without committing a checkpoint, the last time with {last}. Fix the "
                "cause and start again. Nothing is lost, because no checkpoint after "
                f"stream sequence {self.report.committed_seq} was committed, so the "
                "next start processes the messages after it again"
            ) from error
        await _sleep_unless_stopped(
            min(
                RECOVERY_FIRST_DELAY_S * 2 ** (self._recoveries_without_progress - 1),
                RECOVERY_MAX_DELAY_S,
            ),
            stop,
        )
        # No count of messages to replay here: batches still with the actors or in a
        # commit are not in _unacked, so it would undercount.
        logger.warning(
            "recovering from %s: %s; resuming after the last committed checkpoint",
            type(error).__name__,
            error,
        )
        self._stop_fetching()
        for flight in self._in_flight:
            # Mark a failure as seen, so asyncio does not log it again at exit.
            flight.results.add_done_callback(_consume_failure)
            flight.results.cancel()
        self._in_flight.clear()
        self._publisher.reset()
        self._unacked = []
        self._dead_rows = []
        if self._commit_task is not None:
            self._commit_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, *RECOVERABLE):
                await self._commit_task
            self._commit_task = None
        if stop is not None and stop.is_set():
            raise StartStoppedError("stopped before the recovery restarted the ingest")
        resumed = await self.start_with_retry(stop)
        logger.info(
            "recovered: processing again from stream sequence %d, the first one the "
            "last committed checkpoint does not cover",
            resumed + 1,
        )

    async def start_with_retry(self, stop: asyncio.Event | None = None) -> int:
        """Run `start`, retrying with backoff while NATS or an actor is unavailable.

        Raises StartStoppedError if `stop` is set while it waits to retry.
        """
        delay = RECOVERY_FIRST_DELAY_S
        while True:
            try:
                return await self.start()
            except RECOVERABLE as error:
                if await self._wait_for_connection(stop):
                    # The NATS client logs its own outage and reconnect, so this
                    # retries at once without a line per attempt.
                    continue
                logger.warning(
                    "ingest start failed (%s: %s); retrying in %.1f s",
                    type(error).__name__,
                    error,
                    delay,
                )
                if stop is None:
                    await asyncio.sleep(delay)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    if stop.is_set():
                        raise StartStoppedError(
                            "stopped while the ingest start was retried; this run "
                            "processed nothing"
                        ) from error
                delay = min(delay * 2, RECOVERY_MAX_DELAY_S)

    async def _wait_for_connection(self, stop: asyncio.Event | None = None) -> bool:
        """Wait while the NATS client reconnects; return whether it had to wait.

        Raises StartStoppedError if `stop` is set meanwhile: a stopped run must not
        wait for a server that may stay down.
        """
        if self.nc.is_connected or self.nc.is_closed:
            return False
        while not self.nc.is_connected and not self.nc.is_closed:
            if stop is not None and stop.is_set():
                raise StartStoppedError(
                    "stopped while waiting for NATS to come back; this run committed "
                    "nothing since its last checkpoint"
                )
            await asyncio.sleep(RECONNECT_POLL_S)
        return True

    def _checkpoint_due(self, *, idle: bool) -> bool:
        if not self._unacked and not self._dead_rows:
            return False
        if any(isinstance(item, _Barrier) for item in self._in_flight):
            # The checkpoint sent last has not started its commit yet.
            return False
        if idle or len(self._unacked) >= self.settings.max_unacked:
            return True
        return (
            time.monotonic() - self._last_checkpoint
            >= self.settings.checkpoint_interval_s
        )

    async def _drained(self) -> bool:
        if self._unacked or self._dead_rows or self._in_flight:
            return False
        await self._finish_commit()
        info = await self.js.consumer_info(EVENTS_STREAM, self.settings.consumer)
        return info.num_pending == 0

    def _route(
        self,
        groups: dict[int, list[SourceMessage]],
        dead: list[DeadLetter],
        seq: int,
        subject: str,
        data: bytes,
        index: int,
    ) -> None:
        """Step 2 for one event: decode its key and add it to its partition's share."""
        try:
            key = decode_key(data)
            self._keys.check(subject, data, key, index)
        except msgspec.ValidationError as error:
            dead.append(
                _key_dead_letter(
                    subject,
                    data,
                    seq,
                    index,
                    "invalid",
                    describe_decode_error(error, data, in_edge_batch=index >= 0),
                )
            )
            return
        except msgspec.DecodeError as error:
            dead.append(
                _key_dead_letter(
                    subject,
                    data,
                    seq,
                    index,
                    "malformed",
                    describe_decode_error(error, data, in_edge_batch=index >= 0),
                )
            )
            return
        except ValueError as error:
            # The key decoded, so the letter can name the event. Its plant is kept
            # only when the subject agrees, so the letter goes to the DLQ subject of
            # the plant that published it.
            letter = _key_dead_letter(subject, data, seq, index, "invalid", str(error))
            letter = msgspec.structs.replace(
                letter,
                event_id=key.event_id,
                plant=key.plant if key.plant == _subject_plant(subject) else None,
                order=key.order,
            )
            dead.append(letter)
            return
        partitions = len(self.actors)
        # TODO: an event id reused for an event that routes to another partition is
        # not dead-lettered, because each partition remembers only its own ids.
        partition = partition_of(key.plant, routing_key(key), partitions)
        groups.setdefault(partition, []).append(
            SourceMessage(seq, subject, data, True, index)
        )
        if is_plant_wide(key):
            # A lot or material hold blocks stock in orders of every partition.
            for other in range(partitions):
                if other != partition:
                    groups.setdefault(other, []).append(
                        SourceMessage(seq, subject, data, False, index)
                    )

    async def process(self, messages: list[Msg]) -> None:
        """Steps 2 to 4 for one fetched batch.

        Step 3 is started here and finished for older batches, keeping at most
        `MAX_BATCHES_IN_FLIGHT` with the actors; each actor runs its calls in order.
        """
        for share in _split_by_size(messages, DISPATCH_MAX_BYTES):
            self._in_flight.append(self._dispatch(share))
            await self._complete_in_flight(MAX_BATCHES_IN_FLIGHT)

    def _dispatch(
        self, messages: list[Msg], *, every_partition: bool = False
    ) -> _InFlight:
        """Step 2, and the start of step 3: route the batch and send each share.

        With `every_partition`, a partition without a share gets an empty one.
        """
        clock = time.perf_counter()
        groups: dict[int, list[SourceMessage]] = (
            {p: [] for p in range(len(self.actors))} if every_partition else {}
        )
        self._last_sent = time.monotonic()
        dead: list[DeadLetter] = []
        empty = 0
        for message in messages:
            seq = stream_sequence(message)
            self._max_seq = max(self._max_seq, seq)
            if message.headers:
                self._check_site_gap(message, seq, dead)
            if is_edge_batch(message.subject):
                try:
                    items = decode_edge_batch(message.data)
                except (msgspec.DecodeError, msgspec.ValidationError) as error:
                    dead.append(
                        _key_dead_letter(
                            message.subject,
                            message.data,
                            seq,
                            None,
                            "malformed",
                            "cannot split the edge batch into events: "
                            f"{lone_surrogate_detail(message.data) or error}; an "
                            "edge batch is a JSON array of event objects",
                        )
                    )
                    continue
                if not items:
                    # Nothing to lose, but a gateway that flushes empty arrays is worth
                    # knowing about, so the flush is counted rather than ignored.
                    empty += 1
                    logger.debug(
                        "empty edge batch at seq %d on %s", seq, message.subject
                    )
                    continue
                for index, item in enumerate(items):
                    self._route(groups, dead, seq, message.subject, bytes(item), index)
            else:
                self._route(groups, dead, seq, message.subject, message.data, -1)
        # One msgpack blob per actor: far cheaper for Ray than pickling each message.
        refs = [
            self.actors[p].apply_packed.remote(
                _batch_encoder.encode(batch), self._restore_token
            )
            for p, batch in groups.items()
        ]
        self._lap("route", clock)
        return _InFlight(messages, dead, asyncio.gather(*refs), empty)

    def _check_site_gap(self, message: Msg, seq: int, dead: list[DeadLetter]) -> None:
        """Dead-letter the messages a site stream lost before `message` was copied.

        Their bytes are gone, so the letter carries none: it names the site stream's
        sequences instead, and sits at the stream position of the copy after them.
        """
        position = source_position(message.headers)
        if position is None:
            return
        stream, site_seq = position
        missing = self._site_seqs.missing_before(stream, site_seq)
        if not missing:
            return
        dead.append(
            _key_dead_letter(
                message.subject,
                b"",
                seq,
                None,
                "lost_at_site",
                f"{stream} lost sequences {site_seq - missing:,} to {site_seq - 1:,} "
                f"({missing:,} messages) before the hub copied them: the site's "
                "buffer dropped them after its max age (site-init --max-age-s) or "
                "they were deleted there. Their events never reached PLANT_EVENTS. "
                "Have the plant systems publish them again, and give the site a max "
                "age longer than its longest outage",
            )
        )

    async def _complete_in_flight(self, keep: int) -> None:
        """Finish the oldest batches in flight until at most `keep` remain, and start
        the commit of each checkpoint barrier reached on the way."""
        while len(self._in_flight) > keep:
            await self._complete_oldest()

    async def _complete_oldest(self) -> None:
        """Finish the oldest batch in flight, or start its commit if it is a barrier."""
        item = self._in_flight.popleft()
        if isinstance(item, _Barrier):
            await self._start_commit(item)
        else:
            await self._complete(item)

    async def _complete(self, flight: _InFlight) -> None:
        """Finish step 3 and start step 4: collect the actors' output, publish it."""
        clock = time.perf_counter()
        packed: list[bytes] = await flight.results
        clock = self._lap("apply", clock)
        dead = flight.dead
        # Counted here rather than when routed: a checkpoint takes the ingest's counts
        # once every batch before it is collected, and none after it.
        for counts in (self.report.counts, self._ingest_counts):
            if flight.empty_edge_batches:
                counts["edge_batches_empty"] += flight.empty_edge_batches
            for letter in dead:
                # A site's lost messages never arrived, so they are not events in.
                if letter.reason != "lost_at_site":
                    counts["events_in"] += 1
                counts[f"dead_letter:{letter.reason}"] += 1
        outgoing: list[tuple[str, bytes, str | None]] = []
        for data in packed:
            result = _result_decoder.decode(data)
            outgoing.extend((p.subject, p.data, p.key) for p in result.postings)
            dead.extend(result.dead_letters)
            self.report.counts.update(result.counts)
            outgoing.extend(
                (
                    dlq_resolved_subject(r.plant),
                    encode(r),
                    f"resolved:{r.letter_id}",
                )
                for r in result.resolved
            )
        dead[:] = [shorten_letter(letter) for letter in dead]
        outgoing.extend(
            (
                dlq_subject(d.plant or _subject_plant(d.subject)),
                self._encode_dead_letter(d),
                letter_id(d),
            )
            for d in dead
        )
        # Step 4 is started here; the checkpoint that covers this batch waits for the
        # acks before it commits.
        publish = self._publisher.publish
        for subject, payload, message_id in outgoing:
            await publish(subject, payload, message_id)
        self._lap("publish", clock)
        self._unacked.extend(flight.messages)
        self._dead_rows.extend(_dead_letter_row(d) for d in dead)
        for letter in dead:
            self._log_dead_letter(letter)
        self.report.batches += 1

    def _encode_dead_letter(self, letter: DeadLetter) -> bytes:
        """Encode a dead letter, leaving out a body too large for one NATS message.

        Base64 makes the copy a third larger than the original, so a message near the
        server's max_payload cannot be copied; PLANT_EVENTS keeps it.
        """
        data = encode(letter)
        if len(data) <= self.nc.max_payload - DEAD_LETTER_HEADROOM:
            return data
        return encode(msgspec.structs.replace(letter, data=b"", data_omitted=True))

    def _lap(self, step: str, since: float) -> float:
        now = time.perf_counter()
        self.report.seconds[step] += now - since
        return now

    def _log_dead_letter(self, letter: DeadLetter) -> None:
        # The first few of each reason at WARNING, then every thousandth, so a flood of
        # one bad gateway does not drown the log; all of them are in the DLQ stream.
        self._dead_logged[letter.reason] += 1
        seen = self._dead_logged[letter.reason]
        level = (
            logging.WARNING
            if seen <= DEAD_LETTER_LOG_FIRST or seen % 1000 == 0
            else logging.DEBUG
        )
        logger.log(
            level,
            "dead letter #%d of reason %s: seq=%d subject=%s event_id=%s detail=%s",
            seen,
            letter.reason,
            letter.stream_seq,
            letter.subject,
            letter.event_id,
            letter.detail[:300],
        )
        if seen == DEAD_LETTER_LOG_FIRST:
            logger.warning(
                "further dead letters of reason %s are logged at DEBUG, with every "
                "1,000th at WARNING. `plantstream dlq list` shows them all",
                letter.reason,
            )

    async def checkpoint(self, *, wait: bool = False) -> None:
        """Steps 5 and 6: make the state durable, then acknowledge what it covers.

        Step 5a is sent to the actors at once, behind the batches already sent, and the
        loop goes on: each actor serialises its state between those batches and the
        next, while the driver routes the next batch. Once the batches before it are
        collected, the rest (DuckDB, object store, acks) runs in the background after
        COMMIT_DEFER_S. The next checkpoint's commit waits for it, so commits stay in
        order. `wait` waits for this one too.
        """
        # 5a. Every partition's state and changed rows, all partitions at once.
        bases = [self._chains.wants_base(index) for index in range(len(self.actors))]
        results: asyncio.Future[list[PartitionCheckpoint]] = asyncio.gather(
            *(
                actor.checkpoint.remote(base, self._restore_token)
                for actor, base in zip(self.actors, bases, strict=True)
            )
        )
        # Every batch routed so far lies before the barrier, and none after it.
        self._in_flight.append(
            _Barrier(results, bases, self._max_seq, dict(self._site_seqs.highest))
        )
        self._last_checkpoint = time.monotonic()
        if wait:
            await self._complete_in_flight(0)
            await self._finish_commit()

    async def _start_commit(self, barrier: _Barrier) -> None:
        """Start the commit of a checkpoint whose earlier batches are all collected."""
        await self._finish_commit()
        self._commit_hurried = False
        # Taken now: the batches collected so far are exactly those before the barrier.
        covered = self._unacked
        dead_rows = self._dead_rows
        self._unacked = []
        self._dead_rows = []
        self._commit_task = asyncio.create_task(
            self._commit(
                barrier,
                covered,
                dead_rows,
                self._publisher.last,
                dict(self._ingest_counts),
            )
        )

    async def _finish_commit(self) -> None:
        """Wait for the checkpoint in flight; its failure is raised here, to recover."""
        task, self._commit_task = self._commit_task, None
        if task is not None:
            # The loop waits for this commit now, so deferring it would only stall.
            self._hurry_commit()
            await task

    async def _defer_commit(self) -> None:
        """Wait up to COMMIT_DEFER_S, a quarter of the checkpoint interval at most,
        unless `_hurry_commit` ends the wait."""
        delay = min(COMMIT_DEFER_S, self.settings.checkpoint_interval_s / 4)
        if self._commit_hurried or delay <= 0:
            return
        self._commit_deferral = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._commit_deferral, delay)
        except TimeoutError:
            pass
        finally:
            self._commit_deferral = None

    def _hurry_commit(self) -> None:
        """End the commit's COMMIT_DEFER_S wait, or skip it if it has not begun."""
        self._commit_hurried = True
        deferral = self._commit_deferral
        if deferral is not None and not deferral.done():
            deferral.set_result(None)

    async def _commit(
        self,
        barrier: _Barrier,
        covered: list[Msg],
        dead_rows: list[dict[str, object]],
        published: int,
        ingest_counts: dict[str, int],
    ) -> None:
        assert self._store is not None
        clock = time.perf_counter()
        results: list[PartitionCheckpoint] = await barrier.results
        self._lap("collect", clock)
        await self._defer_commit()
        clock = time.perf_counter()
        # The partitions serialise at once, each in its own process.
        self.report.seconds["serialise"] += max(r.seconds for r in results)
        # 4, finished: every posting and dead letter of the covered batches is stored.
        await self._publisher.settle(published)
        self.report.counts["postings_repeated"] = self._publisher.duplicates
        clock = self._lap("publish", clock)
        # 5b. Snapshot rows to DuckDB; upserts, so a repeat after a crash is harmless.
        if self.writer is not None:
            tables = merge_tables([result.tables for result in results])
            if dead_rows:
                tables["dead_letters"] = table_from_rows("dead_letters", dead_rows)
            # After a split into fewer partitions, the rows of the ones beyond the
            # new count go with the first write.
            await self.writer.write_in_background(
                tables,
                through_seq=barrier.covered_seq,
                partitions=len(self.actors) if self._chains.rebasing else None,
            )
        clock = self._lap("snapshot", clock)
        if self.commit_guard is not None:
            await self.commit_guard()
        # 5c. Each partition's state, then the manifest: the commit point.
        objects = [
            await self._chains.store(
                self._store, index, result.state, result.orders, base=base
            )
            for index, (result, base) in enumerate(
                zip(results, barrier.bases, strict=True)
            )
        ]
        manifest = CheckpointManifest(
            barrier.covered_seq,
            len(self.actors),
            time.time(),
            ingest_counts,
            objects,
            barrier.site_seqs,
        )
        await self._chains.commit(self._store, manifest)
        self._last_manifest = (manifest.stream_seq, manifest.written_at)
        self.report.committed_seq = barrier.covered_seq
        clock = self._lap("commit", clock)
        # 6. Acknowledge. The consumer acknowledges all: acking the message delivered
        # last acknowledges every message delivered before it, which this checkpoint
        # covers, and none delivered after it.
        if covered:
            await covered[-1].ack()
            await self.nc.flush()
        self._lap("ack", clock)
        logger.debug(
            "checkpoint at seq %d acked %d messages", barrier.covered_seq, len(covered)
        )
        self.report.checkpoints += 1
        self._recoveries_without_progress = 0

    async def checkpoint_unchanged(self) -> bool:
        """Return whether the committed checkpoint is still the one this process
        restored or committed last, so that no other run committed since."""
        assert self._store is not None
        manifest = await read_manifest(self._store)
        found = None if manifest is None else (manifest.stream_seq, manifest.written_at)
        return found == self._last_manifest

    async def partition_stats(self) -> list[dict[str, object]]:
        """Return the stats of every partition that still has its restored state.

        A partition that Ray restarted since the last restore is empty, so its stats
        are left out, and `report.stop_error` records why. So are those of a partition
        that does not answer at all.
        """
        token = self._restore_token
        outcomes = await asyncio.gather(
            *(actor.stats.remote(token) for actor in self.actors),
            return_exceptions=True,
        )
        stats: list[dict[str, object]] = []
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, RECOVERABLE):
                # totals() calls this again, so the warning is logged once.
                # NOTE: an actor that is only unreachable for a while, which Ray reports
                # with the same ActorUnavailableError as a restarting one, is also
                # counted as lost here.
                if self.report.stop_error is None:
                    # The actor's own exception, not Ray's wrapper around it, whose
                    # name reads RayTaskError(PartitionRestartedError).
                    cause: BaseException = outcome
                    if (
                        isinstance(outcome, ray.exceptions.RayTaskError)
                        and outcome.cause
                    ):
                        cause = outcome.cause
                    self.report.stop_error = (
                        f"partition {index} returned no counts "
                        f"({type(cause).__name__}), because Ray restarted it after "
                        "the last checkpoint or it is unavailable"
                    )
                    logger.warning(
                        "%s, so its counts are left out of the totals. Nothing is "
                        "lost: the next start restores the checkpoint through stream "
                        "sequence %d and processes the messages after it again",
                        self.report.stop_error,
                        self.report.committed_seq,
                    )
                continue
            if isinstance(outcome, BaseException):
                raise outcome
            stats.append(outcome)
        return stats

    async def totals(self) -> Counter[str]:
        """Return exact counts over the whole stream, replays after a recovery included.

        Partitions restore their counts with their state, and the ingest restores its
        own from the manifest, so an event replayed after a crash is counted once.
        """
        totals = Counter(self._ingest_counts)
        for stats in await self.partition_stats():
            totals.update(cast(dict[str, int], stats["counts"]))
        return totals


async def _sleep_unless_stopped(seconds: float, stop: asyncio.Event | None) -> None:
    """Sleep for `seconds`, or until `stop` is set."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def brief_error(error: BaseException) -> str:
    """Return the first line of an error, without Ray's traceback and colour codes.

    For an exception raised in an actor, RayTaskError's text starts with Ray's own
    frames, so the actor's exception is named instead.
    """
    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        error = error.cause
    lines = _TERMINAL_COLOUR.sub("", str(error)).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 200 else text[:199] + "…"


_TERMINAL_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def _key_dead_letter(
    subject: str,
    data: bytes,
    seq: int,
    index: int | None,
    reason: DeadLetterReason,
    detail: str,
) -> DeadLetter:
    return DeadLetter(
        reason=reason,
        detail=detail,
        subject=subject,
        stream_seq=seq,
        batch_index=None if index is None or index < 0 else index,
        data=data,
        rejected_at=dt.datetime.now(dt.UTC),
    )


def _subject_plant(subject: str) -> str | None:
    # A message that names no valid plant is filed under the plant of its subject,
    # plant.events.<plant>.<event_type>, so that the plant's DLQ subject has it.
    tokens = subject.split(".")
    return tokens[2] if len(tokens) >= 3 else None


def check_event_subject(subject: str, plant: str, event_type: str | None) -> None:
    """Raise ValueError if `subject` is not plant.events.<plant>.<event_type>.

    Pass None as `event_type` for an event of an edge batch, whose subject ends in
    `.batch` instead of a type. The type token may use hyphens in place of underscores
    ("material-consumed"), the spelling of the older edge gateway that
    `pipeline.sources.generated` models.
    """
    # Replay and site sourcing select a plant by subject, and a subscriber may filter
    # on the type token. They would miss an event filed under another plant's or
    # another type's subject, so the ingest rejects it.
    tokens = subject.split(".", 3)
    if len(tokens) >= 3 and tokens[2] != plant:
        raise ValueError(
            f"the event names plant {plant} but was published on {subject}, a subject "
            f"of plant {tokens[2]}; publish it on plant.events.{plant}.<event_type>"
        )
    if event_type is None:
        return
    subject_type = tokens[3] if len(tokens) == 4 else ""
    if subject_type.replace("-", "_") != event_type:
        raise ValueError(
            f"the event has event_type {event_type} but was published on {subject}, "
            f"whose event type token differs; publish it on "
            f"{event_subject(plant, event_type)}"
        )


def _split_by_size(messages: list[Msg], max_bytes: int) -> Iterator[list[Msg]]:
    """Yield runs of `messages` in order, each of at most `max_bytes` of data unless
    one message alone is larger."""
    start = 0
    size = 0
    for index, message in enumerate(messages):
        size += len(message.data)
        if size > max_bytes and index > start:
            yield messages[start:index]
            start = index
            size = len(message.data)
    yield messages[start:]


def _consume_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
