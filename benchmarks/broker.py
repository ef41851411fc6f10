"""A loopback nats-server for one wire mode, with the streams reset between runs."""

from __future__ import annotations

import logging
from types import TracebackType

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from cluster.nats_server import EmbeddedNatsServer
from pipeline.settings import PipelineSettings
from pipeline.streams import CHECKPOINT_BUCKET, ensure_streams
from pipeline.subjects import DLQ_STREAM, EVENTS_STREAM, POSTINGS_STREAM

logger = logging.getLogger(__name__)

__all__ = ["Broker", "PUBLISH_MAX_PENDING"]

PUBLISH_MAX_PENDING = 4000
"""Async publishes in flight per connection; above the publish window of 2000."""


class Broker:
    """An embedded nats-server with a client connection and the plantstream streams."""

    def __init__(self) -> None:
        self.server = EmbeddedNatsServer()
        self.nc: NATS | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def client(self) -> NATS:
        if self.nc is None:
            raise RuntimeError("the broker is not connected; use it with `async with`")
        return self.nc

    @property
    def js(self) -> JetStreamContext:
        return self.client.jetstream(publish_async_max_pending=PUBLISH_MAX_PENDING)

    async def __aenter__(self) -> Broker:
        try:
            self.server.start()
            self.nc = await nats.connect(self.server.url, max_reconnect_attempts=3)
            await ensure_streams(self.js, PipelineSettings())
        except BaseException:
            # `async with` calls __aexit__ only once __aenter__ has returned, so a
            # failure or a Ctrl-C here would leave the server and its store behind.
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.nc is not None:
            await self.nc.close()
        self.server.stop()

    async def reset_outputs(self, consumer: str) -> None:
        """Delete what one pipeline run leaves behind, keeping the plant events.

        Deleting the postings stream also drops its duplicate window, so the next run
        stores every posting again instead of having JetStream drop them as repeats.
        The streams and the bucket are then created again, empty.
        """
        js = self.js
        for stream in (POSTINGS_STREAM, DLQ_STREAM):
            try:
                await js.delete_stream(stream)
            except NotFoundError:
                pass
        try:
            await js.delete_object_store(CHECKPOINT_BUCKET)
        except NotFoundError:
            pass
        await self.delete_consumer(consumer)
        await ensure_streams(js, PipelineSettings())

    async def delete_consumer(self, consumer: str) -> None:
        try:
            await self.js.delete_consumer(EVENTS_STREAM, consumer)
        except NotFoundError:
            pass
