"""Creating the JetStream streams and the ingest consumer, idempotently."""

from __future__ import annotations

import dataclasses
import logging

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    APIError,
    BadRequestError,
    NotFoundError,
    ServiceUnavailableError,
)

from pipeline.settings import PipelineSettings
from pipeline.site_streams import site_sources
from pipeline.subjects import (
    DLQ_PREFIX,
    DLQ_STREAM,
    EVENTS_PREFIX,
    EVENTS_STREAM,
    POSTINGS_PREFIX,
    POSTINGS_STREAM,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_BUCKET",
    "ConsumerSetupError",
    "StreamSetupError",
    "ensure_consumer",
    "ensure_streams",
    "consumer_rejected_error",
    "stream_rejected_error",
    "stream_configs",
]

CHECKPOINT_BUCKET = "plantstream-checkpoints"
"""JetStream object store bucket that keeps the partition actors' checkpoints."""


class StreamSetupError(ValueError):
    """The server rejected the creation or update of one of plantstream's streams.

    Not among the errors the ingest retries: the server understood the request and
    will refuse it again until someone changes the streams on it.
    """


class ConsumerSetupError(ValueError):
    """The server rejected the ingest's durable consumer as configured.

    Not retried, for the same reason as StreamSetupError: the same request fails
    again until the settings or the server's limits change.
    """


def consumer_rejected_error(
    settings: PipelineSettings, config: ConsumerConfig, error: APIError
) -> ConsumerSetupError:
    """Build the error for a consumer configuration the server rejected (code 400)."""
    return ConsumerSetupError(
        f"nats-server rejected consumer {settings.consumer} on {EVENTS_STREAM}: "
        f"{error.description} (code {error.code}, err_code {error.err_code}). Its "
        f"max_ack_pending is {config.max_ack_pending}, twice PLANTSTREAM_MAX_UNACKED "
        f"({settings.max_unacked}), and its ack_wait {settings.ack_wait_s:g} s "
        "(PLANTSTREAM_ACK_WAIT_S): lower them below the server's limits, or raise "
        "those limits in the server's jetstream block"
    )


def stream_configs(settings: PipelineSettings) -> list[StreamConfig]:
    """Return the configuration of the three streams plantstream owns."""
    return [
        StreamConfig(
            name=EVENTS_STREAM,
            description="Canonical plant events, one subject per plant and event type",
            subjects=[f"{EVENTS_PREFIX}.>"],
            sources=site_sources(settings.site_plants()) or None,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=settings.events_max_age_s,
            duplicate_window=settings.events_duplicate_window_s,
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            name=POSTINGS_STREAM,
            description="ERP postings per plant; Nats-Msg-Id is the idempotency key",
            subjects=[f"{POSTINGS_PREFIX}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=settings.postings_duplicate_window_s,
        ),
        StreamConfig(
            name=DLQ_STREAM,
            description="Messages plantstream could not apply, with reason and bytes",
            subjects=[f"{DLQ_PREFIX}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            # A replay after a crash rejects the same messages again; their ids repeat,
            # so a window as long as the postings' keeps one dead letter per message.
            duplicate_window=settings.postings_duplicate_window_s,
        ),
    ]


async def ensure_streams(js: JetStreamContext, settings: PipelineSettings) -> None:
    """Create the streams, or update them to `settings`, so start-up is repeatable."""
    for config in stream_configs(settings):
        try:
            await _ensure_stream(js, config)
        except ServiceUnavailableError:
            raise
        except APIError as error:
            raise await stream_rejected_error(js, config, error) from error
    try:
        await js.object_store(CHECKPOINT_BUCKET)
    except NotFoundError:
        await js.create_object_store(CHECKPOINT_BUCKET)
        logger.info("created object store %s for checkpoints", CHECKPOINT_BUCKET)


async def stream_rejected_error(
    js: JetStreamContext, config: StreamConfig, error: APIError
) -> StreamSetupError:
    """Build the error for a stream the server rejected. It names the stream that
    already takes the same subjects, if there is one."""
    holders: set[str] = set()
    for subject in config.subjects or []:
        try:
            holders.add(await js.find_stream_name_by_subject(subject))
        except (APIError, TimeoutError):
            continue
    holders.discard(config.name or "")
    if holders:
        cause = (
            f"Stream {', '.join(sorted(holders))} already takes these subjects: "
            "remove or rename it"
        )
    else:
        cause = (
            "The existing stream may have a setting the server cannot change, such as "
            "its storage type: remove or rename it"
        )
    return StreamSetupError(
        f"nats-server rejected stream {config.name} on subjects "
        f"{', '.join(config.subjects or [])}: {error.description} (code "
        f"{error.code}, err_code {error.err_code}). {cause}, or point plantstream at "
        "another server"
    )


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    if config.name is None:
        raise ValueError(f"a stream configuration needs a name: {config}")
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        logger.info("created stream %s on %s", config.name, config.subjects)
        if config.sources:
            names = ", ".join(sorted(str(source.name) for source in config.sources))
            logger.info("%s now copies %s", config.name, names)
    else:
        await js.update_stream(_keep_sources(config, info.config))
        logger.debug("stream %s exists; configuration updated", config.name)


def _keep_sources(config: StreamConfig, current: StreamConfig) -> StreamConfig:
    """Return `config` with the sources `current` has and `config` lacks added.

    A command started without PLANTSTREAM_SITES would otherwise stop the copying from
    every site, silently, and a site's events would expire in its buffer. Only
    `plantstream site-remove` drops a source.
    """
    configured = {str(source.name) for source in config.sources or []}
    present = {str(source.name) for source in current.sources or []}
    added = sorted(configured - present)
    if added:
        logger.info("%s now copies %s", config.name, ", ".join(added))
    retained = [
        source for source in current.sources or [] if source.name not in configured
    ]
    if not retained:
        return config
    names = ", ".join(sorted(str(source.name) for source in retained))
    # A run sets up its streams twice, at start and when its ingest starts.
    if names not in _warned_kept:
        _warned_kept.add(names)
        logger.warning(
            "%s keeps copying %s, which PLANTSTREAM_SITES does not name; add the "
            "plant to PLANTSTREAM_SITES, or stop copying a site's events with "
            "`plantstream site-remove`",
            config.name,
            names,
        )
    return dataclasses.replace(config, sources=[*(config.sources or []), *retained])


_warned_kept: set[str] = set()
"""Kept sources already warned about in this process, by their names."""


def consumer_config(settings: PipelineSettings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=settings.consumer,
        # Acks come only at checkpoints, for everything delivered so far, so acking the
        # last message delivered is enough.
        ack_policy=AckPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        # Messages stay pending until a checkpoint covers them, so the server must let
        # more than one checkpoint's worth of messages be outstanding.
        max_ack_pending=settings.max_unacked * 2,
        filter_subject=f"{EVENTS_PREFIX}.>",
        max_deliver=-1,
    )


async def ensure_consumer(js: JetStreamContext, settings: PipelineSettings) -> None:
    """Create the durable ingest consumer if it does not exist yet."""
    try:
        await js.consumer_info(EVENTS_STREAM, settings.consumer)
    except NotFoundError:
        config = consumer_config(settings)
        try:
            await js.add_consumer(EVENTS_STREAM, config)
        except BadRequestError as error:
            raise consumer_rejected_error(settings, config, error) from error
        logger.info(
            "created durable consumer %s on %s", settings.consumer, EVENTS_STREAM
        )
