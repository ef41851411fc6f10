"""The ingest lease on a real nats-server: one run at a time, standbys, crashes."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import nats
import nats.js.errors
import pytest
import ray
from nats.js.api import KeyValueConfig

from actors.partition import PartitionActor
from cluster.job import _lease_guard
from cluster.lease import (
    LEASE_BUCKET,
    LEASE_KEY,
    Holder,
    IngestLease,
    LeaseLostError,
    LeaseRetakenError,
    StoppedWaitingError,
    _create,
    _process_namespace,
)
from cluster.nats_server import EmbeddedNatsServer
from pipeline.checkpoints import MANIFEST, read_manifest
from pipeline.ingest import Ingest
from pipeline.publish import publish_all
from pipeline.settings import PipelineSettings
from pipeline.sources.generated import StreamSpec, generate
from pipeline.streams import CHECKPOINT_BUCKET, ensure_streams

TTL_S = 1.0


@asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def _store_holder(url: str, holder: Holder) -> None:
    async with jetstream(url) as js:
        kv = await js.create_key_value(
            KeyValueConfig(bucket=LEASE_BUCKET, history=1, ttl=TTL_S)
        )
        await kv.create(LEASE_KEY, msgspec.json.encode(holder))


def _exited_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_second_lease_waits_until_the_first_is_released(
    nats_server: EmbeddedNatsServer,
) -> None:
    async def scenario() -> None:
        async with jetstream(nats_server.url) as js:
            first = IngestLease(js, ttl_s=TTL_S)
            await first.acquire()
            second = IngestLease(js, ttl_s=TTL_S)
            waiting = asyncio.create_task(second.acquire())
            # Three TTLs: the first run renews, so the second keeps waiting.
            await asyncio.sleep(3 * TTL_S)
            assert not waiting.done()
            await first.release()
            await asyncio.wait_for(waiting, TTL_S)
            assert not first.lost.is_set()
            await second.release()

    asyncio.run(scenario())


def _seconds_to_take(url: str, holder: Holder, ttl_s: float) -> tuple[float, float]:
    """Store `holder` as the lease's holder, then time a new lease taking it.

    Return the seconds waited and the TTL the new lease ended up with.
    """

    async def scenario() -> tuple[float, float]:
        await _store_holder(url, holder)
        async with jetstream(url) as js:
            lease = IngestLease(js, ttl_s=ttl_s)
            started = time.monotonic()
            await asyncio.wait_for(lease.acquire(), 10 * TTL_S)
            waited = time.monotonic() - started
            await lease.release()
            return waited, lease.ttl_s

    return asyncio.run(scenario())


def test_vanished_holder_expires(nats_server: EmbeddedNatsServer) -> None:
    # A holder on another host cannot be checked, so only the TTL frees the lease.
    holder = Holder("elsewhere", 1, time.time())
    waited, _ = _seconds_to_take(nats_server.url, holder, TTL_S)
    assert waited >= TTL_S / 2


def test_exited_local_holder_replaced_at_once(
    nats_server: EmbeddedNatsServer,
) -> None:
    holder = Holder(
        socket.gethostname(), _exited_pid(), time.time(), _process_namespace()
    )
    # The 60 s requested here gives way to the bucket's TTL of 1 s. Taking the lease
    # of an exited process must not wait for that TTL at all.
    waited, ttl_s = _seconds_to_take(nats_server.url, holder, 60.0)
    assert ttl_s == TTL_S
    assert waited < TTL_S / 2


def test_other_namespace_holder_not_replaced(
    nats_server: EmbeddedNatsServer,
) -> None:
    # The same host name and an exited process id, but from another process id
    # namespace (a container on host networking): that id may name a live run there.
    holder = Holder(socket.gethostname(), _exited_pid(), time.time(), "other")
    waited, _ = _seconds_to_take(nats_server.url, holder, TTL_S)
    assert waited >= TTL_S / 2


def test_missed_renewals_set_lost(
    nats_server: EmbeddedNatsServer,
) -> None:
    async def scenario() -> None:
        async with jetstream(nats_server.url) as js:
            first = IngestLease(js, ttl_s=TTL_S)
            await first.acquire()
            # A paused process: no renewal until the lease has expired and a second
            # run took it.
            assert first._renewal is not None
            first._renewal.cancel()
            second = IngestLease(js, ttl_s=TTL_S)
            second.holder = Holder("elsewhere", 2, time.time())
            await asyncio.wait_for(second.acquire(), 10 * TTL_S)
            first._renewal = asyncio.create_task(first._renew())
            await asyncio.wait_for(first.lost.wait(), 2 * TTL_S)
            assert not second.lost.is_set()
            await first.release()
            await second.release()

    asyncio.run(scenario())


def test_check_before_commit_finds_a_lost_lease(
    nats_server: EmbeddedNatsServer,
) -> None:
    async def scenario() -> None:
        async with jetstream(nats_server.url) as js:
            first = IngestLease(js, ttl_s=TTL_S)
            await first.acquire()
            await first.check()  # still the holder, through its renewals
            await asyncio.sleep(TTL_S)
            await first.check()
            assert first._renewal is not None
            first._renewal.cancel()  # paused: the lease expires and moves on
            second = IngestLease(js, ttl_s=TTL_S)
            second.holder = Holder("elsewhere", 2, time.time())
            await asyncio.wait_for(second.acquire(), 10 * TTL_S)
            with pytest.raises(LeaseLostError, match="before committing"):
                await first.check()
            assert first.lost.is_set()
            await second.check()
            await second.release()

    asyncio.run(scenario())


def test_renewal_failure_logged_as_warning(
    nats_server: EmbeddedNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        nc = await nats.connect(nats_server.url, allow_reconnect=False)
        try:
            lease = IngestLease(nc.jetstream(timeout=TTL_S / 2), ttl_s=TTL_S)
            await lease.acquire()
            nats_server.stop()
            deadline = time.monotonic() + 10 * TTL_S
            while "could not renew the ingest lease" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text[-2000:]
                await asyncio.sleep(TTL_S / 10)
            # More renewals fail within a TTL, and only the first one logs a warning.
            await asyncio.sleep(TTL_S)
            await lease.release()
        finally:
            await nc.close()

    with caplog.at_level("DEBUG", logger="cluster.lease"):
        asyncio.run(scenario())
    failures = [
        record
        for record in caplog.records
        if record.getMessage().startswith("could not renew the ingest lease")
    ]
    assert len(failures) >= 2
    assert failures[0].levelname == "WARNING"
    assert {record.levelname for record in failures[1:]} == {"DEBUG"}


class _OutageServer:
    """A nats-server with a store folder, which a test stops for longer than the TTL."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.server = EmbeddedNatsServer(store_dir=store).start()

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()

    async def outage(
        self, lease: IngestLease, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Stop the server for three TTLs, start it again on its port, and wait until
        `lease` is taken again."""
        caplog.clear()
        self.server.stop()
        await asyncio.sleep(3 * TTL_S)
        self.server = EmbeddedNatsServer(
            store_dir=self.store, port=self.server.port
        ).start()
        deadline = time.monotonic() + 20 * TTL_S
        while "took it again" not in caplog.text:
            assert not lease.lost.is_set(), caplog.text[-2000:]
            assert time.monotonic() < deadline, caplog.text[-2000:]
            await asyncio.sleep(TTL_S / 10)


def test_lease_expired_in_outage_taken_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """NATS down for longer than the TTL: the lease expires, no other run takes it,
    and the run takes it again instead of stopping."""
    server = _OutageServer(tmp_path / "jetstream")

    async def scenario() -> None:
        nc = await nats.connect(
            server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1
        )
        try:
            lease = IngestLease(nc.jetstream(timeout=TTL_S / 2), ttl_s=TTL_S)
            await lease.acquire()
            await server.outage(lease, caplog)
            # The first check sends the ingest back to its last checkpoint, because
            # another run may have committed while the lease was free.
            with pytest.raises(LeaseRetakenError):
                await lease.check()
            await lease.check()
            await server.outage(lease, caplog)
            # An ingest that restored on its own after the outage is not sent back
            # again.
            lease.restoring()
            await lease.check()
            assert not lease.lost.is_set()
            await lease.release()
        finally:
            await nc.close()

    try:
        with caplog.at_level("INFO", logger="cluster.lease"):
            asyncio.run(scenario())
    finally:
        server.stop()


def test_retaken_lease_commits_on_unless_another_run_did(
    ray_local: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After an outage longer than the TTL, a run that takes the lease again goes back
    to its checkpoint only if the committed one changed meanwhile."""
    server = _OutageServer(tmp_path / "jetstream")
    actors = [PartitionActor.remote(0)]  # type: ignore[attr-defined]

    async def scenario() -> None:
        nc = await nats.connect(
            server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1
        )
        try:
            js = nc.jetstream(timeout=TTL_S / 2)
            settings = PipelineSettings(fetch_batch=50)
            await ensure_streams(js, settings)
            messages, _ = generate(StreamSpec(plants=1, orders_per_plant=5, seed=2))
            await publish_all(nc, ((m.subject, m.data, None) for m in messages))
            lease = IngestLease(js, ttl_s=TTL_S)
            await lease.acquire()
            ingest = Ingest(nc, actors, None, settings)
            guard = _lease_guard(lease, ingest)
            await ingest.start()
            await ingest.run(until_drained=True)

            await server.outage(lease, caplog)
            # Nothing committed while the lease was free: the commit goes ahead.
            await guard()

            await server.outage(lease, caplog)
            # Another run committed meanwhile: back to the checkpoint.
            checkpoints = await js.object_store(CHECKPOINT_BUCKET)
            manifest = await read_manifest(checkpoints)
            assert manifest is not None
            manifest.written_at += 1.0
            await checkpoints.put(MANIFEST, msgspec.json.encode(manifest))
            with pytest.raises(LeaseRetakenError):
                await guard()
            await lease.release()
        finally:
            await nc.close()

    try:
        with caplog.at_level("INFO", logger="cluster.lease"):
            asyncio.run(scenario())
    finally:
        for actor in actors:
            ray.kill(actor)
        server.stop()


def test_missing_lease_key_taken_again_at_check(
    nats_server: EmbeddedNatsServer,
) -> None:
    """A lease key that expired before the renewals took it again, as after a
    recovery that restored first, is taken at the check instead of read as lost."""

    async def scenario() -> None:
        async with jetstream(nats_server.url) as js:
            lease = IngestLease(js, ttl_s=TTL_S)
            await lease.acquire()
            kv = await js.key_value(LEASE_BUCKET)
            await kv.purge(LEASE_KEY)
            with pytest.raises(LeaseRetakenError):
                await lease.check()
            await lease.check()
            assert not lease.lost.is_set()
            await lease.release()

    asyncio.run(scenario())


def test_standby_waits_out_a_nats_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "jetstream"
    server = EmbeddedNatsServer(store_dir=store).start()

    async def scenario() -> None:
        nonlocal server
        first_nc = await nats.connect(server.url, max_reconnect_attempts=-1)
        standby_nc = await nats.connect(
            server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1
        )
        try:
            first = IngestLease(first_nc.jetstream(timeout=TTL_S), ttl_s=TTL_S)
            await first.acquire()
            standby = IngestLease(standby_nc.jetstream(timeout=TTL_S), ttl_s=TTL_S)
            waiting = asyncio.create_task(standby.acquire())
            await asyncio.sleep(TTL_S)
            server.stop()
            # The first run ends during the outage, so its lease expires and the
            # standby takes over once NATS is back.
            await first_nc.close()
            await asyncio.sleep(3 * TTL_S)
            assert not waiting.done()
            server = EmbeddedNatsServer(store_dir=store, port=server.port).start()
            await asyncio.wait_for(waiting, 30 * TTL_S)
            assert "cannot reach NATS while waiting for the ingest lease" in caplog.text
            await standby.release()
        finally:
            await first_nc.close()
            await standby_nc.close()

    try:
        with caplog.at_level("INFO", logger="cluster.lease"):
            asyncio.run(scenario())
    finally:
        server.stop()


def test_standby_stops_when_asked(nats_server: EmbeddedNatsServer) -> None:
    async def scenario() -> None:
        async with jetstream(nats_server.url) as js:
            first = IngestLease(js, ttl_s=TTL_S)
            await first.acquire()
            stop = asyncio.Event()
            standby = asyncio.create_task(IngestLease(js, ttl_s=TTL_S).acquire(stop))
            await asyncio.sleep(TTL_S / 2)
            stop.set()
            with pytest.raises(StoppedWaitingError, match="processed nothing"):
                await asyncio.wait_for(standby, 2 * TTL_S)
            await first.release()

    asyncio.run(scenario())


def _wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while text not in log.read_text(encoding="utf-8"):
        assert process.poll() is None, log.read_text(encoding="utf-8")[-2000:]
        assert time.monotonic() < deadline, f"no {text!r} in {log}"
        time.sleep(0.2)


def test_second_run_waits_as_standby(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "cluster.cli", "run", "--nats-url"]
                + [nats_server.url, "--db", str(tmp_path / f"{name}.duckdb"), *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        processes.append(process)
        return process, log

    try:
        first, first_log = start("first")
        _wait_for_line(first_log, "took the ingest lease", first)
        second, second_log = start("second", "--until-drained")
        _wait_for_line(
            second_log, "another plantstream run has the ingest lease", second
        )
        assert f"process {first.pid} on host" in second_log.read_text(encoding="utf-8")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
        # The first run released the lease, so the standby takes it and drains.
        assert second.wait(timeout=120) == 0, second_log.read_text()[-2000:]
        assert "took the ingest lease" in second_log.read_text(encoding="utf-8")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


class _RacingBucket:
    """A key-value bucket whose create fails as nats-py's does when another run
    writes the deleted key between its two requests."""

    def __init__(self, err_code: int) -> None:
        self.err_code = err_code

    async def create(self, key: str, value: bytes) -> int:
        raise nats.js.errors.BadRequestError(
            code=400, err_code=self.err_code, description="wrong last sequence: 3"
        )


def test_create_race_means_key_taken() -> None:
    racing = _RacingBucket(10071)
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        asyncio.run(_create(racing, LEASE_KEY, b"{}"))  # type: ignore[arg-type]
    other = _RacingBucket(10999)
    with pytest.raises(nats.js.errors.BadRequestError) as caught:
        asyncio.run(_create(other, LEASE_KEY, b"{}"))  # type: ignore[arg-type]
    assert not isinstance(caught.value, nats.js.errors.KeyWrongLastSequenceError)
