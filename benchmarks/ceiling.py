"""The ceiling: a bare pull consumer that only fetches, decodes and acks.

It reads the same stream as the pipeline with the same fetch size and the same pull
requests (`pipeline.fetch.PullFetcher`), decodes every event with the same msgspec
decoder, but keeps no state and publishes nothing. Its consumer acknowledges all, as
the ingest's does (`pipeline.streams.consumer_config`), and it acks the last message of
each fetched batch as soon as the batch is decoded. The ingest acks less often, once per
checkpoint, but one ack per batch of thousands costs next to nothing.
"""

from __future__ import annotations

import logging
import time

import msgspec
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from contracts.codec import decode_event
from pipeline.fetch import PullFetcher
from pipeline.subjects import EVENTS_PREFIX, EVENTS_STREAM

logger = logging.getLogger(__name__)

__all__ = ["CEILING_CONSUMER", "run_ceiling"]

CEILING_CONSUMER = "bench-ceiling"
FETCH_TIMEOUT_S = 1.0

_array_decoder = msgspec.json.Decoder(list[msgspec.Raw])


async def run_ceiling(
    nc: NATS, messages: int, fetch_batch: int, *, edge_batches: bool
) -> tuple[int, float]:
    """Consume `messages` messages from the first; return (events decoded, seconds).

    Events that fail to decode are counted too, as the pipeline counts dead letters.
    """
    js = nc.jetstream()
    config = ConsumerConfig(
        durable_name=CEILING_CONSUMER,
        ack_policy=AckPolicy.ALL,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=f"{EVENTS_PREFIX}.>",
        max_ack_pending=fetch_batch * 4,
        ack_wait=120.0,
    )
    await js.add_consumer(EVENTS_STREAM, config)
    fetcher = PullFetcher(nc, EVENTS_STREAM, CEILING_CONSUMER)
    await fetcher.start()
    received = events = 0
    started = time.perf_counter()
    try:
        while received < messages:
            batch = await fetcher.fetch(fetch_batch, FETCH_TIMEOUT_S)
            if not batch:
                raise RuntimeError(
                    f"the ceiling consumer stalled after {received} of {messages} "
                    "messages; check that the stream holds the published workload"
                )
            for message in batch:
                if edge_batches:
                    for item in _array_decoder.decode(message.data):
                        events += _decode(item)
                else:
                    events += _decode(message.data)
            # An ack per message took the client 1.6 to 2.3 times as long as this,
            # and the ingest does not ack per message either.
            await batch[-1].ack()
            received += len(batch)
        await nc.flush()
        elapsed = time.perf_counter() - started
    finally:
        await fetcher.close()
        await js.delete_consumer(EVENTS_STREAM, CEILING_CONSUMER)
    return events, elapsed


def _decode(data: bytes | msgspec.Raw) -> int:
    try:
        decode_event(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    return 1
