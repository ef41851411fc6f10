"""PullFetcher and Publisher against a real nats-server: order, acks, limits, errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from cluster.nats_server import EmbeddedNatsServer
from pipeline.fetch import FetchError, PullFetcher, pending_after, stream_sequence
from pipeline.publish import Publisher, PublishError, publish_all

STREAM = "IO_TEST"
CONSUMER = "io-test"


def _run(server: EmbeddedNatsServer, body: Callable[[NATS], Awaitable[None]]) -> None:
    """Run `body` with a client of `server` that has the test stream and consumer."""

    async def main() -> None:
        client = await nats.connect(server.url)
        js = client.jetstream()
        await js.add_stream(
            StreamConfig(name=STREAM, subjects=["io.>"], duplicate_window=60.0)
        )
        await js.add_consumer(
            STREAM, ConsumerConfig(durable_name=CONSUMER, ack_policy=AckPolicy.ALL)
        )
        try:
            await body(client)
        finally:
            await client.close()

    asyncio.run(main())


async def _fill(nc: NATS, count: int) -> None:
    await publish_all(nc, ((f"io.m{i % 3}", b"%d" % i, None) for i in range(count)))


def test_fetch_returns_every_message_in_order(nats_server: EmbeddedNatsServer) -> None:
    async def body(nc: NATS) -> None:
        await _fill(nc, 250)
        fetcher = PullFetcher(nc, STREAM, CONSUMER)
        received: list[bytes] = []
        while len(received) < 250:
            batch = await fetcher.fetch(40, 0.5)
            assert batch, f"fetch returned nothing after {len(received)} messages"
            received.extend(m.data for m in batch)
        await fetcher.close()
        assert received == [b"%d" % i for i in range(250)]

    _run(nats_server, body)


def test_reply_numbers_match_metadata(nats_server: EmbeddedNatsServer) -> None:
    async def body(nc: NATS) -> None:
        await _fill(nc, 8)
        fetcher = PullFetcher(nc, STREAM, CONSUMER)
        batch = await fetcher.fetch(5, 0.5)
        await fetcher.close()
        assert [stream_sequence(m) for m in batch] == [
            m.metadata.sequence.stream for m in batch
        ]
        assert [pending_after(m) for m in batch] == [7, 6, 5, 4, 3]
        assert [pending_after(m) for m in batch] == [
            m.metadata.num_pending for m in batch
        ]

    _run(nats_server, body)


def test_reply_numbers_of_domain_reply() -> None:
    reply = "$JS.ACK.hub.ACCHASH.PLANT_EVENTS.ingest.1.4711.17.1733300000000000000.3.x"
    msg = Msg(_client=None, subject="s", reply=reply)  # type: ignore[arg-type]
    assert stream_sequence(msg) == 4711
    assert pending_after(msg) == 3


def test_stream_sequence_rejects_plain_message() -> None:
    msg = Msg(_client=None, subject="s", reply="_INBOX.abc")  # type: ignore[arg-type]
    with pytest.raises(nats.errors.NotJSMessageError):
        stream_sequence(msg)


def test_fetch_respects_batch_size(nats_server: EmbeddedNatsServer) -> None:
    async def body(nc: NATS) -> None:
        await _fill(nc, 100)
        fetcher = PullFetcher(nc, STREAM, CONSUMER)
        batch = await fetcher.fetch(30, 0.5)
        await fetcher.close()
        assert len(batch) == 30

    _run(nats_server, body)


def test_fetch_on_idle_stream_returns_empty_after_timeout(
    nats_server: EmbeddedNatsServer,
) -> None:
    async def body(nc: NATS) -> None:
        fetcher = PullFetcher(nc, STREAM, CONSUMER)
        started = time.monotonic()
        batch = await fetcher.fetch(10, 0.3)
        elapsed = time.monotonic() - started
        await fetcher.close()
        assert batch == []
        assert elapsed >= 0.25

    _run(nats_server, body)


def test_fetch_returns_a_late_message_before_its_timeout(
    nats_server: EmbeddedNatsServer,
) -> None:
    async def body(nc: NATS) -> None:
        fetcher = PullFetcher(nc, STREAM, CONSUMER)

        async def publish_later() -> None:
            await asyncio.sleep(0.2)
            await publish_all(nc, [("io.late", b"late", None)])

        task = asyncio.create_task(publish_later())
        started = time.monotonic()
        batch = await fetcher.fetch(100, 5.0)
        elapsed = time.monotonic() - started
        await task
        await fetcher.close()
        assert [m.data for m in batch] == [b"late"]
        assert elapsed < 2.0

    _run(nats_server, body)


def test_fetch_from_deleted_consumer_raises(nats_server: EmbeddedNatsServer) -> None:
    async def body(nc: NATS) -> None:
        fetcher = PullFetcher(nc, STREAM, CONSUMER)
        await nc.jetstream().delete_consumer(STREAM, CONSUMER)
        with pytest.raises(FetchError):
            # The server ends the pull request with a 409 status, which the fetch
            # raises. The loop allows for a stale status from an earlier request.
            for _ in range(2):
                await fetcher.fetch(10, 0.3)
        await fetcher.close()

    _run(nats_server, body)


def test_ack_all_of_last_fetched_message_clears_pending(
    nats_server: EmbeddedNatsServer,
) -> None:
    async def body(nc: NATS) -> None:
        await _fill(nc, 50)
        fetcher = PullFetcher(nc, STREAM, CONSUMER)
        batch = await fetcher.fetch(50, 0.5)
        await batch[-1].ack()
        await nc.flush()
        await fetcher.close()
        # flush() returns once the server has read the ack, which it applies to the
        # consumer a moment later, so the pending count may lag for a little while.
        deadline = time.monotonic() + 5.0
        while True:
            info = await nc.jetstream().consumer_info(STREAM, CONSUMER)
            if info.num_ack_pending == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert info.num_ack_pending == 0

    _run(nats_server, body)


def test_publisher_stores_and_counts_duplicates(
    nats_server: EmbeddedNatsServer,
) -> None:
    async def body(nc: NATS) -> None:
        publisher = Publisher(nc)
        for i in range(20):
            await publisher.publish("io.p", b"x", f"id-{i % 10}")
        await publisher.settle()
        await publisher.close()
        assert publisher.stored == 10
        assert publisher.duplicates == 10

    _run(nats_server, body)


def test_publisher_waits_when_window_is_full(nats_server: EmbeddedNatsServer) -> None:
    async def body(nc: NATS) -> None:
        publisher = Publisher(nc, window=8)
        peak = 0
        for i in range(200):
            await publisher.publish("io.w", b"%d" % i, None)
            peak = max(peak, publisher.in_flight)
        await publisher.settle()
        await publisher.close()
        assert peak <= 8
        assert publisher.stored == 200

    _run(nats_server, body)


def test_settle_up_to_a_number_leaves_later_ones(
    nats_server: EmbeddedNatsServer,
) -> None:
    async def body(nc: NATS) -> None:
        publisher = Publisher(nc)
        first = await publisher.publish("io.s", b"1", None)
        await publisher.settle(first)
        await publisher.publish("io.s", b"2", None)
        await publisher.settle()
        await publisher.close()
        assert publisher.stored == 2

    _run(nats_server, body)


def test_publish_to_uncaptured_subject_fails_on_settle(
    nats_server: EmbeddedNatsServer,
) -> None:
    async def body(nc: NATS) -> None:
        publisher = Publisher(nc, ack_timeout_s=3.0)
        await publisher.publish("nowhere.x", b"lost", None)
        with pytest.raises(PublishError, match="nowhere.x"):
            await publisher.settle()
        await publisher.close()

    _run(nats_server, body)


def test_publish_over_max_payload_names_sizes(
    nats_server: EmbeddedNatsServer,
) -> None:
    async def body(nc: NATS) -> None:
        publisher = Publisher(nc)
        payload = b"x" * (nc.max_payload + 1)
        with pytest.raises(PublishError, match="bytes the server takes"):
            await publisher.publish("plant.events.P1.x", payload, None)
        assert publisher.in_flight == 0
        await publisher.close()

    _run(nats_server, body)


def test_publish_all_counts_stored_on_failure(
    nats_server: EmbeddedNatsServer,
) -> None:
    async def body(nc: NATS) -> None:
        messages = [
            *[("io.s", b"before", None)] * 3,
            ("nowhere.z", b"lost", None),
            *[("io.s", b"after", None)] * 2,
        ]
        with pytest.raises(PublishError, match="nowhere.z") as raised:
            await publish_all(nc, messages)
        # The two sent after the failed one are in flight when it fails, and stored.
        assert raised.value.stored == 5

    _run(nats_server, body)


def test_publish_error_names_jetstream_reason(nats_server: EmbeddedNatsServer) -> None:
    async def body(nc: NATS) -> None:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(name="IO_SMALL", subjects=["small.>"], max_msg_size=16)
        )
        publisher = Publisher(nc, ack_timeout_s=3.0)
        await publisher.publish("small.x", b"y" * 64, None)
        with pytest.raises(PublishError, match="JetStream error"):
            await publisher.settle()
        await publisher.close()

    _run(nats_server, body)


def test_reset_forgets_messages_in_flight(nats_server: EmbeddedNatsServer) -> None:
    async def body(nc: NATS) -> None:
        publisher = Publisher(nc, ack_timeout_s=3.0)
        await publisher.publish("nowhere.y", b"lost", None)
        publisher.reset()
        await publisher.publish("io.r", b"kept", None)
        await publisher.settle()
        await publisher.close()
        assert publisher.stored == 1

    _run(nats_server, body)
