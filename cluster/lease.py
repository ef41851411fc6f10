"""The ingest lease: one `plantstream run` at a time per NATS server.

Two runs on one server would split the plant events stream between them and overwrite
each other's checkpoints, because the durable consumer and the checkpoint bucket are
shared. A run therefore stores its host and process id under one key of the JetStream
key-value bucket `plantstream-leases` and renews the key every few seconds. The
bucket's TTL removes the key of a run that stopped renewing, so a second run waits as a
standby and takes over within `ttl_s` after the first one stops. If the key names a
process of this host that no longer exists, a run takes the lease at once, so a
restart after a crash does not wait for the TTL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

logger = logging.getLogger(__name__)

__all__ = [
    "LEASE_BUCKET",
    "IngestLease",
    "LeaseLostError",
    "LeaseRetakenError",
    "StoppedWaitingError",
    "lease_holder",
]

LEASE_BUCKET = "plantstream-leases"
LEASE_KEY = "ingest"
DEFAULT_TTL_S = 10.0


class LeaseLostError(RuntimeError):
    """Another run took the ingest lease, so this one must stop processing."""


class LeaseRetakenError(ConnectionError):
    """The lease expired while NATS was unreachable, and this run took it again.

    Another run may have held the lease and committed checkpoints in the meantime.
    `plantstream run` then resumes from the last committed checkpoint, which the ingest
    does for every ConnectionError, unless that checkpoint is still its own
    (`cluster.job._lease_guard`).
    """


class StoppedWaitingError(RuntimeError):
    """The run was asked to stop while it waited as a standby for the lease."""


class Holder(msgspec.Struct):
    host: str
    pid: int
    since: float
    """Seconds since the epoch when the holder took the lease."""
    processes: str = ""
    """The boot id and the process id namespace, on Linux: a process id names the same
    process only within them. Empty where they cannot be read."""

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"process {self.pid} on host {self.host}, holding it since {started}"


class IngestLease:
    """Take, renew and release the ingest lease on one NATS server."""

    def __init__(self, js: JetStreamContext, *, ttl_s: float = DEFAULT_TTL_S) -> None:
        if ttl_s <= 0:
            raise ValueError(f"the lease TTL must be positive, got {ttl_s:g} s")
        self.js = js
        self.ttl_s = ttl_s
        self.holder = Holder(
            socket.gethostname(), os.getpid(), time.time(), _process_namespace()
        )
        self._kv: KeyValue | None = None
        self._revision = 0
        self._renewal: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()
        """Set when another run took the lease; the holder must stop at once."""
        self._retaken = False

    async def acquire(self, stop: asyncio.Event | None = None) -> None:
        """Take the lease, waiting while another live run has it.

        A standby also waits out an outage of NATS, because the lease may be free
        when NATS returns. Raises StoppedWaitingError if `stop` is set before the
        lease is free.
        """
        self._kv = await self._bucket()
        warned = False
        unreachable = False
        while True:
            try:
                other = await self._try_take()
            except (TimeoutError, nats.errors.Error) as error:
                if not unreachable:
                    logger.warning(
                        "cannot reach NATS while waiting for the ingest lease (%s); "
                        "retrying every %g s",
                        error or type(error).__name__,
                        self.ttl_s / 4,
                    )
                    unreachable = True
                await self._pause(stop)
                continue
            if other is None:
                break
            if unreachable:
                logger.info("reached NATS again; still waiting for the ingest lease")
                unreachable = False
            if not warned:
                logger.warning(
                    "another plantstream run has the ingest lease (%s); this run "
                    "waits as a standby and takes over within %g s after that run "
                    "stops. Only one run may consume the plant events stream of a "
                    "NATS server",
                    other.describe(),
                    self.ttl_s,
                )
                warned = True
            await self._pause(stop)
        logger.info("took the ingest lease (TTL %g s)", self.ttl_s)
        self._renewal = asyncio.create_task(self._renew())

    async def _try_take(self) -> Holder | None:
        """Take the lease if it is free or its holder has exited, and return None.
        Otherwise return the live holder."""
        assert self._kv is not None
        while True:
            self.holder.since = time.time()
            value = msgspec.json.encode(self.holder)
            try:
                self._revision = await _create(self._kv, LEASE_KEY, value)
                return None
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await self._kv.get(LEASE_KEY)
            except nats.js.errors.KeyNotFoundError:
                continue  # expired or released between the two calls
            other = msgspec.json.decode(entry.value or b"{}", type=Holder)
            if not _is_dead_local_process(other):
                return other
            logger.info("taking the ingest lease of %s, which has exited",
                        other.describe())  # fmt: skip
            try:
                self._revision = await self._kv.update(
                    LEASE_KEY, value, last=entry.revision
                )
                return None
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another standby took it first

    async def _pause(self, stop: asyncio.Event | None) -> None:
        """Wait a quarter of the TTL, or raise StoppedWaitingError if `stop` is set."""
        if stop is None:
            await asyncio.sleep(self.ttl_s / 4)
            return
        try:
            await asyncio.wait_for(stop.wait(), self.ttl_s / 4)
        except TimeoutError:
            return
        raise StoppedWaitingError(
            "stopped while waiting for the ingest lease; this run processed nothing"
        )

    async def _bucket(self) -> KeyValue:
        try:
            kv = await self.js.key_value(LEASE_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            try:
                return await self.js.create_key_value(
                    KeyValueConfig(bucket=LEASE_BUCKET, history=1, ttl=self.ttl_s)
                )
            except nats.js.errors.BadRequestError:
                kv = await self.js.key_value(LEASE_BUCKET)  # another run made it first
        # Every run renews well within the TTL the bucket was created with, even if
        # it was configured with another one.
        ttl = (await kv.status()).ttl
        if ttl and ttl != self.ttl_s:
            logger.info("the lease bucket %s has a TTL of %g s, not %g s; using it",
                        LEASE_BUCKET, ttl, self.ttl_s)  # fmt: skip
            self.ttl_s = ttl
        return kv

    async def check(self) -> None:
        """Raise LeaseLostError unless this run still has the lease.

        The ingest calls it just before each checkpoint's commit point, so that a run
        paused past the TTL does not commit over the run that took over.
        """
        assert self._kv is not None
        if self._retaken:
            self._retaken = False
            raise LeaseRetakenError(
                "the ingest lease expired and was taken again, so this run resumes "
                "from its last committed checkpoint instead of committing"
            )
        # TODO: the check and the commit are two requests, so a pause between them can
        # still let one commit through. A conditional write of the manifest would close
        # that gap.
        try:
            entry = await self._kv.get(LEASE_KEY)
        except nats.js.errors.KeyNotFoundError:
            entry = None
        if entry is None and await self._take_expired():
            # The lease expired during an outage and the renewals have not taken it
            # again yet, as after a recovery that restored before they ran.
            raise LeaseRetakenError(
                "the ingest lease had expired and this run took it again, so it "
                "resumes from its last committed checkpoint instead of committing"
            )
        # The holder, not the revision: a renewal in flight may have moved the
        # revision past the one this run recorded.
        holder = None
        if entry is not None and entry.value:
            holder = msgspec.json.decode(entry.value, type=Holder)
        if holder != self.holder:
            self.lost.set()
            raise LeaseLostError(
                "another plantstream run took the ingest lease while this one could "
                "not renew it; this run stopped before committing its checkpoint"
            )

    async def _renew(self) -> None:
        assert self._kv is not None
        value = msgspec.json.encode(self.holder)
        failures = 0
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                self._revision = await self._kv.update(
                    LEASE_KEY, value, last=self._revision
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                if await self._after_conflict(value):
                    continue
                logger.error(
                    "lost the ingest lease: it expired while this run could not "
                    "renew it, and another run took it; this run stops"
                )
                self.lost.set()
                return
            except (TimeoutError, nats.errors.Error) as error:
                # Usually NATS is unreachable for every run alike, and the next
                # renewal tries again. If another run takes the expired lease in the
                # meantime, the next renewal is rejected and _after_conflict finds it.
                failures += 1
                logger.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "could not renew the ingest lease (TTL %g s), retrying every "
                    "%g s: %s",
                    self.ttl_s,
                    self.ttl_s / 3,
                    error,
                )
            else:
                if failures:
                    logger.info("renewed the ingest lease after %d failures", failures)
                failures = 0

    async def _after_conflict(self, value: bytes) -> bool:
        """Find out why a renewal was rejected.

        Return False if another run has the lease. Return True if this run still has
        it, has taken it again, or cannot tell yet.
        """
        assert self._kv is not None
        try:
            try:
                entry = await self._kv.get(LEASE_KEY)
            except nats.js.errors.KeyNotFoundError:
                entry = None
            if entry is not None and entry.value:
                if msgspec.json.decode(entry.value, type=Holder) != self.holder:
                    return False
                # An earlier renewal was stored, but its reply was lost.
                self._revision = entry.revision or self._revision
                return True
            self._revision = await _create(self._kv, LEASE_KEY, value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False  # another run created it between the two requests
        except (TimeoutError, nats.errors.Error) as error:
            logger.debug(
                "reading the ingest lease failed, retrying at the next renewal: %s",
                error,
            )
            return True  # the next renewal finds out
        self._retaken = True
        logger.warning(
            "the ingest lease expired while NATS was unreachable, and no other run "
            "had it; this run took it again, and goes back to its last checkpoint if "
            "another run committed meanwhile"
        )
        return True

    async def _take_expired(self) -> bool:
        """Create the lease key, which was missing. Return False if another run created
        it first."""
        assert self._kv is not None
        try:
            self._revision = await _create(
                self._kv, LEASE_KEY, msgspec.json.encode(self.holder)
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        logger.warning(
            "the ingest lease had expired and no other run had it; this run took it "
            "again, and goes back to its last checkpoint if another run committed "
            "meanwhile"
        )
        return True

    def restoring(self) -> None:
        """Record that the ingest is about to restore the committed checkpoint.

        A lease taken again before this needs no further recovery: whatever another
        run committed meanwhile is in the checkpoint restored now.
        """
        self._retaken = False

    async def release(self) -> None:
        """Stop renewing and delete the lease, so a standby takes over at once."""
        if self._renewal is not None:
            self._renewal.cancel()
            await asyncio.gather(self._renewal, return_exceptions=True)
            self._renewal = None
        if self._kv is None or self.lost.is_set():
            return
        try:
            await self._kv.delete(LEASE_KEY, last=self._revision)
            logger.info("released the ingest lease")
        except (TimeoutError, nats.errors.Error) as error:
            # The TTL removes the key anyway.
            logger.debug("could not release the ingest lease: %s", error)


async def lease_holder(js: JetStreamContext) -> Holder | None:
    """Return the run that holds the ingest lease, or None if no live run does.

    A holder that is a process of this host that has exited counts as none, as it does
    for a run taking the lease.
    """
    try:
        kv = await js.key_value(LEASE_BUCKET)
        entry = await kv.get(LEASE_KEY)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
        return None
    holder = msgspec.json.decode(entry.value or b"{}", type=Holder)
    return None if _is_dead_local_process(holder) else holder


_WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code for a write whose expected last sequence is not the key's."""


async def _create(kv: KeyValue, key: str, value: bytes) -> int:
    """Create `key` unless it exists; raise KeyWrongLastSequenceError if it does."""
    try:
        return await kv.create(key, value)
    except nats.js.errors.KeyWrongLastSequenceError:
        raise
    except nats.js.errors.BadRequestError as error:
        # nats-py 2.16 writes over a deleted or expired key with the revision it
        # read. Another run writing in between fails that second request with a
        # plain BadRequestError, which means the same as the first.
        if error.err_code != _WRONG_LAST_SEQUENCE:
            raise
        raise nats.js.errors.KeyWrongLastSequenceError(error.description) from error


def _process_namespace() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _is_dead_local_process(holder: Holder) -> bool:
    # Containers and cloned machines can share a host name, so a process id is
    # checked only in the same boot and process id namespace as this process.
    namespace = _process_namespace()
    if (
        holder.host != socket.gethostname()
        or not namespace
        or holder.processes != namespace
        or holder.pid == os.getpid()
    ):
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists, under another user
    return False
