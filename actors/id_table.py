"""A bounded map from 64-bit hashes to 32-bit values that drops its oldest entries.

A dict from 64-bit int keys to 30-bit int values costs 106 to 117 bytes per entry (two
int objects and the dict's own slots; measured with tracemalloc on CPython 3.11 for
100,000 to 2,000,000 entries), so 2,000,000 remembered event ids per partition would
take about 210 MB. `IdTable` keeps the same map in flat arrays, at 21 to 24 bytes per
entry by the same measurement:

- a ring of keys and a ring of values in insertion order, so the oldest entry is the
  one at `_head` once the ring is full;
- an open-addressing index with linear probing, whose slots hold a ring position + 1
  (0 is an empty slot) and which stays at most half full.

Keys must be uniformly distributed (a blake2b digest), because the index uses their low
bits as the home slot. Key 0 marks a forgotten ring position, so `stable_hash` never
returns it.

New entries take the ring positions in turn: the k-th entry the table ever added (k
from 0) is at position k % max_entries. So the entries added since a checkpoint are one
run of positions, which `take_changes` copies with two slices, and a checkpoint stores
those instead of the whole table.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Iterator, Sequence

import msgspec

__all__ = [
    "BLAKE2B_64",
    "IdTable",
    "IdTableChanges",
    "IdTableData",
    "add_packed_id",
    "find_packed_id",
    "event_hash",
    "stable_hash",
]

_MIN_SLOTS = 8
_MAX_VALUE = 0xFFFF_FFFF

if array("I").itemsize != 4 or array("Q").itemsize != 8:
    raise ImportError(
        "actors.id_table needs 4-byte array('I') and 8-byte array('Q') items; this "
        f"platform has {array('I').itemsize} and {array('Q').itemsize}"
    )


BLAKE2B_64 = hashlib.blake2b(digest_size=8)
"""An empty 8-byte blake2b to copy. Copying took a fifth less time than creating one,
and this runs once or twice per event."""


def stable_hash(text: str) -> int:
    """Return a 64-bit blake2b hash of `text`, never 0, the same in every process.

    Python's hash() of a str changes per process, but these hashes are checkpointed.
    """
    hasher = BLAKE2B_64.copy()
    hasher.update(text.encode())
    return int.from_bytes(hasher.digest(), "little") or 1


def event_hash(plant: str, event_id: str) -> int:
    """Return the 64-bit key under which `plant`'s event `event_id` is remembered.

    Event ids are unique within a plant only: the MES of two plants may both number
    their events from E000001, so an id alone would make one plant's events look like
    reused ids of another's.
    """
    return stable_hash(f"{plant}\x1f{event_id}")


PACKED_ID_SIZE = 12
"""Bytes per entry of a packed id list: the 64-bit key, then the 32-bit value, both
little-endian."""


def add_packed_id(packed: bytes, key: int, value: int) -> bytes:
    """Return `packed` with (key, value) appended.

    A packed id list is a short bytes object of 12-byte entries: 33 bytes plus 12 per
    entry, where a dict of the same pairs costs about 64 bytes per entry plus the dict.
    For the few dozen entries of one order, copying it to append is cheap.
    """
    return packed + key.to_bytes(8, "little") + value.to_bytes(4, "little")


def find_packed_id(packed: bytes, key: int) -> int | None:
    """Return the value of `key` in a packed id list, or None when it has none."""
    if not packed:
        return None
    needle = key.to_bytes(8, "little")
    start = packed.find(needle)
    while start >= 0:
        if start % PACKED_ID_SIZE == 0:
            return int.from_bytes(packed[start + 8 : start + 12], "little")
        # The match straddles two entries; look on from the next byte.
        start = packed.find(needle, start + 1)
    return None


def _check_entry(key: int, value: int) -> None:
    if not key:
        raise ValueError("id table key 0 is reserved for forgotten entries")
    if not 0 <= value <= _MAX_VALUE:
        raise ValueError(f"id table values are 0 to {_MAX_VALUE}, got {value}")


def _from_little_endian(
    keys_data: bytes, values_data: bytes, part: str
) -> tuple[array[int], array[int]]:
    """Return the key and value arrays of a checkpointed id table or its changes."""
    keys = array("Q", keys_data)
    values = array("I", values_data)
    if len(keys) != len(values):
        raise ValueError(
            f"id table {part} has {len(keys)} keys but {len(values)} values, so the "
            "checkpoint that contains it is damaged"
        )
    if sys.byteorder == "big":
        keys.byteswap()
        values.byteswap()
    return keys, values


class IdTableData(msgspec.Struct, array_like=True):
    """An `IdTable` in a checkpoint: little-endian keys (8 bytes) and values (4 bytes),
    oldest entry first."""

    max_entries: int
    keys: bytes = b""
    values: bytes = b""


class IdTableChanges(msgspec.Struct, array_like=True):
    """The entries an `IdTable` added since its last mark, oldest first, as
    little-endian keys (8 bytes) and values (4 bytes), and the keys it popped."""

    keys: bytes = b""
    values: bytes = b""
    pops: list[tuple[int, int]] = []
    """Pairs of (entries added before the pop, key), in the order of the pops. A key
    0 in `keys` is an entry popped since."""


class IdTable:
    """A map of 64-bit keys to 32-bit values that keeps its newest `max_entries`.

    Setting a key that is present changes its value and keeps its age, as a dict does.
    """

    def __init__(self, max_entries: int) -> None:
        if not 1 <= max_entries < _MAX_VALUE:
            raise ValueError(
                f"id table size must be between 1 and {_MAX_VALUE - 1} entries, got "
                f"{max_entries}"
            )
        self.max_entries = max_entries
        self._keys = array("Q")
        self._values = array("I")
        self._head = 0
        self._live = 0
        self._slots = array("I", bytes(4 * _MIN_SLOTS))
        self._mask = _MIN_SLOTS - 1
        self.forgotten = 0
        """Entries dropped to make room since the owner last reset this count."""
        self.dropped = False
        """Whether the table ever dropped an entry to make room, here or before the
        checkpoint it was restored from."""
        # For take_changes: entries ever added, the count at the last mark, the pops
        # since, and whether a put changed the value of a present key since.
        self._added = 0
        self._marked = 0
        self._pops: list[tuple[int, int]] = []
        self._rewritten = False

    def __len__(self) -> int:
        return self._live

    def __contains__(self, key: int) -> bool:
        return self._find(key) >= 0

    def get(self, key: int) -> int | None:
        """Return the value of `key`, or None when the table does not contain it."""
        index = self._find(key)
        if index < 0:
            return None
        return self._values[self._slots[index] - 1]

    def get_or_put(self, key: int, value: int) -> int | None:
        """Return the value of `key` if present; otherwise set it to `value` and
        return None.

        One probe where get() then put() take two, for the common case of a new key
        in a table that is neither full nor due to grow.
        """
        index = self._probe(key)
        position = self._slots[index]
        if position:
            return self._values[position - 1]
        keys = self._keys
        if len(keys) < self.max_entries and (self._live + 1) * 2 <= len(self._slots):
            _check_entry(key, value)
            keys.append(key)
            self._values.append(value)
            self._slots[index] = len(keys)
            self._live += 1
            self._added += 1
        else:
            self.put(key, value)
        return None

    def put(self, key: int, value: int) -> bool:
        """Set `key` to `value`; return True when the oldest entry was forgotten for it.

        A full table drops its oldest entry even when `key` is present, because it
        clears that entry before it looks for `key`.

        Raises ValueError for key 0 or a value that does not fit 32 bits unsigned.
        """
        _check_entry(key, value)
        full = len(self._keys) == self.max_entries
        forgotten = False
        if full:
            # Forget the oldest entry before the probe, because clearing it may shift
            # the probe run the new key goes into. Its ring position stays free (key
            # 0) until a new key takes it.
            oldest = self._keys[self._head]
            if oldest and oldest != key:
                self._clear(self._find(oldest))
                self._keys[self._head] = 0
                forgotten = True
                self.forgotten += 1
                self.dropped = True
        if (self._live + 1) * 2 > len(self._slots):
            self._resize(len(self._slots) * 2)
        slots = self._slots
        keys = self._keys
        index = self._probe(key)
        position = slots[index]
        if position:
            self._values[position - 1] = value
            self._rewritten = True
            return forgotten
        if full:
            position = self._head
            self._head = (position + 1) % self.max_entries
            keys[position] = key
            self._values[position] = value
        else:
            position = len(keys)
            keys.append(key)
            self._values.append(value)
        slots[index] = position + 1
        self._live += 1
        self._added += 1
        return forgotten

    def pop(self, key: int) -> int | None:
        """Drop `key` and return its value, or None when the table lacks it."""
        index = self._find(key)
        if index < 0:
            return None
        position = self._slots[index] - 1
        self._keys[position] = 0
        self._clear(index)
        self._pops.append((self._added - self._marked, key))
        return self._values[position]

    def items(self) -> Iterator[tuple[int, int]]:
        """Yield (key, value) pairs, oldest first."""
        order: Sequence[int] = range(len(self._keys))
        if len(self._keys) == self.max_entries:
            order = [*range(self._head, self.max_entries), *range(self._head)]
        for position in order:
            key = self._keys[position]
            if key:
                yield key, self._values[position]

    def to_data(self) -> IdTableData:
        if self._live == len(self._keys):
            # No forgotten positions in the ring: reorder it with two slices instead
            # of a Python loop over every entry, which took tens of milliseconds.
            head = self._head if len(self._keys) == self.max_entries else 0
            keys = self._keys[head:] + self._keys[:head]
            values = self._values[head:] + self._values[:head]
        else:
            keys = array("Q")
            values = array("I")
            for key, value in self.items():
                keys.append(key)
                values.append(value)
        if sys.byteorder == "big":
            keys.byteswap()
            values.byteswap()
        return IdTableData(self.max_entries, keys.tobytes(), values.tobytes())

    def mark(self) -> None:
        """Begin recording the changes that the next `take_changes` returns."""
        self._marked = self._added
        self._pops = []
        self._rewritten = False

    def take_changes(self) -> IdTableChanges | None:
        """Return the changes since the last mark and mark again.

        Return None when the changes cannot be replayed on the marked table: more
        entries were added than the ring has positions, or a put changed the value of a
        present key. The caller stores the whole table then (`to_data`).
        """
        added = self._added - self._marked
        if self._rewritten or added > self.max_entries:
            self.mark()
            return None
        start = self._marked % self.max_entries
        end = start + added
        if end <= self.max_entries:
            keys = self._keys[start:end]
            values = self._values[start:end]
        else:
            end -= self.max_entries
            keys = self._keys[start:] + self._keys[:end]
            values = self._values[start:] + self._values[:end]
        if sys.byteorder == "big":
            keys.byteswap()
            values.byteswap()
        changes = IdTableChanges(keys.tobytes(), values.tobytes(), self._pops)
        self.mark()
        return changes

    def apply_changes(self, changes: IdTableChanges) -> None:
        """Replay `take_changes` output of another table on this one, in order.

        The result contains every entry the other table contained, and may contain a
        few older ones besides: a table rebuilt by `from_data` has no forgotten
        positions, so it drops its oldest entries later than the original did.
        """
        keys, values = _from_little_endian(changes.keys, changes.values, "changes")
        pops = iter(changes.pops)
        pop = next(pops, None)
        for index, (key, value) in enumerate(zip(keys, values, strict=True)):
            while pop is not None and pop[0] <= index:
                self.pop(pop[1])
                pop = next(pops, None)
            if key:
                # The entry was new in the other table. Here an older entry of the
                # same key may remain, which must not keep its age.
                self.pop(key)
                self.put(key, value)
        while pop is not None:
            self.pop(pop[1])
            pop = next(pops, None)
        self.forgotten = 0
        self.mark()

    @classmethod
    def from_data(cls, data: IdTableData, max_entries: int) -> IdTable:
        """Rebuild a table from a checkpoint, keeping its newest `max_entries` entries.

        `max_entries` is the current setting, which may differ from `data.max_entries`.
        """
        keys, values = _from_little_endian(data.keys, data.values, "checkpoint")
        table = cls(max_entries)
        start = max(0, len(keys) - max_entries)
        for position in range(start, len(keys)):
            table.put(keys[position], values[position])
        table.forgotten = 0
        table.mark()
        # A full ring may have dropped entries before the checkpoint, and a smaller
        # max_entries drops some now.
        table.dropped = len(keys) >= data.max_entries or start > 0
        return table

    # -- the index ----------------------------------------------------------------

    def _probe(self, key: int) -> int:
        """Return the slot of `key`, or the empty slot that ends its probe run."""
        slots = self._slots
        keys = self._keys
        mask = self._mask
        index = key & mask
        while True:
            position = slots[index]
            if not position or keys[position - 1] == key:
                return index
            index = (index + 1) & mask

    def _find(self, key: int) -> int:
        index = self._probe(key)
        return index if self._slots[index] else -1

    def _place(self, key: int, slot_value: int) -> None:
        slots = self._slots
        mask = self._mask
        index = key & mask
        while slots[index]:
            index = (index + 1) & mask
        slots[index] = slot_value

    def _clear(self, index: int) -> None:
        # Backward-shift deletion: move later entries of the probe run into the hole,
        # so that lookups never need tombstone slots. An entry at `later` may move to
        # the hole only if its home slot does not lie cyclically in (hole, later].
        slots = self._slots
        keys = self._keys
        mask = self._mask
        hole = index
        later = index
        while True:
            later = (later + 1) & mask
            position = slots[later]
            if not position:
                break
            home = keys[position - 1] & mask
            if (later - home) & mask >= (later - hole) & mask:
                slots[hole] = position
                hole = later
        slots[hole] = 0
        self._live -= 1

    def _resize(self, size: int) -> None:
        old = self._slots
        self._slots = array("I", bytes(4 * size))
        self._mask = size - 1
        keys = self._keys
        for position in old:
            if position:
                self._place(keys[position - 1], position)
