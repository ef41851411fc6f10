"""Fault harness: inject crashes into a running pipeline and check the output is exact.

    python -m benchmarks.faults [--rounds N] [--quick] [--kinds actor process ...]

For each fault kind the harness publishes generated multi-plant streams to a nats-server
it starts on loopback, runs the pipeline over each stream, and injects that fault at
random moments while messages are still pending. Once a stream is drained it compares
the output with the stream's ground truth (`pipeline.sources.generated.Expected`):

- events applied: the `applied` count of the last checkpoint (the same sum as
  `Ingest.totals()`), against the distinct valid events of the stream;
- duplicate postings: messages in ERP_POSTINGS minus distinct Nats-Msg-Id keys;
- postings in DuckDB: the keys must equal those in ERP_POSTINGS, and the goods movement
  totals per (plant, material, movement type) must equal `Expected.movements`.

Fault kinds:

- actor: `ray.kill(actor, no_restart=False)` on a partition actor while a batch is in
  flight (the ingest runs in this process);
- process: SIGKILL of `plantstream run --until-drained`, then a new one;
- nats: SIGKILL of nats-server, then a restart on the same store and port;
- writer: SIGKILL of `plantstream run` while it has the DuckDB file open (a write is
  in progress), then a check that the file opens, then a new `plantstream run`;
- stall: SIGSTOP of `plantstream run` for 1 to 8 s with messages pending, then SIGCONT.
  The ack wait is 4 s in these runs, so longer stalls make JetStream redeliver.

Recovery time runs from the fault (for a stall, from SIGCONT) until a checkpoint
manifest covers a later stream sequence than the one committed at the fault. It
includes up to one checkpoint interval (0.3 s here) and, for process and writer faults,
the start of a new `plantstream run` (Python imports, joining Ray, creating actors).

The `plantstream run` processes join the Ray instance this harness starts, so a killed
process leaves no Ray cluster behind. Process faults use /proc and POSIX signals, so
the harness runs on Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import nats
import ray
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from actors.partition import PartitionActor
from benchmarks.interrupt import SigtermAsInterrupt
from cluster.cli import positive_int
from cluster.job import connect_ray
from cluster.nats_server import EmbeddedNatsServer
from cluster.operations import checkpoint_totals, posting_keys, read_checkpoint
from pipeline.ingest import Ingest
from pipeline.publish import publish_all
from pipeline.settings import PipelineSettings
from pipeline.sink import SnapshotWriter
from pipeline.sources.generated import Expected, StreamSpec, generate
from pipeline.streams import ensure_streams
from pipeline.subjects import EVENTS_STREAM

logger = logging.getLogger(__name__)

__all__ = ["FAULT_KINDS", "HarnessConfig", "KindResult", "format_table", "run_harness"]

PROG = "python -m benchmarks.faults"

FAULT_KINDS = ("actor", "process", "nats", "writer", "stall")

PARTITIONS = 2

SETTINGS = PipelineSettings(
    fetch_batch=100, fetch_timeout_s=0.2, checkpoint_interval_s=0.3
)
"""Small batches and frequent checkpoints give more crash points between steps."""

STALL_ACK_WAIT_S = 4.0

MIN_PENDING = 800
"""Messages the last checkpoint must leave uncovered for another fault."""

PROGRESS_TIMEOUT_S = 120.0
"""A pipeline that makes no progress for this long after a fault counts as hung."""

STREAM_TIMEOUT_S = 600.0

POLL_S = 0.05


@dataclass(frozen=True)
class HarnessConfig:
    rounds: int = 20
    """Faults injected per kind."""
    kinds: tuple[str, ...] = FAULT_KINDS
    orders_per_plant: int = 300
    plants: int = 3
    faults_per_stream: int = 6
    seed: int = 1
    work_dir: Path | None = None


@dataclass
class StreamResult:
    kind: str
    messages: int
    events: int
    applied: int
    duplicate_postings: int
    postings_not_in_db: int
    db_rows_not_posted: int
    movements_match: bool
    parked: int
    ingest_dead_letters_off: int
    """Key-level dead letters in the manifest's counts minus malformed messages sent."""
    reconcile: str = ""

    @property
    def lost(self) -> int:
        return max(0, self.events - self.applied)

    @property
    def applied_twice(self) -> int:
        return max(0, self.applied - self.events)


@dataclass
class KindResult:
    kind: str
    faults: int = 0
    recoveries_s: list[float] = field(default_factory=list)
    hangs: int = 0
    db_open_failures: int = 0
    streams: list[StreamResult] = field(default_factory=list)

    def total(self, name: str) -> int:
        return sum(getattr(stream, name) for stream in self.streams)

    @property
    def clean(self) -> bool:
        return (
            self.hangs == 0
            and self.db_open_failures == 0
            and all(
                s.lost == 0
                and s.applied_twice == 0
                and s.duplicate_postings == 0
                and s.postings_not_in_db == 0
                and s.db_rows_not_posted == 0
                and s.movements_match
                for s in self.streams
            )
        )


# -- the pipeline under test ---------------------------------------------------------


def _plantstream_command() -> list[str]:
    script = Path(sys.executable).with_name("plantstream")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "cluster.cli"]


class IngestProcess:
    """`plantstream run --until-drained` as a child process to kill and restart."""

    def __init__(
        self, url: str, db: Path, log: Path, env: dict[str, str], ray_address: str
    ) -> None:
        self.command = [
            *_plantstream_command(),
            "--log-level",
            "WARNING",
            "run",
            "--nats-url",
            url,
            "--db",
            str(db),
            "--partitions",
            str(PARTITIONS),
            "--until-drained",
            "--ray-address",
            ray_address,
        ]
        self.db = db
        self.log = log
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def has_db_open(self) -> bool:
        """Return True while the process has the DuckDB file (or its WAL) open."""
        target = str(self.db)
        try:
            fds = os.listdir(f"/proc/{self.pid}/fd")
        except FileNotFoundError:
            return False
        for fd in fds:
            try:
                if os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith(target):
                    return True
            except OSError:
                continue
        return False


READ_TIMEOUT_S = 2.0
"""An object store read that started while the connection was down can wait forever."""


async def _manifest_seq(js: JetStreamContext) -> int | None:
    try:
        checkpoint = await asyncio.wait_for(read_checkpoint(js), READ_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - nats-server may be down during a fault
        return None
    return 0 if checkpoint is None else checkpoint[0].stream_seq


async def _connection_error(error: Exception) -> None:
    # Reconnect failures are expected while nats-server is down for a fault.
    logger.debug("harness connection: %s", error)


class Watch:
    """Reader of the committed checkpoint sequence, on a connection of its own.

    The connection reconnects by itself, so it survives nats-server faults.
    """

    def __init__(self, nc: NATS, last_seq: int) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.last_seq = last_seq

    async def seq(self) -> int | None:
        return await _manifest_seq(self.js)

    async def pending(self) -> int:
        seq = await self.seq()
        return 0 if seq is None else self.last_seq - seq

    async def progress_after(
        self, baseline: int, finished: Callable[[], bool]
    ) -> float | None:
        """Wait until a checkpoint covers more than `baseline`; return when, or None."""
        deadline = time.monotonic() + PROGRESS_TIMEOUT_S
        while time.monotonic() < deadline:
            seq = await self.seq()
            if seq is not None and (seq > baseline or seq >= self.last_seq):
                return time.monotonic()
            if finished():
                return time.monotonic()
            await asyncio.sleep(POLL_S)
        return None


# -- one stream ----------------------------------------------------------------------


@dataclass
class StreamRun:
    kind: str
    server: EmbeddedNatsServer
    db: Path
    messages: list[tuple[str, bytes]]
    expected: Expected
    rng: random.Random
    result: KindResult
    work_dir: Path
    ray_address: str
    watch: Watch | None = None

    async def publish(self) -> int:
        nc = await nats.connect(self.server.url)
        try:
            js = nc.jetstream()
            await ensure_streams(js, SETTINGS)
            await publish_all(nc, ((s, d, None) for s, d in self.messages))
            info = await js.stream_info(EVENTS_STREAM)
            return info.state.last_seq
        finally:
            await nc.close()

    async def run(self, budget: int) -> None:
        last_seq = await self.publish()
        watch_nc = await nats.connect(
            self.server.url,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            error_cb=_connection_error,
        )
        self.watch = Watch(watch_nc, last_seq)
        try:
            if self.kind == "actor":
                await self._run_in_process(budget)
            else:
                await self._run_subprocess(budget)
        finally:
            await watch_nc.close()

    def _record(self, started: float, progressed: float | None) -> None:
        self.result.faults += 1
        if progressed is None:
            self.result.hangs += 1
            logger.error(
                "%s fault: no progress within %.0f s", self.kind, PROGRESS_TIMEOUT_S
            )
        else:
            self.result.recoveries_s.append(progressed - started)

    async def _fault_moments(
        self,
        budget: int,
        inject: Callable[[], Awaitable[bool]],
        delay_s: tuple[float, float] = (0.2, 1.5),
    ) -> None:
        """Inject up to `budget` faults at random moments while work is pending.

        Each fault waits a random time within `delay_s` after the previous one.
        """
        assert self.watch is not None
        for _ in range(budget):
            await asyncio.sleep(self.rng.uniform(*delay_s))
            if await self.watch.pending() < MIN_PENDING:
                return
            if not await inject():
                return

    # The actor kind runs the ingest in this process, which then has the actor handles.

    async def _run_in_process(self, budget: int) -> None:
        assert self.watch is not None
        watch = self.watch
        nc = await nats.connect(
            self.server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2
        )
        actors = [PartitionActor.remote(i) for i in range(PARTITIONS)]  # type: ignore[attr-defined]
        in_batch = asyncio.Event()
        try:
            with SnapshotWriter(self.db) as writer:
                ingest = Ingest(nc, actors, writer, SETTINGS)
                complete = ingest._complete

                async def traced(flight: Any) -> None:
                    # Collecting one batch means the next ones are with the actors, so
                    # a kill soon after hits an actor in the middle of a batch. The
                    # event stays set because collecting may finish without yielding.
                    in_batch.set()
                    await complete(flight)

                # Instance attribute: only this ingest is traced, to kill mid-batch.
                ingest._complete = traced  # type: ignore[method-assign]
                await ingest.start()
                task = asyncio.create_task(ingest.run(until_drained=True))

                async def kill_actor() -> bool:
                    in_batch.clear()
                    batch = asyncio.create_task(in_batch.wait())
                    await asyncio.wait(
                        [batch, task],
                        timeout=PROGRESS_TIMEOUT_S,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    batch.cancel()
                    if not in_batch.is_set() or task.done():
                        return False  # drained before another batch started
                    await asyncio.sleep(self.rng.uniform(0.0, 0.01))
                    baseline = await watch.seq() or 0
                    started = time.monotonic()
                    ray.kill(self.rng.choice(actors), no_restart=False)
                    progressed = await watch.progress_after(baseline, task.done)
                    self._record(started, progressed)
                    return progressed is not None

                # The ingest runs in this process, started already, and drains a
                # small stream in well under a second, so the faults come sooner.
                await self._fault_moments(budget, kill_actor, (0.01, 0.25))
                await asyncio.wait_for(task, STREAM_TIMEOUT_S)
        finally:
            for actor in actors:
                ray.kill(actor)
            await nc.close()

    # The other kinds: `plantstream run` in a child process.

    async def _run_subprocess(self, budget: int) -> None:
        assert self.watch is not None
        env = dict(os.environ)
        env.update(
            PLANTSTREAM_FETCH_BATCH=str(SETTINGS.fetch_batch),
            PLANTSTREAM_FETCH_TIMEOUT_S=str(SETTINGS.fetch_timeout_s),
            PLANTSTREAM_CHECKPOINT_INTERVAL_S=str(SETTINGS.checkpoint_interval_s),
        )
        if self.kind == "stall":
            env["PLANTSTREAM_ACK_WAIT_S"] = str(STALL_ACK_WAIT_S)
        proc = IngestProcess(
            self.server.url,
            self.db,
            self.work_dir / "ingest.log",
            env,
            self.ray_address,
        )
        proc.start()
        inject = {
            "process": self._kill_process,
            "writer": self._kill_writer,
            "nats": self._kill_nats,
            "stall": self._stall,
        }[self.kind]
        try:
            await self._fault_moments(budget, lambda: inject(proc))
            deadline = time.monotonic() + STREAM_TIMEOUT_S
            while proc.exit_code() is None and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
            code = proc.exit_code()
            if code != 0:
                tail = proc.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(
                    f"plantstream run exited with {code} (None: still running after "
                    f"{STREAM_TIMEOUT_S:.0f} s); the end of {proc.log}:\n{tail}"
                )
        finally:
            proc.kill()

    async def _kill_process(self, proc: IngestProcess) -> bool:
        assert self.watch is not None
        baseline = await self.watch.seq() or 0
        started = time.monotonic()
        proc.kill()
        proc.start()
        progressed = await self.watch.progress_after(
            baseline, lambda: proc.exit_code() == 0
        )
        self._record(started, progressed)
        return progressed is not None

    async def _kill_writer(self, proc: IngestProcess) -> bool:
        assert self.watch is not None
        deadline = time.monotonic() + PROGRESS_TIMEOUT_S
        # A write keeps the file open for tens of milliseconds, so poll /proc often.
        while not proc.has_db_open():
            if proc.exit_code() is not None or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.001)
        await asyncio.sleep(self.rng.uniform(0.0, 0.02))
        baseline = await self.watch.seq() or 0
        started = time.monotonic()
        proc.kill()
        try:
            duckdb.connect(str(self.db), read_only=True).close()
        except duckdb.Error as error:
            self.result.db_open_failures += 1
            logger.error(
                "DuckDB file %s does not open after a kill: %s", self.db, error
            )
        proc.start()
        progressed = await self.watch.progress_after(
            baseline, lambda: proc.exit_code() == 0
        )
        self._record(started, progressed)
        return progressed is not None

    async def _kill_nats(self, proc: IngestProcess) -> bool:
        assert self.watch is not None
        baseline = await self.watch.seq() or 0
        started = time.monotonic()
        self.server.kill()
        await asyncio.sleep(self.rng.uniform(0.1, 1.5))
        self.server.start()
        progressed = await self.watch.progress_after(
            baseline, lambda: proc.exit_code() == 0
        )
        self._record(started, progressed)
        return progressed is not None

    async def _stall(self, proc: IngestProcess) -> bool:
        assert self.watch is not None
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(self.rng.uniform(1.0, 2 * STALL_ACK_WAIT_S))
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        baseline = await self.watch.seq() or 0
        started = time.monotonic()
        progressed = await self.watch.progress_after(
            baseline, lambda: proc.exit_code() == 0
        )
        self._record(started, progressed)
        return progressed is not None

    # -- the check against the ground truth -------------------------------------------

    async def check(self) -> StreamResult:
        nc = await nats.connect(self.server.url)
        try:
            js = nc.jetstream()
            checkpoint = await read_checkpoint(js)
            keys = await posting_keys(js)
        finally:
            await nc.close()
        assert checkpoint is not None, "the pipeline wrote no checkpoint"
        manifest, partitions = checkpoint
        totals = checkpoint_totals(manifest, partitions)
        with duckdb.connect(str(self.db), read_only=True) as connection:
            db_keys = {
                key
                for (key,) in connection.execute("SELECT key FROM postings").fetchall()
            }
            rows = connection.execute(
                "SELECT plant, material, movement_type, sum(quantity) FROM postings "
                "WHERE posting_type = 'goods_movement' GROUP BY ALL"
            ).fetchall()
            parked = connection.execute(
                "SELECT count(*) FROM parked_events WHERE status = 'parked'"
            ).fetchone()
        movements: dict[tuple[str, str, str], Decimal] = {
            (plant, material, kind): total for plant, material, kind, total in rows
        }
        stream_keys = set(keys)
        return StreamResult(
            kind=self.kind,
            messages=len(self.messages),
            events=self.expected.events,
            applied=totals["applied"],
            duplicate_postings=len(keys) - len(stream_keys),
            postings_not_in_db=len(stream_keys - db_keys),
            db_rows_not_posted=len(db_keys - stream_keys),
            movements_match=movements == self.expected.movements,
            parked=parked[0] if parked else 0,
            ingest_dead_letters_off=manifest.ingest_counts.get(
                "dead_letter:malformed", 0
            )
            - self.expected.bad.get("malformed_json", 0),
            reconcile=_reconcile(self.db),
        )


def _reconcile_available() -> bool:
    try:
        output = subprocess.run(
            [*_plantstream_command(), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "reconcile" in output


_RECONCILE: dict[str, bool] = {}


def _reconcile(db: Path) -> str:
    """Run `plantstream reconcile` if the command exists and return its last line."""
    if "available" not in _RECONCILE:
        _RECONCILE["available"] = _reconcile_available()
    if not _RECONCILE["available"]:
        return "not available"
    done = subprocess.run(
        [*_plantstream_command(), "reconcile", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    return f"exit {done.returncode}: {lines[-1] if lines else ''}"


# -- the harness ---------------------------------------------------------------------


async def _run_kind(
    kind: str, config: HarnessConfig, root: Path, ray_address: str
) -> KindResult:
    result = KindResult(kind)
    rng = random.Random(f"{config.seed}:{kind}")
    stream_index = 0
    while result.faults < config.rounds:
        stream_index += 1
        if stream_index > 4 * config.rounds:
            raise RuntimeError(
                f"{kind}: only {result.faults} faults after {stream_index - 1} "
                "streams, because they drain before faults can be injected; raise "
                "orders_per_plant"
            )
        spec = StreamSpec(
            plants=config.plants,
            orders_per_plant=config.orders_per_plant,
            seed=config.seed * 1000 + stream_index,
        )
        generated, expected = generate(spec)
        work_dir = root / f"{kind}-{stream_index}"
        work_dir.mkdir(parents=True)
        server = EmbeddedNatsServer(store_dir=work_dir / "jetstream").start()
        try:
            run = StreamRun(
                kind,
                server,
                work_dir / "snapshots.duckdb",
                [(m.subject, m.data) for m in generated],
                expected,
                rng,
                result,
                work_dir,
                ray_address,
            )
            budget = min(config.faults_per_stream, config.rounds - result.faults)
            before = result.faults
            await run.run(budget)
            checked = await run.check()
            result.streams.append(checked)
            logger.info(
                "%s stream %d: faults=%d applied=%d/%d duplicate_postings=%d "
                "movements_match=%s",
                kind,
                stream_index,
                result.faults - before,
                checked.applied,
                checked.events,
                checked.duplicate_postings,
                checked.movements_match,
            )
        finally:
            server.stop()
    return result


async def run_harness(config: HarnessConfig) -> list[KindResult]:
    """Run every fault kind of `config` and return the results per kind."""
    unknown = set(config.kinds) - set(FAULT_KINDS)
    if unknown:
        raise ValueError(
            f"unknown fault kinds {sorted(unknown)}; choose from {list(FAULT_KINDS)}"
        )
    # With none of these, the harness would inject nothing and report a clean run.
    for name in ("rounds", "faults_per_stream", "plants", "orders_per_plant"):
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"HarnessConfig.{name} must be at least 1, got {value}")
    connect_ray(None)
    ray_address = ray.get_runtime_context().gcs_address
    root = Path(tempfile.mkdtemp(prefix="plantstream-faults-", dir=config.work_dir))
    try:
        results = [
            await _run_kind(kind, config, root, ray_address) for kind in config.kinds
        ]
    except asyncio.CancelledError:
        # Stopped by Ctrl-C or SIGTERM, which leaves no failure to look into.
        shutil.rmtree(root, ignore_errors=True)
        raise
    # Kept after a failure, for the ingest logs and stores.
    shutil.rmtree(root, ignore_errors=True)
    return results


def format_table(results: list[KindResult]) -> str:
    headers = [
        "fault",
        "injected",
        "streams",
        "messages",
        "events",
        "applied once",
        "lost",
        "applied twice",
        "dup postings",
        "db/stream key diff",
        "movements exact",
        "recovery median s",
        "recovery max s",
        "hangs",
        "ingest count off",
        "reconcile clean",
    ]
    rows = []
    for result in results:
        times = result.recoveries_s
        events = result.total("events")
        lost = result.total("lost")
        twice = result.total("applied_twice")
        exact = sum(stream.movements_match for stream in result.streams)
        clean = sum(stream.reconcile.startswith("exit 0") for stream in result.streams)
        rows.append(
            [
                result.kind,
                str(result.faults),
                str(len(result.streams)),
                str(result.total("messages")),
                str(events),
                str(events - lost - twice),
                str(lost),
                str(twice),
                str(result.total("duplicate_postings")),
                str(
                    result.total("postings_not_in_db")
                    + result.total("db_rows_not_posted")
                ),
                f"{exact}/{len(result.streams)}",
                f"{statistics.median(times):.2f}" if times else "-",
                f"{max(times):.2f}" if times else "-",
                str(result.hangs),
                str(result.total("ingest_dead_letters_off")),
                f"{clean}/{len(result.streams)}",
            ]
        )
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    for row in rows:
        lines.append(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    reconcile = Counter(s.reconcile for r in results for s in r.streams)
    lines.append(
        "plantstream reconcile: "
        + ", ".join(f"{k} ({v}x)" for k, v in reconcile.items())
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inject crashes into the pipeline and check that no event is lost "
        "and no posting doubled.",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=20,
        help="faults injected per kind, at least 1 (default: 20)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller streams and 3 faults per kind, unless --rounds is given",
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=FAULT_KINDS,
        default=list(FAULT_KINDS),
        help="fault kinds to inject (default: all)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    rounds_given = any(
        a == "--rounds" or a.startswith("--rounds=") for a in argv or sys.argv
    )
    config = HarnessConfig(
        rounds=args.rounds if (rounds_given or not args.quick) else 3,
        kinds=tuple(args.kinds),
        orders_per_plant=80 if args.quick else 300,
        seed=args.seed,
    )
    started = time.monotonic()
    interrupt = SigtermAsInterrupt()
    interrupt.install()
    interrupted = False
    try:
        connect_ray(None)
        # ray.init sets a SIGTERM handler of its own, which calls sys.exit.
        interrupt.install()
        results = asyncio.run(run_harness(config))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        ray.shutdown()
    if interrupted:
        print(f"{PROG}: interrupted by {interrupt.signal.name}", file=sys.stderr)
        return interrupt.exit_code
    print(format_table(results))
    print(f"took {time.monotonic() - started:.0f} s")
    return 0 if all(result.clean for result in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
