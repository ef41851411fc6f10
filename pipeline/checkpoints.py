"""The checkpoint store: each partition's saved state, and the manifest that commits it.

The object store bucket plantstream-checkpoints contains:

- `manifest`, the commit point: the stream sequence the checkpoint covers and the
  names of the objects that contain each partition (`CheckpointManifest`);
- per partition, a state object (ids, machines, parked events, clocks, counts) and a
  chain of orders objects: a base with every order, then deltas with the orders
  changed since the object before.

A checkpoint writes new objects under names the committed manifest does not use, then
the manifest. A crash before the manifest leaves the previous checkpoint whole. Names
are reused (two slots each), so the bucket keeps a bounded number of objects instead of
one more per checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import msgspec
from nats.js.errors import DigestMismatchError, NotFoundError
from nats.js.object_store import ObjectStore

__all__ = [
    "MANIFEST",
    "MAX_DELTAS",
    "CheckpointChains",
    "CheckpointManifest",
    "CheckpointMismatchError",
    "PartitionObjects",
    "SavedPartition",
    "object_names",
    "read_manifest",
    "read_partitions",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest"

MAX_DELTAS = 30
"""Deltas after which a partition writes a new base, even if they are small. A restore
reads the whole chain, so this bounds its object count."""

DELTAS_PER_BASE = 2
"""A partition writes a new base once its deltas add up to this many times the bytes
of its base. With N orders of which a share f change between two checkpoints, a
checkpoint then serialises about 1.5 f N orders on average instead of N, and a restore
reads at most about 3 N."""

_SLOTS = ("a", "b")

_START_AGAIN = (
    "Delete the object store bucket plantstream-checkpoints with `plantstream "
    "checkpoints reset --nats-url URL --yes` and start again, which replays the plant "
    "events stream from sequence 1"
)


class CheckpointMismatchError(ValueError):
    """The stored checkpoint does not fit this run: another partition count, a format
    this version cannot read, or a missing object. Retrying cannot help, so the start
    stops."""


class PartitionObjects(msgspec.Struct):
    """The objects that contain one partition in a committed checkpoint."""

    state: str
    orders: list[str]
    """The orders base first, then its deltas in the order written."""
    sizes: list[int]
    """Bytes of each orders object, which decide when to write a new base."""
    digests: list[str] = []
    """The object store's SHA-256 digest of the state object, then of each orders
    object. A start compares them, so an object replaced after the checkpoint, even
    by one of the same size, is found before it is restored."""


class CheckpointManifest(msgspec.Struct):
    """The commit record of a checkpoint, which covers every message to `stream_seq`."""

    stream_seq: int
    partitions: int
    written_at: float
    ingest_counts: dict[str, int] = {}
    """Counts kept by the ingest itself (messages rejected before any partition)."""
    objects: list[PartitionObjects] = []
    """Per partition. Empty in manifests of plantstream versions that stored each
    partition whole in one object, `partition-<index>`."""
    site_seqs: dict[str, int] = {}
    """The highest sequence of each site stream among the messages covered, from
    which the next run goes on looking for messages a site lost."""


@dataclass(frozen=True)
class SavedPartition:
    """One partition as stored: its state and its orders parts, base first."""

    state: bytes
    orders: list[bytes]


async def read_manifest(store: ObjectStore) -> CheckpointManifest | None:
    """Return the committed manifest, or None when nothing was committed yet."""
    try:
        result = await store.get(MANIFEST)
    except NotFoundError:
        return None
    try:
        manifest = msgspec.json.decode(result.data or b"", type=CheckpointManifest)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise CheckpointMismatchError(
            f"the checkpoint manifest cannot be read ({error}), so the object store "
            f"bucket plantstream-checkpoints is damaged. {_START_AGAIN}"
        ) from error
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise CheckpointMismatchError(
            f"the checkpoint manifest is invalid: {problem}, so the object store "
            f"bucket plantstream-checkpoints is damaged. {_START_AGAIN}"
        )
    return manifest


def _manifest_problem(manifest: CheckpointManifest) -> str | None:
    if manifest.objects and len(manifest.objects) != manifest.partitions:
        return (
            f"it names objects for {len(manifest.objects)} partitions but has "
            f"{manifest.partitions}"
        )
    for index, objects in enumerate(manifest.objects):
        if not objects.orders or len(objects.sizes) != len(objects.orders):
            return (
                f"partition {index} has {len(objects.orders)} orders objects and "
                f"{len(objects.sizes)} sizes"
            )
        if objects.digests and len(objects.digests) != 1 + len(objects.orders):
            return (
                f"partition {index} has {len(objects.digests)} digests for "
                f"{1 + len(objects.orders)} objects"
            )
    return None


def object_names(manifest: CheckpointManifest, partition: int) -> list[str]:
    """Return the names of the objects that contain `partition` in `manifest`."""
    if not manifest.objects:
        return [_legacy_name(partition)]
    objects = manifest.objects[partition]
    return [objects.state, *objects.orders]


async def read_partitions(
    store: ObjectStore, manifest: CheckpointManifest
) -> list[SavedPartition]:
    """Return every partition of the committed checkpoint, in partition order."""
    if not manifest.objects:
        return [
            SavedPartition(await _read(store, _legacy_name(index)), [])
            for index in range(manifest.partitions)
        ]
    saved = []
    for objects in manifest.objects:
        names = [objects.state, *objects.orders]
        digests = objects.digests or [""] * len(names)
        parts = [
            await _read(store, name, digest)
            for name, digest in zip(names, digests, strict=True)
        ]
        for name, data, size in zip(
            objects.orders, parts[1:], objects.sizes, strict=True
        ):
            if len(data) != size:
                raise CheckpointMismatchError(
                    f"checkpoint object {name} has {len(data)} bytes but the manifest "
                    f"recorded {size}, so it was replaced after the checkpoint. "
                    f"{_START_AGAIN}"
                )
        saved.append(SavedPartition(parts[0], parts[1:]))
    return saved


async def _read(store: ObjectStore, name: str, digest: str = "") -> bytes:
    try:
        result = await store.get(name)
    except NotFoundError:
        raise CheckpointMismatchError(
            f"checkpoint object {name} named by the manifest is missing from the "
            f"object store bucket plantstream-checkpoints. {_START_AGAIN}"
        ) from None
    except DigestMismatchError:
        # nats-py compares the chunks it read with the object's own digest: the
        # stored bytes changed under the object. A NATS error would be retried
        # forever, and retrying cannot repair it.
        raise CheckpointMismatchError(
            f"checkpoint object {name} in the object store bucket "
            "plantstream-checkpoints does not match its own digest, so its stored "
            f"chunks are damaged. {_START_AGAIN}"
        ) from None
    if digest and result.info.digest != digest:
        raise CheckpointMismatchError(
            f"checkpoint object {name} has digest {result.info.digest} but the "
            f"manifest recorded {digest}, so it was replaced after the checkpoint. "
            f"{_START_AGAIN}"
        )
    return result.data or b""


class CheckpointChains:
    """The objects of each partition's committed checkpoint, and the names for the
    next one."""

    def __init__(self, manifest: CheckpointManifest | None, partitions: int) -> None:
        committed: list[PartitionObjects | None] = [None] * partitions
        if manifest is not None and manifest.objects:
            # With another partition count the run splits the committed partitions
            # (`actors.repartition`). Their objects stay until the next manifest
            # replaces them, so the new ones take the other slots, and every chain
            # starts with a base.
            for index, objects in enumerate(manifest.objects[:partitions]):
                committed[index] = objects
        self._committed = committed
        self._rebase = manifest is not None and manifest.partitions != partitions
        self._shrunk = manifest is not None and manifest.partitions > partitions
        """Whether objects of partitions beyond this run's count are left, to delete
        once a manifest without them is committed."""
        self._legacy = manifest is not None and not manifest.objects

    @property
    def rebasing(self) -> bool:
        """Whether the committed checkpoint has another partition count than this
        run, until the first checkpoint of this run is committed."""
        return self._rebase

    def wants_base(self, partition: int) -> bool:
        """Return whether the next orders part of `partition` is a base."""
        objects = self._committed[partition]
        if objects is None or self._rebase:
            return True
        deltas = objects.sizes[1:]
        return (
            len(deltas) >= MAX_DELTAS
            or sum(deltas) >= DELTAS_PER_BASE * objects.sizes[0]
        )

    async def store(
        self,
        store: ObjectStore,
        partition: int,
        state: bytes,
        orders: bytes,
        *,
        base: bool,
    ) -> PartitionObjects:
        """Put a partition's new objects under names the committed manifest does not
        use; return what the next manifest should name."""
        committed = self._committed[partition]
        if committed is None and not base:
            raise ValueError(
                f"partition {partition} has no committed orders base, so its first "
                "checkpoint needs base=True"
            )

        state_slot = _SLOTS[0]
        chain_slot = _SLOTS[0]
        if committed is not None:
            state_slot = _other_slot(_slot_of(committed.state))
            chain_slot = _slot_of(committed.orders[0])
            if base:
                chain_slot = _other_slot(chain_slot)
        if base or committed is None:
            names: list[str] = []
            sizes: list[int] = []
        else:
            names = list(committed.orders)
            sizes = list(committed.sizes)

        name = f"partition-{partition}-orders-{chain_slot}-{len(names)}"
        state_name = f"partition-{partition}-state-{state_slot}"
        state_info = await store.put(state_name, state)
        orders_info = await store.put(name, orders)

        # The state's digest first, then the chain's. A chain committed without
        # digests gets empty ones, which a start does not compare.
        digests = committed.digests[1:] if committed and not base else []
        if len(digests) != len(names):
            digests = [""] * len(names)
        return PartitionObjects(
            state_name,
            [*names, name],
            [*sizes, len(orders)],
            [state_info.digest or "", *digests, orders_info.digest or ""],
        )

    async def commit(self, store: ObjectStore, manifest: CheckpointManifest) -> None:
        """Put the manifest, the commit point, and make its objects the current ones."""
        await store.put(MANIFEST, msgspec.json.encode(manifest))
        self._committed = list(manifest.objects)
        self._rebase = False
        if self._legacy:
            # Objects of a version that stored each partition whole are named by no
            # manifest any more.
            self._legacy = False
            for index in range(manifest.partitions):
                try:
                    await store.delete(_legacy_name(index))
                except NotFoundError:
                    pass
            logger.info(
                "deleted the %d checkpoint objects of the one-object format",
                manifest.partitions,
            )
        if self._shrunk:
            self._shrunk = False
            await self._delete_beyond(store, manifest.partitions)

    async def _delete_beyond(self, store: ObjectStore, partitions: int) -> None:
        """Delete the objects of partitions at or above `partitions`: each partition
        keeps objects in two slots, and the manifest names only one of them."""
        try:
            infos = await store.list(ignore_deletes=True)
        except NotFoundError:
            return
        names = [
            info.name
            for info in infos
            if (index := _partition_of_name(info.name)) is not None
            and index >= partitions
        ]
        for name in names:
            try:
                await store.delete(name)
            except NotFoundError:
                pass
        logger.info(
            "deleted %d checkpoint objects of partitions beyond the %d of this run",
            len(names),
            partitions,
        )


def _partition_of_name(name: str) -> int | None:
    """Return the partition of an object named "partition-<index>..." or None."""
    fields = name.split("-")
    if len(fields) < 2 or fields[0] != "partition" or not fields[1].isdigit():
        return None
    return int(fields[1])


def _legacy_name(partition: int) -> str:
    return f"partition-{partition}"


def _slot_of(name: str) -> str:
    # The fourth field of "partition-0-state-a" and of "partition-0-orders-a-3".
    return name.split("-")[3]


def _other_slot(slot: str) -> str:
    return _SLOTS[1] if slot == _SLOTS[0] else _SLOTS[0]
