"""The main job: NATS, Ray, the partition actors, the ingest loop and the DuckDB sink.

`run_job` works on the embedded default (its own nats-server and a local Ray) or on a
cluster, given a NATS URL and a Ray address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats.aio.client
import nats.errors
import nats.js
import ray

from actors.partition import PartitionActor
from actors.settings import StateSettings
from cluster.connection_log import SUMMARY_INTERVAL_S, ConnectionLog, redact_url
from cluster.lease import (
    DEFAULT_TTL_S,
    IngestLease,
    LeaseLostError,
    LeaseRetakenError,
)
from cluster.nats_server import EmbeddedNatsServer
from pipeline.ingest import Ingest, IngestReport
from pipeline.publish import publish_all
from pipeline.settings import PipelineSettings
from pipeline.sink import (
    SnapshotSource,
    SnapshotWriter,
    check_not_folder,
    read_source,
)
from pipeline.streams import ensure_streams
from pipeline.subjects import EVENTS_STREAM

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_PARTITIONS",
    "JobConfig",
    "JobResult",
    "connect_nats",
    "connect_ray",
    "run_job",
    "validate_nats_url",
    "validate_snapshot_path",
]

MAX_PARTITIONS = 256
"""Maximum number of partitions; a run rejects more at once. Each partition is a Ray
actor in a worker process of its own, all started before any event is processed, and
the one ingest loop calls nearly every partition for every fetched batch. Each may also
keep up to PLANTSTREAM_DEDUP_MAX_IDS event ids, about 40 MiB at the default (21 bytes
per id in BENCHMARKS.md). A count in the thousands would take minutes to start and, as
an estimate, several GB of memory."""
# NOTE: 256 is a judgement, not a measured limit, because the benchmarks ran only 2
# partitions.


@dataclass
class JobConfig:
    db: Path
    partitions: int = 2
    nats_url: str | None = None
    """An existing NATS server; None starts an embedded one with a temporary store."""
    ray_address: str | None = None
    """An existing Ray cluster ("auto" or host:port); None starts Ray locally."""
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    state: StateSettings = field(default_factory=StateSettings)
    lease_ttl_s: float = DEFAULT_TTL_S
    """How long a standby run waits after this run stops renewing its ingest lease."""

    def __post_init__(self) -> None:
        # Checked here so that `plantstream run` fails before it starts Ray.
        if not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ValueError(
                f"--partitions {self.partitions} is out of range; use 1 to "
                f"{MAX_PARTITIONS}, because each partition is a Ray actor in a worker "
                "process of its own"
            )
        if self.nats_url is not None:
            validate_nats_url(self.nats_url)


@dataclass
class JobResult:
    report: IngestReport
    totals: Counter[str]
    """Exact counts over the stream (see `Ingest.totals`)."""
    published: int
    partition_stats: list[dict[str, object]]
    db: Path


RAY_DIRECT_CALL_BYTES = 4 << 20
"""Task arguments and results below this size travel inside Ray's calls instead of
through its object store (Ray's default is 100 KiB). A batch the ingest sends to an
actor holds up to DISPATCH_MAX_BYTES (1 MiB) of messages, so batches and their results
skip the store and the raylet. On the 2-core benchmark machine, in eight runs each,
that took the median CPU per event from 75 to 67 µs and raised the median end-to-end
rate from 24,600 to 27,700 events/s. Checkpoints, which are larger, still go through
the store.

Each process reads it from the environment variable RAY_max_direct_call_object_size:
the caller's value decides for arguments, the callee's for results. `connect_ray` sets
it for the driver and for a local Ray's workers, which inherit the driver's environment.
A cluster's nodes need it in the environment of `ray start` (docs/deployment.md)."""

RAY_ARROW_SETTINGS = {"RAY_DISABLE_CUSTOM_ARROW_DATA_SERIALIZATION": "1"}
"""Let pyarrow pickle the snapshot tables a checkpoint returns, not Ray's own Arrow
serializer. Ray's copies each column's buffers so that a slice does not carry its
parent's data, and converts each column's offsets with a compute call that looks for
the optional dateutil package on every call. The tables are never slices, because each
is built or combined anew, so both give the same bytes. In a Ray worker on the 2-core
benchmark machine, a checkpoint of 20,000 events (6.5 MB) took 12 ms with Ray's
serializer and 3 ms with pyarrow's. Like RAY_max_direct_call_object_size, a cluster's
nodes need it in the environment of `ray start`."""


def connect_ray(address: str | None) -> None:
    """Join a Ray cluster, or start Ray on this machine if `address` is None."""
    if ray.is_initialized():
        return
    # Ray's token authentication and usage reporting are for shared clusters; a local
    # instance that only this process uses needs neither.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_max_direct_call_object_size", str(RAY_DIRECT_CALL_BYTES))
    for name, value in RAY_ARROW_SETTINGS.items():
        os.environ.setdefault(name, value)
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    else:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as error:
            # Ray 2.59 and later turn on token authentication in `ray start`, and a
            # client without RAY_AUTH_MODE=token is refused with only this error.
            raise ConnectionError(
                f"{error}. If the cluster uses token authentication, which `ray "
                "start` turns on since Ray 2.59, set RAY_AUTH_MODE=token for this "
                "command and give it the cluster's token in ~/.ray/auth_token or "
                "RAY_AUTH_TOKEN (docs/deployment.md)"
            ) from error
    logger.info("ray connected: %s", ray.cluster_resources())


NATS_URL_SCHEMES = ("nats", "tls", "ws", "wss")
"""URL schemes that nats-py 2.16 connects with."""


def _redacted_url(url: str) -> str:
    """Return `url` without credentials, even when it is too malformed to parse."""
    try:
        return redact_url(url)
    except ValueError:
        scheme, separator, rest = url.rpartition("://")
        return f"{scheme}{separator}{rest.rpartition('@')[2]}"


def validate_nats_url(url: str) -> None:
    """Raise ValueError naming `url` and its fault unless it is a NATS server URL.

    The URL must start with a scheme of NATS_URL_SCHEMES and "://", name a host, and
    have a port from 1 to 65535 if any. nats-py 2.16 would read "http://host:4222" or
    "nats//host:4222" as the host "http" or "nats", wait for a failing name lookup, and
    report only a timeout.
    """
    redacted = _redacted_url(url)
    example = "write it as nats://HOST:PORT, e.g. nats://127.0.0.1:4222"
    scheme, separator, _ = url.partition("://")
    if not separator:
        raise ValueError(f"NATS URL {redacted!r} has no scheme; {example}")
    if scheme not in NATS_URL_SCHEMES:
        schemes = ", ".join(f"{name}://" for name in NATS_URL_SCHEMES)
        raise ValueError(
            f"NATS URL {redacted!r} has the scheme {scheme!r}, which the NATS client "
            f"does not accept; use {schemes} (lowercase), e.g. nats://127.0.0.1:4222"
        )
    try:
        parts = urlsplit(url)
    except ValueError as error:
        raise ValueError(
            f"NATS URL {redacted!r} is invalid ({error}); {example}"
        ) from None
    if not parts.hostname:
        raise ValueError(f"NATS URL {redacted!r} has no host; {example}")
    # The text after the host's last ":", skipping the colons of an IPv6 address.
    host_port = parts.netloc.rpartition("@")[2]
    port_separator, port = host_port.rpartition("]")[2].partition(":")[1:]
    # An empty port after the ":" would make nats-py fall back to 4222, a server the
    # user did not name.
    if port_separator and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(
            f"NATS URL {redacted!r} has the port {port!r}, which is not a number "
            "from 1 to 65535; use a port in that range, e.g. nats://127.0.0.1:4222"
        )


def _is_duckdb_file(path: Path) -> bool:
    # A DuckDB 2.0.1 database file starts with an 8-byte checksum and the magic
    # bytes "DUCK". DuckDB rejects an empty file too.
    with path.open("rb") as file:
        return file.read(12)[8:] == b"DUCK"


def validate_snapshot_path(path: Path) -> None:
    """Raise ValueError or SinkError naming `path` and its fault unless a run can
    write it.

    The path must be a DuckDB file or not exist, in a folder where files can be
    created, because DuckDB also writes a ".wal" file beside it. Missing parent folders
    are created, as the snapshot writer would create them.
    """
    check_not_folder(path, "the path of a DuckDB file, or of one to create")
    folder = path.parent
    existing = next(parent for parent in path.parents if parent.exists())
    if not existing.is_dir():
        raise ValueError(
            f"{existing} in snapshot file path {path} is a file, not a folder; pass "
            "--db a path in a folder you can write to"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"folder {folder} of snapshot file {path} cannot be created "
            f"({error.strerror}); pass --db a path in a folder you can write to"
        ) from None
    # os.access cannot tell: for root it allows /proc and read-only mounts too.
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(
            f"folder {folder} of snapshot file {path} cannot be written (creating a "
            f"test file there failed: {error.strerror}); pass --db a path in a "
            "folder you can write to"
        ) from None
    if path.is_file() and not _is_duckdb_file(path):
        raise ValueError(
            f"cannot open DuckDB file {path}: it is not a DuckDB database. Pass --db "
            "another path, or move the file aside so that the run creates a new one"
        )


NATS_CONNECT_TIMEOUT_S = 15.0
"""How long start-up waits for the first connection to NATS before it gives up. Once
connected, the client reconnects without limit."""


NATS_RECONNECT_WAIT_S = 0.5
"""Seconds between two attempts to reach NATS while the connection is lost."""


async def connect_nats(
    url: str, *, summary_interval_s: float = SUMMARY_INTERVAL_S
) -> nats.aio.client.Client:
    """Connect to NATS, failing with a clear error if the server cannot be reached.

    A malformed `url` raises ValueError before any connection attempt.

    A lost connection is logged once at WARNING, then at most once per
    `summary_interval_s` until it is back (`ConnectionLog`). nats-py 2.16's default
    error callback would log an ERROR with a traceback for every failed attempt.
    """
    validate_nats_url(url)
    client = nats.aio.client.Client()
    log = ConnectionLog(client, url, summary_interval_s=summary_interval_s)
    try:
        await asyncio.wait_for(
            client.connect(
                url,
                max_reconnect_attempts=-1,
                # nats-py annotates an int, but waits any number of seconds.
                reconnect_time_wait=NATS_RECONNECT_WAIT_S,  # type: ignore[arg-type]
                error_cb=log.error,
                disconnected_cb=log.disconnected,
                reconnected_cb=log.reconnected,
            ),
            NATS_CONNECT_TIMEOUT_S,
        )
    except (TimeoutError, OSError, nats.errors.Error) as error:
        raise ConnectionError(
            f"could not connect to NATS at {redact_url(url)} within "
            f"{NATS_CONNECT_TIMEOUT_S:g} s ({type(error).__name__}); check the URL and "
            "that nats-server is running"
        ) from error
    log.connected()
    return client


async def events_stream_identity(js: nats.js.JetStreamContext) -> str:
    """Return the plant events stream's name and creation time, as a snapshot file
    records the stream its rows come from."""
    info = await js.stream_info(EVENTS_STREAM)
    created = info.created.isoformat() if info.created else "at an unknown time"
    return f"{EVENTS_STREAM} created {created}"


async def _snapshot_source(
    js: nats.js.JetStreamContext, *, embedded: bool
) -> SnapshotSource:
    return SnapshotSource(
        stream=await events_stream_identity(js),
        written_by="demo" if embedded else "run",
    )


def _replace_earlier_demo(db: Path, source: SnapshotSource) -> None:
    """Delete `db` if an earlier demo wrote it from its own embedded server.

    Each demo starts a new embedded server, and with it a new stream, so an earlier
    demo's file can never be continued. A file that `run` wrote is never deleted: the
    writer refuses it instead, with the fix.
    """
    recorded = read_source(db)
    if recorded is None or recorded.stream == source.stream:
        return
    if recorded.written_by == "demo" and source.written_by == "demo":
        logger.info("replacing %s, which an earlier demo run wrote", db)
        db.unlink()
        db.with_name(db.name + ".wal").unlink(missing_ok=True)


CLEANUP_TIMEOUT_S = 15.0
"""Seconds each clean-up step at the end of a job may take (lease release, NATS
close). Both finish in milliseconds when the server is reachable."""


async def run_job(
    config: JobConfig,
    inputs: Iterable[tuple[str, bytes]] | None,
    *,
    until_drained: bool = True,
    stop: asyncio.Event | None = None,
) -> JobResult:
    """Publish `inputs` (if any), then process the plant events stream.

    With `until_drained` the job ends once the stream has nothing pending; without it,
    it runs as a service until `stop` is set.
    """
    validate_snapshot_path(config.db)
    server = None
    url = config.nats_url
    if url is None:
        server = EmbeddedNatsServer().start()
        url = server.url
    try:
        connect_ray(config.ray_address)
        nc = await connect_nats(url)
        try:
            js = nc.jetstream()
            published = 0
            await ensure_streams(js, config.pipeline)
            if inputs is not None:
                published, _ = await publish_all(nc, ((s, d, None) for s, d in inputs))
                logger.info("published %d input messages", published)
            # An embedded server has no other clients, so only a shared one needs
            # the lease.
            lease = (
                None
                if server is not None
                else IngestLease(js, ttl_s=config.lease_ttl_s)
            )
            if lease is not None:
                await lease.acquire(stop)
            try:
                source = await _snapshot_source(js, embedded=server is not None)
                _replace_earlier_demo(config.db, source)
                actors = [
                    PartitionActor.remote(index, config.state)  # type: ignore[attr-defined]
                    for index in range(config.partitions)
                ]
                config.db.parent.mkdir(parents=True, exist_ok=True)
                created = not config.db.exists()
                try:
                    with SnapshotWriter(config.db, source=source) as writer:
                        ingest = Ingest(
                            nc,
                            actors,
                            writer,
                            config.pipeline,
                            on_restore=None if lease is None else lease.restoring,
                        )
                        if lease is not None:
                            ingest.commit_guard = _lease_guard(lease, ingest)
                        try:
                            await ingest.start_with_retry(stop)
                        except BaseException:
                            # A start that failed or was stopped wrote no rows, so a
                            # file this run created would only be an empty one to
                            # mistake for a snapshot.
                            if created:
                                config.db.unlink(missing_ok=True)
                                wal = config.db.with_name(f"{config.db.name}.wal")
                                wal.unlink(missing_ok=True)
                            raise
                        report = await _run_holding(
                            ingest.run(until_drained=until_drained, stop=stop), lease
                        )
                        stats = await ingest.partition_stats()
                        totals = await ingest.totals()
                finally:
                    # Also after a failed start: Ray would keep the actors running.
                    for actor in actors:
                        ray.kill(actor)
            finally:
                if lease is not None:
                    await _bounded(lease.release(), "releasing the ingest lease")
            return JobResult(report, totals, published, stats, config.db)
        finally:
            # nats-py 2.16 raises ConnectionResetError when it closes a client whose
            # server went away, and the run's result must not be lost to that.
            with contextlib.suppress(ConnectionError):
                await _bounded(nc.close(), "closing the NATS connection")
    finally:
        if server is not None:
            server.stop()


async def _bounded(step: Coroutine[Any, Any, None], description: str) -> None:
    """Await a clean-up step for at most CLEANUP_TIMEOUT_S, then give it up."""
    # NOTE: a test run once hung after its actors were killed, with its NATS connection
    # still open, so in one of these steps. The cause is not known. A bound ends the run
    # instead: the lease expires by itself and the server drops the client.
    try:
        await asyncio.wait_for(step, CLEANUP_TIMEOUT_S)
    except TimeoutError:
        logger.warning(
            "%s timed out after %g s; the job ends without it",
            description,
            CLEANUP_TIMEOUT_S,
        )


def _lease_guard(lease: IngestLease, ingest: Ingest) -> Callable[[], Awaitable[None]]:
    """Return the check a commit waits for: this run must still hold the lease.

    A lease that expired during an outage and that this run took again sends the
    ingest back to its last checkpoint only when another run committed meanwhile.
    Otherwise the state in the actors still follows the committed checkpoint, and
    replaying would only repeat work.
    """

    async def check() -> None:
        try:
            await lease.check()
        except LeaseRetakenError:
            if not await ingest.checkpoint_unchanged():
                raise
            logger.info(
                "no other run committed while the ingest lease was free, so this run "
                "commits without going back to its last checkpoint"
            )
            # The first check raised before it compared the holder, so check again.
            await lease.check()

    return check


async def _run_holding(
    run: Coroutine[Any, Any, IngestReport], lease: IngestLease | None
) -> IngestReport:
    """Run the ingest, stopping it at once if another run takes the lease."""
    task = asyncio.create_task(run)
    if lease is None:
        return await task
    lost = asyncio.create_task(lease.lost.wait())
    try:
        await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
    if not task.done():
        # No last checkpoint: what this run has not acknowledged is delivered to the
        # run that has the lease now.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise LeaseLostError(
            "another plantstream run took the ingest lease while this one could not "
            "renew it; this run stopped without a last checkpoint"
        )
    return task.result()


def run_job_sync(
    config: JobConfig, inputs: Iterable[tuple[str, bytes]] | None
) -> JobResult:
    return asyncio.run(run_job(config, inputs))
