"""The buffer streams of plant sites and the sources that copy them into PLANT_EVENTS.

A site's nats-server keeps the plant's events in `SITE_<plant>`, in JetStream domain
`site-<plant>`. The hub's PLANT_EVENTS sources each site stream through that domain's
API, so a backlog stored during an outage arrives in order once the link is back.

A message the site stream drops before the hub copies it (its max age passed during a
long outage, or someone deleted it) never reaches PLANT_EVENTS. Each copied message
carries its sequence in the site stream, so `SiteSequences` finds such a loss as a gap
in those sequences.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    ExternalStream,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
)
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from pipeline.subjects import EVENTS_PREFIX, EVENTS_STREAM, validate_token

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_SITE_MAX_AGE_S",
    "MIN_SITE_MAX_AGE_S",
    "RetentionCutError",
    "SITE_BUFFER_MAX_AGE_S",
    "SITE_DOMAIN_PREFIX",
    "SOURCE_HEADER",
    "SiteSequences",
    "ensure_site_stream",
    "remove_site_source",
    "site_domain",
    "site_sources",
    "site_stream_config",
    "site_stream_name",
    "source_position",
]

SITE_BUFFER_MAX_AGE_S = 7 * 24 * 3600.0
"""Default retention of a site's events; a longer outage loses the oldest."""

MIN_SITE_MAX_AGE_S = 60.0
"""The shortest retention `site-init` accepts, other than 0 for none."""

MAX_SITE_MAX_AGE_S = (2**63 - 1) // 10**9
"""The maximum retention nats-server takes, in whole seconds, because it reads max_age
as nanoseconds in a signed 64-bit integer."""

DUPLICATE_WINDOW_S = 120.0
"""The site stream's window for Nats-Msg-Id, cut to the retention when that is
shorter, because JetStream refuses a window longer than the retention."""


SITE_DOMAIN_PREFIX = "site-"
"""The JetStream domain of a plant site's nats-server is this prefix and the plant."""


def site_domain(plant: str) -> str:
    return f"{SITE_DOMAIN_PREFIX}{validate_token(plant, 'plant')}"


def site_stream_name(plant: str) -> str:
    return f"SITE_{validate_token(plant, 'plant')}"


def site_stream_config(
    plant: str, max_age_s: float = SITE_BUFFER_MAX_AGE_S
) -> StreamConfig:
    """Return the site's buffer stream: every event of the plant, kept `max_age_s`."""
    return StreamConfig(
        name=site_stream_name(plant),
        description=f"Events of plant {plant}, kept until the hub sources them",
        subjects=[f"{EVENTS_PREFIX}.{plant}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=max_age_s,
        discard=DiscardPolicy.OLD,
        duplicate_window=min(DUPLICATE_WINDOW_S, max_age_s or DUPLICATE_WINDOW_S),
    )


class RetentionCutError(ValueError):
    """A shorter retention would delete events that a site stream contains."""


async def ensure_site_stream(
    js: JetStreamContext,
    plant: str,
    max_age_s: float = SITE_BUFFER_MAX_AGE_S,
    *,
    allow_shorter: bool = False,
) -> None:
    """Create or update the buffer stream on a site's own nats-server.

    Raises RetentionCutError, unless `allow_shorter`, when the stream exists, contains
    messages and would keep them for less time than now: nats-server deletes the
    older ones at once, and during an outage the hub has not copied them yet.
    """
    # Imported here: pipeline.streams imports this module for the hub's sources.
    from pipeline.streams import stream_rejected_error

    config = site_stream_config(plant, max_age_s)
    try:
        await js.stream_info(EVENTS_STREAM)
    except NotFoundError:
        pass
    else:
        # The advice for subjects taken by another stream is to remove it, which
        # here would delete the hub's events.
        raise ValueError(
            f"{EVENTS_STREAM} is on this server, so it looks like the hub: give "
            "--nats-url the URL of the site's own nats-server"
        )
    try:
        try:
            info = await js.stream_info(site_stream_name(plant))
        except NotFoundError:
            await js.add_stream(config)
            logger.info("created site stream %s on %s", config.name, config.subjects)
        else:
            current = info.config.max_age or 0.0
            shorter = max_age_s > 0 and (current == 0 or max_age_s < current)
            if shorter and info.state.messages and not allow_shorter:
                retention = f"{current:g} s" if current else "without a time limit"
                count = info.state.messages
                noun = "message" if count == 1 else "messages"
                raise RetentionCutError(
                    f"{config.name} stores {count:,} {noun}, kept {retention}; "
                    f"--max-age-s {max_age_s:g} would delete the older ones at once, "
                    "including any the hub has not copied yet. Check on the hub "
                    f"that {EVENTS_STREAM}'s source {config.name} has no lag (its "
                    "stream info shows it), then pass --allow-shorter"
                )
            await js.update_stream(config)
    except ServiceUnavailableError:
        raise
    except APIError as error:
        raise await stream_rejected_error(js, config, error) from error


def site_sources(plants: list[str]) -> list[StreamSource]:
    """Return the sources that copy each site's buffer stream into PLANT_EVENTS."""
    return [
        StreamSource(
            name=site_stream_name(plant),
            external=ExternalStream(api=f"$JS.{site_domain(plant)}.API"),
        )
        for plant in plants
    ]


async def remove_site_source(js: JetStreamContext, plant: str) -> None:
    """Stop PLANT_EVENTS on the hub copying the buffer stream of `plant`'s site.

    Raises ValueError if it does not copy that stream.
    """
    name = site_stream_name(plant)
    try:
        info = await js.stream_info(EVENTS_STREAM)
    except NotFoundError:
        raise ValueError(
            f"this server has no {EVENTS_STREAM} stream, so it is not the hub: give "
            "--nats-url the URL of the hub's nats-server"
        ) from None
    sources = info.config.sources or []
    remaining = [source for source in sources if source.name != name]
    if len(remaining) == len(sources):
        copied = ", ".join(sorted(str(source.name) for source in sources)) or "none"
        raise ValueError(
            f"{EVENTS_STREAM} does not copy {name} (it copies: {copied}); check the "
            "plant id and that --nats-url is the hub"
        )
    await js.update_stream(dataclasses.replace(info.config, sources=remaining or None))
    logger.info("%s no longer copies %s", EVENTS_STREAM, name)


SOURCE_HEADER = "Nats-Stream-Source"
"""The header nats-server adds to each message it copies from a source stream."""


def source_position(headers: Mapping[str, str] | None) -> tuple[str, int] | None:
    """Return the stream and sequence a sourced message was copied from, or None.

    nats-server writes the header as `<stream>:<id> <sequence> <filter> ...`; a value
    of another shape is not one of its copies and gives None.
    """
    if not headers:
        return None
    value = headers.get(SOURCE_HEADER)
    if value is None:
        return None
    parts = value.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return parts[0].split(":", 1)[0], int(parts[1])


class SiteSequences:
    """The highest sequence of each source stream copied into PLANT_EVENTS so far.

    A checkpoint stores them with the stream position it covers, so that a restart
    goes on comparing from there.
    """

    def __init__(self, highest: Mapping[str, int] | None = None) -> None:
        self.highest: dict[str, int] = dict(highest or {})

    def missing_before(self, stream: str, seq: int) -> int:
        """Record that `seq` of `stream` arrived; return how many sequences just below
        it were skipped (0 when none).

        The first message seen from a stream is compared with nothing: PLANT_EVENTS
        may have expired the copies before it, or a checkpoint reset may start after
        them, and a loss before it would look the same. Sequence 1 below the highest
        one means the site stream was created again, so the comparison starts over
        from it. Any other sequence at or below the highest one is a copy sent again
        and changes nothing.
        """
        highest = self.highest.get(stream)
        if highest is not None and seq <= highest:
            if seq == 1:
                self.highest[stream] = 1
            return 0
        self.highest[stream] = seq
        return 0 if highest is None else seq - highest - 1
