"""Pipelined JetStream publishing: many messages in flight, every ack checked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from nats.js import JetStreamContext
from nats.js.api import PubAck

logger = logging.getLogger(__name__)

__all__ = ["PublishError", "publish_all"]

PUBLISH_WINDOW = 2000
"""Publishes in flight before the next ones wait for acks; one round trip per window."""

ACK_TIMEOUT_S = 10.0
"""How long a window waits for JetStream's acks before the publish counts as failed."""


class PublishError(Exception):
    """JetStream did not store a message, or did not confirm it in time."""

    def __init__(self, subject: str, cause: BaseException) -> None:
        super().__init__(f"publishing to {subject} failed: {cause!r}")
        self.subject = subject


async def publish_all(
    js: JetStreamContext,
    messages: Iterable[tuple[str, bytes, str | None]],
) -> tuple[int, int]:
    """Publish (subject, payload, message id) triples and wait until all are stored.

    A message id, when given, becomes the Nats-Msg-Id header, so JetStream drops a
    repeat within the stream's duplicate window. Return (stored, dropped as duplicates).
    """
    stored = duplicates = 0
    window: list[tuple[str, asyncio.Future[PubAck]]] = []

    async def settle() -> None:
        nonlocal stored, duplicates
        for subject, future in window:
            try:
                ack = await asyncio.wait_for(future, ACK_TIMEOUT_S)
            except Exception as error:  # a timeout or an API error from the server
                raise PublishError(subject, error) from error
            if ack.duplicate:
                duplicates += 1
            else:
                stored += 1
        window.clear()

    for subject, payload, message_id in messages:
        headers = {"Nats-Msg-Id": message_id} if message_id else None
        future = await js.publish_async(subject, payload, headers=headers)
        window.append((subject, future))
        if len(window) >= PUBLISH_WINDOW:
            await settle()
    await settle()
    return stored, duplicates
