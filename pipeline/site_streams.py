"""The buffer streams of plant sites and the sources that copy them into PLANT_EVENTS.

A site's nats-server keeps the plant's events in `SITE_<plant>`, in JetStream domain
`site-<plant>`. The hub's PLANT_EVENTS sources each site stream through that domain's
API, so a backlog stored during an outage arrives in order once the link is back.
"""

from __future__ import annotations

import logging

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

from pipeline.subjects import EVENTS_PREFIX, validate_token

logger = logging.getLogger(__name__)

__all__ = [
    "SITE_BUFFER_MAX_AGE_S",
    "SITE_DOMAIN_PREFIX",
    "ensure_site_stream",
    "site_domain",
    "site_sources",
    "site_stream_config",
    "site_stream_name",
]

SITE_BUFFER_MAX_AGE_S = 7 * 24 * 3600.0
"""Default retention of a site's events; a longer outage loses the oldest."""


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
        duplicate_window=120.0,
    )


async def ensure_site_stream(
    js: JetStreamContext, plant: str, max_age_s: float = SITE_BUFFER_MAX_AGE_S
) -> None:
    """Create or update the buffer stream on a site's own nats-server."""
    # Imported here: pipeline.streams imports this module for the hub's sources.
    from pipeline.streams import stream_rejected_error

    config = site_stream_config(plant, max_age_s)
    try:
        try:
            await js.stream_info(site_stream_name(plant))
        except NotFoundError:
            await js.add_stream(config)
            logger.info("created site stream %s on %s", config.name, config.subjects)
        else:
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
