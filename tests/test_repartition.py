"""Splitting partition states among another partition count, in this process.

The reference applies the whole stream to one partition. The split path applies the
first half to two partitions, splits them among one or three, and applies the second
half routed by the new count. Orders, machines, postings and counts must come out the
same.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence

import msgspec
import pytest

from actors.partition_state import PartitionState, SourceMessage
from actors.repartition import take_share
from contracts import events as ev
from contracts.codec import decode_event, encode
from contracts.keys import decode_key, is_plant_wide, partition_of, routing_key
from pipeline.sources.generated import StreamSpec, generate
from pipeline.subjects import event_subject

SPEC = StreamSpec(plants=3, orders_per_plant=50, seed=23)


def _stream() -> tuple[list[tuple[str, bytes]], int]:
    """Return the generated stream and where to split it, changed so that events
    are parked at the split: an order's release moved behind the split, and a
    plant-wide lot hold whose release comes first, parked in every partition. A
    machine event is repeated after the split."""
    messages = [(m.subject, m.data) for m in generate(SPEC)[0]]
    half = len(messages) // 2
    late_release = next(
        m for m in messages[half // 2 : half] if m[0].endswith("work_order_released")
    )
    messages.remove(late_release)
    messages.insert(half + 50, late_release)

    sample = decode_event(messages[half][1])
    occurred_at = sample.occurred_at
    hold = ev.QualityHoldApplied(
        event_id="pw-hold", plant=sample.plant, occurred_at=occurred_at,
        source="qm", hold_id="PW-1", scope="lot", lot="PW-LOT",
    )  # fmt: skip
    release = ev.QualityHoldReleased(
        event_id="pw-release", plant=sample.plant,
        occurred_at=occurred_at + dt.timedelta(minutes=1), source="qm",
        hold_id="PW-1",
    )  # fmt: skip
    machine_event = next(
        m for m in messages[:half] if decode_key(m[1]).machine is not None
    )

    first = [
        *messages[: half // 2],
        (event_subject(sample.plant, "quality_hold_released"), encode(release)),
        *messages[half // 2 : half],
    ]
    second = [
        *messages[half : half + 100],
        (event_subject(sample.plant, "quality_hold_applied"), encode(hold)),
        machine_event,
        *messages[half + 100 :],
    ]
    return [*first, *second], len(first)


def _route(
    messages: Sequence[tuple[str, bytes]], partitions: int, first_seq: int
) -> list[list[SourceMessage]]:
    """Group messages by partition as the ingest does, with a copy of each
    plant-wide hold for every other partition."""
    groups: list[list[SourceMessage]] = [[] for _ in range(partitions)]
    for seq, (subject, data) in enumerate(messages, start=first_seq):
        try:
            key = decode_key(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # The ingest dead-letters it before routing.
        home = partition_of(key.plant, routing_key(key), partitions)
        groups[home].append(SourceMessage(seq, subject, data, True))
        if is_plant_wide(key):
            for other in range(partitions):
                if other != home:
                    groups[other].append(SourceMessage(seq, subject, data, False))
    return groups


def _apply(
    states: Sequence[PartitionState], messages: Sequence[tuple[str, bytes]], seq: int
) -> set[str]:
    keys: set[str] = set()
    for state, group in zip(states, _route(messages, len(states), seq), strict=True):
        for start in range(0, len(group), 500):
            result = state.apply_batch(group[start : start + 500])
            keys |= {posting.key for posting in result.postings}
    return keys


def _before_split(
    messages: Sequence[tuple[str, bytes]], split_at: int, partitions: int
) -> tuple[list[PartitionState], set[str]]:
    """Return `partitions` states that applied the stream up to the split, and the
    keys of the postings they made."""
    states = [PartitionState(partition) for partition in range(partitions)]
    return states, _apply(states, messages[:split_at], 1)


def _entities(states: Sequence[PartitionState]) -> tuple[dict[str, bytes], ...]:
    """Return every order and machine, encoded, and check that each is in one state
    only."""
    orders: dict[str, bytes] = {}
    machines: dict[str, bytes] = {}
    for state in states:
        for found, owned in ((orders, state.orders), (machines, state.machines)):
            assert not found.keys() & owned.keys()
            found.update({key: msgspec.msgpack.encode(v) for key, v in owned.items()})
    return orders, machines


@pytest.fixture(scope="module")
def stream() -> tuple[list[tuple[str, bytes]], int]:
    return _stream()


@pytest.fixture(scope="module")
def reference(
    stream: tuple[list[tuple[str, bytes]], int],
) -> tuple[PartitionState, set[str]]:
    messages, _ = stream
    state = PartitionState(0)
    return state, _apply([state], messages, 1)


@pytest.mark.parametrize("partitions", [1, 3])
def test_split_states_give_same_results(
    stream: tuple[list[tuple[str, bytes]], int],
    reference: tuple[PartitionState, set[str]],
    partitions: int,
) -> None:
    messages, split_at = stream
    truth, truth_keys = reference
    old, keys = _before_split(messages, split_at, 2)
    # The split must move parked events: one waits for its order's release, and the
    # plant-wide release waits for its hold in both old partitions.
    parked = [p for state in old for waiting in state.parked.values() for p in waiting]
    assert any(p.event_id == "pw-release" and not p.primary for p in parked)
    assert any(p.event_id != "pw-release" for p in parked)

    new = [take_share(old, p, partitions, split_at) for p in range(partitions)]
    keys |= _apply(new, messages[split_at:], split_at + 1)

    assert keys == truth_keys
    assert _entities(new) == _entities([truth])
    assert sum((Counter(s.counts) for s in new), Counter()) == truth.counts
    assert not any(state.parked for state in new)
    assert {key for s in new for key in s.plant_holds} == set(truth.plant_holds)
    for plant, clock in truth.clocks.items():
        clocks = [s.clocks[plant] for s in new if plant in s.clocks]
        assert sum(c.events for c in clocks) == clock.events
        assert max(c.watermark for c in clocks if c.watermark) == clock.watermark


def test_split_rewrites_rows_and_resumes(
    stream: tuple[list[tuple[str, bytes]], int],
) -> None:
    messages, split_at = stream
    old, _ = _before_split(messages, split_at, 2)
    for state in old:
        state.take_snapshot()

    new = [take_share(old, p, 3, split_at) for p in range(3)]

    snapshots = [state.take_snapshot() for state in new]
    written = sum(s["orders"].num_rows for s in snapshots if "orders" in s)
    assert written == sum(len(state.orders) for state in old)
    clock_rows = [row for s in snapshots for row in s["plant_clocks"].to_pylist()]
    assert {row["partition"] for row in clock_rows} <= {0, 1, 2}
    assert sum(row["events"] for row in clock_rows) == sum(
        clock.events for state in old for clock in state.clocks.values()
    )
    # A redelivered message of the checkpoint is dropped, not applied again.
    repeat = _route(messages[split_at - 1 : split_at], 3, split_at)
    for state, group in zip(new, repeat, strict=True):
        before = Counter(state.counts)
        state.apply_batch(group)
        assert state.counts["applied"] == before["applied"]


def test_split_takes_earliest_source_watermark(
    stream: tuple[list[tuple[str, bytes]], int],
) -> None:
    messages, split_at = stream
    pair, _ = _before_split(messages, split_at, 2)
    [single], _ = _before_split(messages, split_at, 1)

    merged = take_share(pair, 0, 1, split_at)
    spread = [take_share([single], p, 3, split_at) for p in range(3)]

    for plant, clock in merged.clocks.items():
        watermarks = [s.clocks[plant].watermark for s in pair if plant in s.clocks]
        assert clock.watermark == min(w for w in watermarks if w), plant
        assert max(w for w in watermarks if w) > clock.watermark, plant
    # Split among more partitions, each new one keeps the single old partition's
    # watermark.
    for share in spread:
        for plant, clock in share.clocks.items():
            assert clock.watermark == single.clocks[plant].watermark, plant


def test_share_index_checked() -> None:
    with pytest.raises(ValueError, match="partition 3 is outside 0 to 2"):
        take_share([PartitionState(0)], 3, 3, 0)
